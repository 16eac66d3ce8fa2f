//! Redis Sentinel: the cache follows the master through a failover without
//! an error reaching a caller, and a master demoted behind the cache's back
//! loses its connections at the first READONLY.

mod support;

use support::load;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::{Cache, CacheConfig, CacheError, Mode};
use support::sentinel::SentinelSet;
use support::{unique_prefix, Redis};

/// `total_connections_received` of the server, counting the connection that asks.
async fn connections_made(redis: &Redis) -> u64 {
    let mut raw = redis.raw().await;
    let info: String = redis::cmd("INFO").arg("stats").query_async(&mut raw).await.unwrap();
    info.lines().find_map(|l| l.strip_prefix("total_connections_received:")).unwrap().trim().parse().unwrap()
}

/// From the master's death to hits on the new one: 500 ms until it is down,
/// up to a second of the sentinel's desync delay, the promotion, a reconnect
/// backoff and a breaker timeout, with room for a loaded machine.
const FAILOVER: Duration = Duration::from_secs(20);

fn config(url: &str) -> CacheConfig {
    CacheConfig::builder()
        .redis_url(url)
        .key_prefix(unique_prefix("sentinel"))
        .operation_timeout(Duration::from_millis(200))
        .socket_connect_timeout(Duration::from_millis(500))
        .health_check_interval(Duration::from_millis(100))
        .circuit_breaker_timeout(Duration::from_millis(300))
        .build()
        .unwrap()
}

async fn keys_on(port: u16, pattern: &str) -> Vec<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS").arg(pattern).query_async(&mut raw).await.unwrap()
}

#[tokio::test]
async fn the_cache_follows_the_master_through_a_failover() {
    let mut set = SentinelSet::start();
    let (old_master, replica) = (set.master.port(), set.replica.port());
    assert_eq!(set.master_port(), old_master);
    let config = config(&set.url());
    let prefix = config.key_prefix().to_owned();
    let cache = Cache::new(config).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);

    let runs = AtomicU32::new(0);
    load(&cache, "before", &runs).await;
    load(&cache, "before", &runs).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "a hit");
    // The master the sentinel named took the fill, and its replica has it too.
    assert_eq!(keys_on(old_master, &format!("{prefix}:*")).await.len(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while keys_on(replica, &format!("{prefix}:*")).await.is_empty() {
        assert!(Instant::now() < deadline, "the fill never reached the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let killed = Instant::now();
    set.master.kill();
    // Through the failover every call returns its body's result, and an
    // invalidation is applied or queued, never refused.
    let mut i = 0;
    while set.master_port() != replica {
        assert!(killed.elapsed() < FAILOVER, "no promotion; the sentinel's log:\n{}", set.sentinel_log());
        let key = format!("during:{}", i % 5);
        assert_eq!(load(&cache, &key, &runs).await, format!("value of {key}"));
        if i == 3 {
            match cache.invalidate_tags(["t"]).await {
                Ok(_) | Err(CacheError::Deferred(_)) => {}
                Err(e) => panic!("an invalidation during the failover failed: {e}"),
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Hits resume against the new master.
    let resumed = loop {
        assert!(killed.elapsed() < FAILOVER, "no hits on the new master: {:?}", cache.health().await);
        let before = runs.load(Ordering::SeqCst);
        assert_eq!(load(&cache, "after", &runs).await, "value of after");
        assert_eq!(load(&cache, "after", &runs).await, "value of after");
        let hit = runs.load(Ordering::SeqCst) - before <= 1 && cache.mode() == Mode::Redis;
        if hit && !keys_on(replica, &format!("{prefix}:after")).await.is_empty() {
            break killed.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("hits on the new master {resumed:?} after the old one was killed");
    assert_eq!(cache.health().await.status, "healthy");

    // What the old master held (replicated before the kill) is not served.
    let before = runs.load(Ordering::SeqCst);
    load(&cache, "before", &runs).await;
    assert_eq!(runs.load(Ordering::SeqCst), before + 1, "an entry from before the failover was served");

    // An invalidation made now is applied by the new master, and stays applied.
    assert!(cache.invalidate_tags(["t"]).await.unwrap() >= 1);
    assert!(keys_on(replica, &format!("{prefix}:after")).await.is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = runs.load(Ordering::SeqCst);
    load(&cache, "after", &runs).await;
    assert_eq!(runs.load(Ordering::SeqCst), before + 1, "the invalidated entry came back");
    // Control: the refill is a hit again.
    load(&cache, "after", &runs).await;
    assert_eq!(runs.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn a_master_name_the_sentinel_does_not_watch_is_refused_at_start() {
    let set = SentinelSet::start();
    let url = format!("redis+sentinel://127.0.0.1:{}/not-watched", set.sentinel_port());
    // A setting the sentinel shows to be wrong is no outage: the error names it.
    match Cache::new(config(&url)).await {
        Err(cache_runtime::CacheError::Config { key, .. }) => assert_eq!(key, "master_name"),
        other => panic!("expected a config error naming master_name, got {:?}", other.map(|c| c.mode())),
    }
    // Control: the watched name reaches Redis.
    let cache = Cache::new(config(&set.url())).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
}

#[tokio::test]
async fn a_master_demoted_behind_the_cache_s_back_loses_its_connection_at_the_first_readonly() {
    let set = SentinelSet::start();
    let cache = Cache::new(config(&set.url())).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
    cache.set("k", &1u32).await.unwrap();

    // Control: an error Redis answers that says nothing of the server's role
    // keeps the connection.
    let mut raw = set.master.raw().await;
    let wrongtype = format!("{}:wrongtype", cache.config().key_prefix());
    let _: () = redis::cmd("HSET").arg(&wrongtype).arg("f").arg("v").query_async(&mut raw).await.unwrap();
    let made = connections_made(&set.master).await;
    assert_eq!(cache.get::<u32>("wrongtype").await.unwrap(), None, "another type is a miss");
    assert_eq!(connections_made(&set.master).await, made + 1, "only the count's own connection");

    // Demoted without its clients being dropped (as the sentinel would): writes answer READONLY.
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(set.replica.port())
        .query_async(&mut set.master.raw().await)
        .await
        .unwrap();
    let made = connections_made(&set.master).await;
    let err = cache.set("k", &2u32).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains("demoted"), "{err}");
    // The reconnect asks the sentinel, which still names this server: it is
    // connected to, found to be a replica, and left.
    let deadline = Instant::now() + Duration::from_secs(5);
    while connections_made(&set.master).await < made + 3 {
        assert!(Instant::now() < deadline, "the READONLY connection was kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An invalidation meanwhile is queued, not refused.
    match cache.delete("k").await {
        Ok(_) | Err(CacheError::Deferred(_)) => {}
        Err(e) => panic!("{e:?}"),
    }
}
