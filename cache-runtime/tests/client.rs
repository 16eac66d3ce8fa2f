//! Every operation of the client, in every serialization, in both modes.

mod support;

use std::time::Duration;

use cache_runtime::{Cache, KeyTtl, Mode};
use serde::{Deserialize, Serialize};
use support::{local_cache, Redis, FORMATS};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Mission {
    id: String,
    priority: u8,
    crew: Vec<String>,
    eta: Option<f64>,
}

fn mission(id: &str) -> Mission {
    Mission { id: id.into(), priority: 3, crew: vec!["ada".into(), "grace".into()], eta: Some(12.5) }
}

async fn exercise(cache: &Cache) {
    let format = cache.config().serialization();
    // get / set / exists
    assert_eq!(cache.get::<Mission>("missions:1").await.unwrap(), None, "{format}");
    assert!(!cache.exists("missions:1").await.unwrap());
    cache.set("missions:1", &mission("1")).await.unwrap();
    assert_eq!(cache.get::<Mission>("missions:1").await.unwrap(), Some(mission("1")), "{format}");
    assert!(cache.exists("missions:1").await.unwrap());

    // scalars and strings round-trip too
    cache.set("counter", &42u64).ttl(60).await.unwrap();
    assert_eq!(cache.get::<u64>("counter").await.unwrap(), Some(42));
    cache.set("name", "apollo").await.unwrap();
    assert_eq!(cache.get::<String>("name").await.unwrap().as_deref(), Some("apollo"));

    // ttl: default, explicit, missing
    match cache.ttl("missions:1").await.unwrap() {
        KeyTtl::Expires(left) => {
            assert!(
                left <= cache.config().default_ttl()
                    && left > cache.config().default_ttl() - Duration::from_secs(5)
            )
        }
        other => panic!("expected an expiry, got {other:?}"),
    }
    cache.set("short", &1u8).ttl(Duration::from_secs(30)).await.unwrap();
    let KeyTtl::Expires(left) = cache.ttl("short").await.unwrap() else { panic!("no expiry") };
    assert!(left > Duration::from_secs(25) && left <= Duration::from_secs(30), "{left:?}");
    assert_eq!(cache.ttl("nothing").await.unwrap(), KeyTtl::Missing);
    assert_eq!(KeyTtl::Missing.as_redis_secs(), -2);

    // delete
    assert!(cache.delete("missions:1").await.unwrap());
    assert!(!cache.delete("missions:1").await.unwrap());
    assert_eq!(cache.get::<Mission>("missions:1").await.unwrap(), None);

    // tags: the seed's `deleted == 2`
    cache.set("missions:1", &mission("1")).ttl(300).tags(["missions"]).await.unwrap();
    cache.set("missions:2", &mission("2")).ttl(300).tags(["missions", "queue"]).await.unwrap();
    cache.set("agents:1", &"agent").ttl(300).tags(["agents"]).await.unwrap();
    assert_eq!(cache.invalidate_tags(["missions"]).await.unwrap(), 2);
    assert_eq!(cache.get::<Mission>("missions:1").await.unwrap(), None);
    assert_eq!(cache.get::<Mission>("missions:2").await.unwrap(), None);
    assert_eq!(cache.get::<String>("agents:1").await.unwrap().as_deref(), Some("agent"));
    assert_eq!(cache.invalidate_tags(["queue", "missions"]).await.unwrap(), 0);

    // patterns
    for i in 0..5 {
        cache.set(&format!("missions:queue:high:{i}"), &i).await.unwrap();
    }
    cache.set("missions:queue:low:0", &0).await.unwrap();
    assert_eq!(cache.delete_pattern("missions:queue:high:*").await.unwrap(), 5);
    assert!(cache.exists("missions:queue:low:0").await.unwrap());
    assert!(cache.delete_pattern("").await.is_err());

    // stats
    let before = cache.stats().await.unwrap();
    cache.get::<u64>("counter").await.unwrap();
    cache.get::<u64>("absent").await.unwrap();
    let stats = cache.stats().await.unwrap();
    assert_eq!(stats.hits, before.hits + 1);
    assert_eq!(stats.misses, before.misses + 1);
    assert!(stats.hit_rate > 0.0 && stats.hit_rate < 1.0);
    // counter, name, short, agents:1, missions:queue:low:0
    assert_eq!(stats.total_keys, 5, "{stats:?}");
    assert_eq!(stats.mode, cache.mode());

    // clear
    assert_eq!(cache.clear().await.unwrap(), 5);
    assert_eq!(cache.stats().await.unwrap().total_keys, 0);
    assert_eq!(cache.get::<u64>("counter").await.unwrap(), None);

    let health = cache.health().await;
    assert_eq!(health.status, "healthy");
    assert_eq!(health.connected, cache.mode() == Mode::Redis);
}

#[tokio::test]
async fn every_operation_in_redis_mode() {
    let redis = Redis::start();
    for format in FORMATS {
        let cache = redis.cache("ops", format).await;
        exercise(&cache).await;
        let stats = cache.stats().await.unwrap();
        assert!(stats.connected);
        assert!(stats.redis_version.as_deref().is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit())));
        assert!(stats.used_memory_bytes.unwrap() > 0);
        assert!(stats.used_memory_human.as_deref().is_some_and(|h| !h.is_empty()));
        assert!(stats.peak_memory_bytes.unwrap() >= stats.used_memory_bytes.unwrap() / 2);
        assert!(stats.connected_clients.unwrap() >= 1);
    }
}

#[tokio::test]
async fn every_operation_in_local_mode() {
    for format in FORMATS {
        let cache = local_cache("ops", format);
        assert_eq!(cache.mode(), Mode::Local);
        exercise(&cache).await;
        let stats = cache.stats().await.unwrap();
        assert!(!stats.connected && stats.redis_version.is_none());
    }
}

#[tokio::test]
async fn entries_expire_in_both_modes() {
    let redis = Redis::start();
    let caches = [redis.cache("expiry", FORMATS[0]).await, local_cache("expiry", FORMATS[1])];
    for cache in &caches {
        cache.set("brief", &"x").ttl(Duration::from_millis(300)).tags(["t"]).await.unwrap();
        assert!(cache.exists("brief").await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    for cache in &caches {
        assert!(!cache.exists("brief").await.unwrap(), "{:?}", cache.mode());
        assert_eq!(cache.get::<String>("brief").await.unwrap(), None);
        assert_eq!(cache.ttl("brief").await.unwrap(), KeyTtl::Missing);
        assert_eq!(cache.invalidate_tags(["t"]).await.unwrap(), 0, "expired keys are not counted");
    }
}

#[tokio::test]
async fn a_key_without_expiry_reports_persistent() {
    let redis = Redis::start();
    let cache = redis.cache("persist", FORMATS[0]).await;
    let mut raw = redis.raw().await;
    let full = format!("{}:forever", cache.config().key_prefix());
    redis::cmd("SET").arg(&full).arg("v").query_async::<()>(&mut raw).await.unwrap();
    assert_eq!(cache.ttl("forever").await.unwrap(), KeyTtl::Persistent);
    assert_eq!(KeyTtl::Persistent.as_redis_secs(), -1);
}

#[tokio::test]
async fn a_value_written_in_one_format_is_read_by_a_cache_set_to_another() {
    let redis = Redis::start();
    let writer = redis.cache("cross", FORMATS[1]).await;
    let prefix = writer.config().key_prefix().to_owned();
    let reader = Cache::new(
        cache_runtime::CacheConfig::builder()
            .redis_url(redis.url())
            .key_prefix(prefix)
            .serialization(FORMATS[0])
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    writer.set("m", &mission("x")).await.unwrap();
    assert_eq!(reader.get::<Mission>("m").await.unwrap(), Some(mission("x")));
}

#[tokio::test]
async fn the_global_cache_is_set_once() {
    let redis = Redis::start();
    let config = redis.config("global").build().unwrap();
    let cache = cache_runtime::init(config.clone()).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
    assert!(std::ptr::eq(cache, cache_runtime::get_cache()));
    assert!(cache_runtime::init(config).await.is_err());
    cache.set("k", &1).await.unwrap();
    assert_eq!(cache_runtime::get_cache().get::<i32>("k").await.unwrap(), Some(1));
}

#[tokio::test]
async fn an_unreachable_redis_at_start_means_local_mode() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = cache_runtime::CacheConfig::builder()
        .redis_url(format!("redis://127.0.0.1:{port}/0"))
        .socket_connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let cache = Cache::new(config).await.unwrap();
    assert_eq!(cache.mode(), Mode::Local);
    cache.set("k", &"still works").await.unwrap();
    assert_eq!(cache.get::<String>("k").await.unwrap().as_deref(), Some("still works"));
    let health = cache.health().await;
    assert_eq!((health.status, health.connected), ("degraded", false));
    assert_eq!(health.breaker, cache_runtime::BreakerState::Open);
}

#[tokio::test]
async fn a_malformed_url_is_a_config_error() {
    let config = cache_runtime::CacheConfig::builder().redis_url("http://nope").build().unwrap();
    let err = Cache::new(config).await.unwrap_err();
    assert!(matches!(err, cache_runtime::CacheError::Config { .. }), "{err}");
}

#[tokio::test]
async fn a_tls_url_needs_the_tls_feature_and_never_shows_its_password() {
    // Nothing listens on port 1: with the feature, the URL is taken and the connect fails.
    let config = cache_runtime::CacheConfig::builder()
        .redis_url("rediss://app:hunter2@127.0.0.1:1/0")
        .build()
        .unwrap();
    match (cfg!(feature = "tls"), Cache::new(config).await) {
        (false, Err(err)) => {
            let text = err.to_string();
            assert!(matches!(err, cache_runtime::CacheError::Config { .. }), "{err}");
            assert!(text.contains("enable the `tls` feature") && text.contains("`url`"), "{text}");
            assert!(!text.contains("hunter2"), "{text}");
        }
        (true, Ok(cache)) => {
            assert_eq!(cache.mode(), cache_runtime::Mode::Local);
            assert!(!format!("{cache:?}").contains("hunter2"));
        }
        (built, other) => panic!("with the `tls` feature {built}: {other:?}"),
    }
}

#[tokio::test]
async fn warming_writes_in_batches_and_can_be_turned_off() {
    let redis = Redis::start();
    let config = redis.config("warm").warmup(100, 2).build().unwrap();
    for cache in [Cache::new(config.clone()).await.unwrap(), Cache::local(config)] {
        let entries = (0..250).map(|i| (format!("agents:{i}"), mission(&i.to_string())));
        let written = cache.warm(entries, Some(Duration::from_secs(600)), &["agents"]).await.unwrap();
        assert_eq!(written, 250, "{:?}", cache.mode());
        assert_eq!(cache.get::<Mission>("agents:249").await.unwrap(), Some(mission("249")));
        assert_eq!(cache.invalidate_tags(["agents"]).await.unwrap(), 250);
        assert!(cache.metrics().render().contains("cache_warmup_duration_seconds_count 1"));
    }
    let off = Cache::local(redis.config("warm_off").warmup_enabled(false).build().unwrap());
    assert_eq!(off.warm([("k", 1)], None, &[]).await.unwrap(), 0);
    assert!(!off.exists("k").await.unwrap());
}
