//! Tags, patterns and `clear()`: what goes, what stays, and races with writers.

mod support;

use std::sync::Arc;
use std::time::Duration;

use cache_runtime::Cache;
use redis::AsyncCommands;
use support::{local_cache, Redis, FORMATS};

async fn both(redis: &Redis, name: &str) -> [Cache; 2] {
    [redis.cache(name, FORMATS[0]).await, local_cache(name, FORMATS[0])]
}

#[tokio::test]
async fn pattern_deletion_leaves_other_prefixes_alone() {
    let redis = Redis::start();
    for cache in both(&redis, "pat").await {
        let neighbour = match cache.mode() {
            cache_runtime::Mode::Redis => redis.cache("pat", FORMATS[0]).await,
            cache_runtime::Mode::Local => cache.clone(),
        };
        cache.set("missions:1", &1).await.unwrap();
        cache.set("missions:2", &2).await.unwrap();
        cache.set("missionsX:1", &3).await.unwrap();
        cache.set("agents:1", &4).await.unwrap();
        neighbour.set("missions:9", &9).await.unwrap();
        let expected_deleted =
            if neighbour.config().key_prefix() == cache.config().key_prefix() { 3 } else { 2 };
        assert_eq!(cache.delete_pattern("missions:*").await.unwrap(), expected_deleted);
        assert!(cache.exists("missionsX:1").await.unwrap());
        assert!(cache.exists("agents:1").await.unwrap());
        if expected_deleted == 2 {
            assert!(neighbour.exists("missions:9").await.unwrap(), "another prefix was touched");
        }
    }
}

#[tokio::test]
async fn glob_characters_in_keys_do_not_widen_a_pattern() {
    let redis = Redis::start();
    for cache in both(&redis, "globkeys").await {
        cache.set("a[1]", &1).await.unwrap();
        cache.set("a1", &2).await.unwrap();
        assert_eq!(cache.delete_pattern("a\\[1\\]").await.unwrap(), 1, "{:?}", cache.mode());
        assert!(cache.exists("a1").await.unwrap());
    }
}

#[tokio::test]
async fn clear_leaves_foreign_keys_alone() {
    let redis = Redis::start();
    let cache = redis.cache("clear", FORMATS[0]).await;
    let mut raw = redis.raw().await;
    let prefix = cache.config().key_prefix().to_owned();
    let foreign = [format!("{prefix}x:1"), format!("other:{prefix}:1"), "session:42".to_owned()];
    for key in &foreign {
        let _: () = raw.set(key, "keep").await.unwrap();
    }
    cache.set("a", &1).ttl(60).tags(["t"]).await.unwrap();
    cache.set("b", &2).await.unwrap();
    assert_eq!(cache.clear().await.unwrap(), 2);
    for key in &foreign {
        let v: Option<String> = raw.get(key).await.unwrap();
        assert_eq!(v.as_deref(), Some("keep"), "{key} was deleted");
    }
    let tag_sets: Vec<String> = raw.keys(format!("{prefix}#tag:*")).await.unwrap();
    assert!(tag_sets.is_empty(), "tag index left behind: {tag_sets:?}");
    let _: () = raw.del(&foreign).await.unwrap();
}

#[tokio::test]
async fn ten_thousand_keys_go_in_one_pattern_delete() {
    let redis = Redis::start();
    let cache = redis.cache("bulk", FORMATS[2]).await;
    let mut raw = redis.raw().await;
    let prefix = cache.config().key_prefix().to_owned();
    let mut pipe = redis::pipe();
    for i in 0..10_000 {
        pipe.cmd("SET").arg(format!("{prefix}:bulk:{i}")).arg(i).ignore();
    }
    pipe.cmd("SET").arg(format!("{prefix}:kept:1")).arg(1).ignore();
    let _: () = pipe.query_async(&mut raw).await.unwrap();
    assert_eq!(cache.delete_pattern("bulk:*").await.unwrap(), 10_000);
    let left: u64 = redis::cmd("DBSIZE").query_async(&mut raw).await.unwrap();
    assert!(left >= 1);
    assert!(cache.exists("kept:1").await.unwrap());
    assert_eq!(cache.delete_pattern("bulk:*").await.unwrap(), 0);
}

#[tokio::test]
async fn tags_written_by_one_process_are_invalidated_by_another() {
    let redis = Redis::start();
    let writer = redis.cache("shared", FORMATS[0]).await;
    let other = Cache::new(
        cache_runtime::CacheConfig::builder()
            .redis_url(redis.url())
            .key_prefix(writer.config().key_prefix())
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    writer.set("missions:1", &1).tags(["missions"]).await.unwrap();
    assert_eq!(other.invalidate_tags(["missions"]).await.unwrap(), 1);
    assert!(!writer.exists("missions:1").await.unwrap());
}

#[tokio::test]
async fn no_tagged_key_survives_an_invalidation_racing_writers() {
    let redis = Redis::start();
    for cache in both(&redis, "race").await {
        let cache = Arc::new(cache);
        for round in 0..20 {
            let writers: Vec<_> = (0..8)
                .map(|w| {
                    let cache = cache.clone();
                    tokio::spawn(async move {
                        for i in 0..25 {
                            let key = format!("r{round}:w{w}:{i}");
                            cache.set(&key, &i).ttl(60).tags(["hot"]).await.unwrap();
                        }
                    })
                })
                .collect();
            tokio::task::yield_now().await;
            cache.invalidate_tags(["hot"]).await.unwrap();
            for w in writers {
                w.await.unwrap();
            }
            // Writes that finished after the invalidation are fresh; one more
            // invalidation must find every one of them in the index.
            cache.invalidate_tags(["hot"]).await.unwrap();
            let stats = cache.stats().await.unwrap();
            assert_eq!(
                stats.total_keys,
                0,
                "round {round}, {:?}: tagged keys escaped the index",
                cache.mode()
            );
        }
    }
}

#[tokio::test]
async fn tag_sets_shed_members_of_expired_keys() {
    let redis = Redis::start();
    let cache = redis.cache("trim", FORMATS[0]).await;
    let mut raw = redis.raw().await;
    let tag_key = format!("{}#tag:hot", cache.config().key_prefix());
    for i in 0..200 {
        cache.set(&format!("short:{i}"), &i).ttl(Duration::from_millis(200)).tags(["hot"]).await.unwrap();
    }
    assert_eq!(raw.zcard::<_, u64>(&tag_key).await.unwrap(), 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    cache.set("long", &1).ttl(60).tags(["hot"]).await.unwrap();
    assert_eq!(raw.zcard::<_, u64>(&tag_key).await.unwrap(), 1, "expired members kept");
    let set_ttl: i64 = raw.pttl(&tag_key).await.unwrap();
    assert!(
        set_ttl > 55_000 && set_ttl <= 60_000,
        "the tag set must live as long as its longest member: {set_ttl}"
    );
}

#[tokio::test]
async fn local_tag_invalidation_counts_only_live_entries() {
    let cache = local_cache("trim", FORMATS[0]);
    for i in 0..1_000 {
        cache.set(&format!("short:{i}"), &i).ttl(Duration::from_millis(50)).tags(["hot"]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    for i in 0..300 {
        cache.set(&format!("live:{i}"), &i).ttl(60).tags(["hot"]).await.unwrap();
    }
    // Only live entries are deleted and counted, whatever the index still holds.
    assert_eq!(cache.invalidate_tags(["hot"]).await.unwrap(), 300);
}

#[tokio::test]
async fn key_names_that_are_not_utf8_break_nothing() {
    let redis = Redis::start();
    let cache = redis.cache("bytes", FORMATS[0]).await;
    let prefix = cache.config().key_prefix().to_owned();
    let mut raw = redis.raw().await;
    let foreign = |suffix: &[u8]| [prefix.as_bytes(), b":", suffix].concat();
    let plant = |raw: &mut redis::aio::MultiplexedConnection| {
        let (a, b) = (foreign(b"bad\xff\xfe:1"), foreign(b"bad\\x:2"));
        let mut raw = raw.clone();
        async move {
            let _: () = raw.set(a, "written by another client").await.unwrap();
            let _: () = raw.set(b, "a plain backslash").await.unwrap();
        }
    };
    plant(&mut raw).await;
    cache.set("missions:1", &1).await.unwrap();

    let stats = cache.stats().await.unwrap();
    assert!(stats.connected, "a foreign key name must not look like an outage");
    assert_eq!(stats.total_keys, 3);
    let (mut keys, cursor) = cache.scan_keys("*", 0, 1000).await.unwrap();
    assert_eq!(cursor, 0);
    keys.sort();
    assert_eq!(keys, ["bad\\\\x:2", "bad\\xff\\xfe:1", "missions:1"], "listed escaped, distinct");

    assert_eq!(cache.delete_pattern("bad*").await.unwrap(), 2);
    let gone: bool = raw.exists(foreign(b"bad\xff\xfe:1")).await.unwrap();
    assert!(!gone);
    plant(&mut raw).await;
    assert_eq!(cache.clear().await.unwrap(), 3);
    assert_eq!(cache.stats().await.unwrap().total_keys, 0);
}
