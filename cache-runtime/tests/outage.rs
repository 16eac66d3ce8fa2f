//! Redis failing under the cache: the breaker, fallback, recovery, and no stale
//! reads after invalidations made while Redis was away.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::__private::{
    always, get_or_compute, Attached, Call, KeyBuilder, Plain, Sharing, Spec, Tags,
};
use cache_runtime::{BreakerState, Cache, CacheConfigBuilder, CacheError, Mode};
use redis::AsyncCommands;
use support::proxy::{Fault, Proxy};
use support::{unique_prefix, Redis};

const SPEC: Spec = Spec::named("load").with_prefix("load");
const OP_TIMEOUT: Duration = Duration::from_millis(150);
const BREAKER_TIMEOUT: Duration = Duration::from_millis(400);
const HEALTH_EVERY: Duration = Duration::from_millis(100);
/// Generous bound for "Redis is back": breaker timeout, a health tick, and a
/// reconnect backoff (at most 2 s) with room for a loaded machine. The outage
/// example measures the real figure.
const RECOVERY: Duration = Duration::from_secs(8);

fn config(url: &str) -> CacheConfigBuilder {
    cache_runtime::CacheConfig::builder()
        .redis_url(url)
        .key_prefix(unique_prefix("outage"))
        .operation_timeout(OP_TIMEOUT)
        .socket_connect_timeout(OP_TIMEOUT)
        .circuit_breaker_threshold(5)
        .circuit_breaker_timeout(BREAKER_TIMEOUT)
        .health_check_interval(HEALTH_EVERY)
}

async fn cache_on(url: &str) -> Cache {
    let cache = Cache::new(config(url).build().unwrap()).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
    cache
}

async fn load(cache: &Cache, id: u32, runs: &AtomicU32) -> String {
    let mut key = KeyBuilder::new(cache, &SPEC);
    key.arg(&id);
    let call = Call { cache, spec: &SPEC, key: key.finish() };
    get_or_compute::<Plain, _, _, _, _, _>(
        call,
        always,
        Sharing::none(),
        Sharing::none(),
        Attached,
        move || {
            (Tags::Static(&["load"]), async move {
                runs.fetch_add(1, Ordering::SeqCst);
                format!("value {id}")
            })
        },
    )
    .await
}

async fn wait_for_mode(cache: &Cache, mode: Mode, within: Duration) -> Duration {
    let started = Instant::now();
    while cache.mode() != mode {
        assert!(started.elapsed() < within, "still {:?} after {within:?}", cache.mode());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn the_breaker_opens_at_exactly_the_threshold() {
    let redis = Redis::spawn();
    let proxy = Proxy::start(redis.port()).await;
    // No background checks here: only the calls below may count as failures.
    let config = config(&proxy.url()).health_check_interval(Duration::from_secs(3600)).build().unwrap();
    let cache = Cache::new(config).await.unwrap();
    cache.set("k", &1u32).await.unwrap();
    proxy.set(Fault::Reset);
    for failure in 1..=5 {
        assert!(cache.get::<u32>("k").await.is_err(), "failure {failure} must surface as an error");
        let expected = if failure < 5 { Mode::Redis } else { Mode::Local };
        assert_eq!(cache.mode(), expected, "after {failure} failures");
    }
    assert_eq!(cache.breaker_state(), BreakerState::Open);
    assert_eq!(cache.stats().await.unwrap().breaker_opened, 1);
    // While open, no call reaches Redis, so none can fail.
    for _ in 0..20 {
        cache.get::<u32>("k").await.unwrap();
    }
    assert_eq!(cache.stats().await.unwrap().breaker_opened, 1);
    // After the timeout one call probes; Redis is back, so it closes the breaker.
    proxy.set(Fault::None);
    tokio::time::sleep(BREAKER_TIMEOUT + Duration::from_millis(50)).await;
    let mut probed = false;
    for _ in 0..400 {
        if cache.get::<u32>("k").await.is_ok() && cache.mode() == Mode::Redis {
            probed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(probed, "traffic did not close the breaker: {:?}", cache.breaker_state());
    assert_eq!(cache.get::<u32>("k").await.unwrap(), Some(1));
}

#[tokio::test]
async fn a_killed_redis_opens_the_breaker_and_a_restart_closes_it() {
    let mut redis = Redis::spawn();
    let cache = cache_on(redis.url()).await;
    cache.set("k", &1u32).await.unwrap();
    redis.kill();
    while cache.mode() == Mode::Redis {
        let _ = cache.get::<u32>("k").await;
    }
    assert_eq!(cache.breaker_state(), BreakerState::Open);
    // Open: calls use the local tier and succeed.
    assert_eq!(cache.get::<u32>("k").await.unwrap(), None);
    cache.set("k", &2u32).await.unwrap();
    assert_eq!(cache.get::<u32>("k").await.unwrap(), Some(2));
    let stats = cache.stats().await.unwrap();
    assert_eq!((stats.mode, stats.breaker, stats.breaker_opened), (Mode::Local, BreakerState::Open, 1));
    assert!(!cache.health().await.connected);

    redis.restart();
    let took = wait_for_mode(&cache, Mode::Redis, RECOVERY).await;
    assert!(took < RECOVERY, "recovery took {took:?}");
    // The local tier's outage entries are gone: Redis is the truth again.
    assert_eq!(cache.get::<u32>("k").await.unwrap(), None);
    assert!(cache.health().await.connected);
}

#[tokio::test]
async fn invalidations_made_during_an_outage_reach_redis_before_it_serves_again() {
    let redis = Redis::spawn();
    let proxy = Proxy::start(redis.port()).await;
    let cache = cache_on(&proxy.url()).await;
    let raw = redis.raw().await;
    let runs = AtomicU32::new(0);
    for id in 0..4 {
        load(&cache, id, &runs).await;
    }
    cache.set("plain:1", &"v").await.unwrap();
    cache.set("queue:1", &"v").await.unwrap();
    let prefix = cache.config().key_prefix().to_owned();
    let in_redis = |key: String| {
        let mut raw = raw.clone();
        async move { raw.exists::<_, bool>(key).await.unwrap() }
    };
    assert!(in_redis(format!("{prefix}:plain:1")).await);

    proxy.set(Fault::Reset);
    while cache.mode() == Mode::Redis {
        let _ = cache.get::<String>("plain:1").await;
    }
    // Each kind of invalidation, while Redis can't hear it: queued, and said so.
    let queued = |r: Result<u64, CacheError>| assert!(matches!(r, Err(CacheError::Deferred(_))), "{r:?}");
    queued(cache.delete("plain:1").await.map(u64::from));
    queued(cache.delete_pattern("queue:*").await);
    queued(cache.invalidate_tags(["load"]).await);
    assert!(cache.stats().await.unwrap().pending_invalidations >= 3);
    // Served locally meanwhile; the local fill is never written back.
    assert_eq!(load(&cache, 9, &runs).await, "value 9");

    proxy.set(Fault::None);
    wait_for_mode(&cache, Mode::Redis, RECOVERY).await;
    assert_eq!(cache.stats().await.unwrap().pending_invalidations, 0);
    assert!(!in_redis(format!("{prefix}:plain:1")).await, "a key deleted during the outage came back");
    assert!(!in_redis(format!("{prefix}:queue:1")).await, "a pattern deleted during the outage came back");
    for id in 0..4 {
        let mut k = KeyBuilder::new(&cache, &SPEC);
        k.arg(&id);
        assert!(
            !in_redis(format!("{prefix}:{}", k.finish().relative())).await,
            "a tagged key survived the outage"
        );
    }
    let mut k9 = KeyBuilder::new(&cache, &SPEC);
    k9.arg(&9u32);
    assert!(
        !in_redis(format!("{prefix}:{}", k9.finish().relative())).await,
        "an outage fill was written back"
    );
}

#[tokio::test]
async fn a_paused_redis_costs_a_caller_at_most_the_operation_timeout() {
    let redis = Redis::spawn();
    let cache = cache_on(redis.url()).await;
    let runs = AtomicU32::new(0);
    load(&cache, 1, &runs).await;
    redis.pause();
    let mut worst = Duration::ZERO;
    for id in 0..8 {
        let started = Instant::now();
        assert_eq!(load(&cache, id, &runs).await, format!("value {id}"));
        worst = worst.max(started.elapsed());
    }
    redis.resume();
    // Bounded, not fast: a generous multiple of the timeout proves nothing hangs.
    assert!(worst < OP_TIMEOUT * 4, "a call took {worst:?} with the timeout at {OP_TIMEOUT:?}");
    assert_eq!(cache.mode(), Mode::Local, "five timeouts open the breaker");
}

#[tokio::test]
async fn a_lone_command_on_a_stopped_redis_times_out_without_other_traffic() {
    // Small commands carry no timer: the connection watchdog must notice a
    // single stuck command on an otherwise idle cache, and say it timed out.
    let redis = Redis::spawn();
    let cache =
        Cache::new(config(redis.url()).circuit_breaker_enabled(false).build().unwrap()).await.unwrap();
    cache.set("k", &1u32).await.unwrap();
    redis.pause();
    let started = Instant::now();
    let got = cache.get::<u32>("k").await;
    let took = started.elapsed();
    redis.resume();
    assert!(matches!(got, Err(CacheError::Timeout(_))), "{got:?}");
    // The timeout plus a watchdog tick or two, with room for a busy machine.
    assert!(took < OP_TIMEOUT * 3, "the stuck command took {took:?} with the timeout at {OP_TIMEOUT:?}");
    // The connection was replaced: the next command is answered.
    assert_eq!(read_once_reconnected(&cache, "k", 50).await, Some(1));
}

/// `key`'s value once a read succeeds, trying every 20 ms at most `tries` times.
async fn read_once_reconnected(cache: &Cache, key: &str, tries: u32) -> Option<u32> {
    for _ in 0..tries {
        if let Ok(v) = cache.get::<u32>(key).await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn a_black_hole_and_a_cut_reply_never_return_wrong_data() {
    let redis = Redis::spawn();
    let proxy = Proxy::start(redis.port()).await;
    let cache =
        Cache::new(config(&proxy.url()).circuit_breaker_enabled(false).build().unwrap()).await.unwrap();
    for i in 0..20u32 {
        cache.set(&format!("k{i}"), &i).await.unwrap();
    }
    for fault in [Fault::BlackHole, Fault::CutReply] {
        proxy.set(fault);
        for i in 0..5u32 {
            let r = cache.get::<u32>(&format!("k{i}")).await;
            assert!(r.is_err() || r.as_ref().unwrap() == &Some(i), "{fault:?}: {r:?}");
        }
        proxy.set(Fault::None);
        // After the fault, every key reads its own value: no reply is matched to another request.
        let mut ok = 0;
        for _ in 0..50 {
            for i in 0..20u32 {
                match cache.get::<u32>(&format!("k{i}")).await {
                    Ok(v) => {
                        assert_eq!(v, Some(i), "{fault:?}: key k{i} read another key's value");
                        ok += 1;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            if ok >= 20 {
                break;
            }
        }
        assert!(ok >= 20, "{fault:?}: the cache did not reconnect");
    }
}

#[tokio::test]
async fn client_kill_is_survived() {
    let redis = Redis::spawn();
    let cache = cache_on(redis.url()).await;
    cache.set("k", &7u32).await.unwrap();
    let mut raw = redis.raw().await;
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(read_once_reconnected(&cache, "k", 20).await, Some(7));
    assert_eq!(cache.mode(), Mode::Redis);
}

#[tokio::test]
async fn out_of_memory_keeps_reads_and_invalidations_working() {
    let redis = Redis::spawn();
    let cache = cache_on(redis.url()).await;
    let mut raw = redis.raw().await;
    let runs = AtomicU32::new(0);
    load(&cache, 1, &runs).await;
    cache.set("kept", &"before").await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1").query_async(&mut raw).await.unwrap();

    let err = cache.set("new", &"x").await.unwrap_err();
    assert!(err.to_string().to_lowercase().contains("oom") || err.to_string().contains("memory"), "{err}");
    assert_eq!(cache.get::<String>("kept").await.unwrap().as_deref(), Some("before"));
    assert_eq!(load(&cache, 1, &runs).await, "value 1");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "reads still hit");
    assert_eq!(load(&cache, 2, &runs).await, "value 2", "a failed fill still serves the body's result");
    assert!(cache.delete("kept").await.unwrap());
    assert_eq!(cache.mode(), Mode::Redis, "OOM is Redis answering: the breaker stays closed");
    assert_eq!(cache.breaker_state(), BreakerState::Closed);
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0").query_async(&mut raw).await.unwrap();
}

#[tokio::test]
async fn a_read_only_replica_serves_reads_and_keeps_the_breaker_closed() {
    let redis = Redis::spawn();
    let cache = cache_on(redis.url()).await;
    cache.set("k", &1u8).await.unwrap();
    let mut raw = redis.raw().await;
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _: () = redis::cmd("REPLICAOF").arg("127.0.0.1").arg(dead_port).query_async(&mut raw).await.unwrap();
    // A replica that lost its master keeps its data and answers reads.
    assert_eq!(cache.get::<u8>("k").await.unwrap(), Some(1));
    let err = cache.set("k", &2u8).await.unwrap_err();
    assert!(err.to_string().contains("READONLY") || err.to_string().contains("read"), "{err}");
    assert_eq!(cache.breaker_state(), BreakerState::Closed);
    let _: () = redis::cmd("REPLICAOF").arg("NO").arg("ONE").query_async(&mut raw).await.unwrap();
    cache.set("k", &3u8).await.unwrap();
    assert_eq!(cache.get::<u8>("k").await.unwrap(), Some(3));
}

#[tokio::test]
async fn a_key_of_another_redis_type_is_a_miss() {
    let redis = Redis::spawn();
    let cache = cache_on(redis.url()).await;
    let mut raw = redis.raw().await;
    let _: () = raw.lpush(format!("{}:list", cache.config().key_prefix()), "x").await.unwrap();
    assert_eq!(cache.get::<String>("list").await.unwrap(), None);
    assert_eq!(cache.mode(), Mode::Redis);
}
