//! Two tiers across instances in one process: the near tier serves from
//! memory, every invalidation any instance makes reaches the others' near
//! tiers over the bus, a lost listener stops the near tier from serving, the
//! fleet lease runs a cold key's body once across instances, and events reach
//! every instance's handlers. `tests/replicas.rs` does the same across OS processes.

mod support;

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::{cached, Cache, CacheConfigBuilder, Event};
use redis::AsyncCommands;
use support::{eventually, unique_prefix, Redis};

/// `count` caches on `redis` sharing one prefix, built by `configure`, each
/// listening on the bus before it is returned.
async fn instances(
    redis: &Redis,
    name: &str,
    count: usize,
    configure: fn(CacheConfigBuilder) -> CacheConfigBuilder,
) -> Vec<Cache> {
    let prefix = unique_prefix(name);
    let mut caches = Vec::new();
    for _ in 0..count {
        let builder = cache_runtime::CacheConfig::builder().redis_url(redis.url()).key_prefix(prefix.clone());
        let cache = Cache::new(configure(builder).build().unwrap()).await.unwrap();
        listening(&cache).await;
        caches.push(cache);
    }
    caches
}

fn near(builder: CacheConfigBuilder) -> CacheConfigBuilder {
    builder.near_cache(true)
}

async fn listening(cache: &Cache) {
    eventually("the bus listener subscribes", || async { cache.stats().await.unwrap().bus_listening }).await;
}

async fn read(cache: &Cache, key: &str, value: u32, runs: &AtomicU32) -> u32 {
    cache
        .get_with(key, async {
            runs.fetch_add(1, SeqCst);
            value
        })
        .tags(["t"])
        .await
}

/// Reads `key` until it no longer returns `old`, then until it is cached
/// again (one fill per shard may be refused right after another instance's
/// invalidation, until this instance sees the newer fence); never `old` again.
async fn fresh(cache: &Cache, key: &str, old: u32, runs: &AtomicU32) -> u32 {
    let next = || runs.load(SeqCst) + 100;
    eventually("an invalidation is heard", || async { read(cache, key, next(), runs).await != old }).await;
    let mut last = read(cache, key, next(), runs).await;
    loop {
        assert_ne!(last, old, "the old value came back");
        let now = read(cache, key, next(), runs).await;
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test]
async fn a_near_hit_is_served_from_memory_and_an_invalidation_anywhere_reaches_it() {
    let redis = Redis::start();
    let [writer, reader] = <[Cache; 2]>::try_from(instances(&redis, "near", 2, near).await).unwrap();
    let runs = AtomicU32::new(0);
    assert_eq!(read(&reader, "k", 1, &runs).await, 1);
    assert_eq!(read(&reader, "k", 2, &runs).await, 1, "a hit");
    let near_hits = reader.stats().await.unwrap().near_cache_hits;
    assert!(near_hits >= 1, "the second read was a near hit");

    // The control: deleted behind the cache's back, with no message, the
    // near tier keeps serving what it holds. Only the bus keeps it coherent.
    let mut raw = redis.raw().await;
    let full = format!("{}:k", reader.config().key_prefix());
    let deleted: u32 = raw.del(&full).await.unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(read(&reader, "k", 2, &runs).await, 1, "the near tier did not hear of a raw DEL");

    // Through the cache, on another instance: the reader's near tier drops it.
    writer.set("k", &3u32).await.unwrap();
    eventually("the reader sees the writer's set", || async { read(&reader, "k", 9, &runs).await == 3 })
        .await;
    assert_eq!(read(&reader, "k", 9, &runs).await, 3, "and never the old value again");

    assert!(writer.delete("k").await.unwrap());
    let value = fresh(&reader, "k", 3, &runs).await;
    assert_eq!(read(&reader, "k", 5, &runs).await, value);
}

#[tokio::test]
async fn tags_patterns_and_clear_reach_every_near_tier() {
    let redis = Redis::start();
    let [writer, reader] = <[Cache; 2]>::try_from(instances(&redis, "near_kinds", 2, near).await).unwrap();
    let runs = AtomicU32::new(0);
    type Invalidation = fn(&Cache) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>;
    let kinds: [(&str, Invalidation); 3] = [
        ("tags", |c| Box::pin(async move { c.invalidate_tags(["t"]).await.map(drop).unwrap() })),
        ("pattern", |c| Box::pin(async move { c.delete_pattern("pat*").await.map(drop).unwrap() })),
        ("clear", |c| Box::pin(async move { c.clear().await.map(drop).unwrap() })),
    ];
    for (kind, invalidate) in kinds {
        let old = read(&reader, "pat1", 1, &runs).await;
        let hits = reader.stats().await.unwrap().near_cache_hits;
        assert_eq!(read(&reader, "pat1", 2, &runs).await, old, "{kind}: cached");
        assert_eq!(reader.stats().await.unwrap().near_cache_hits, hits + 1, "{kind}: a near hit");
        invalidate(&writer).await;
        fresh(&reader, "pat1", old, &runs).await;
    }
}

#[tokio::test]
async fn a_lost_listener_stops_the_near_tier_until_it_is_subscribed_again() {
    let redis = Redis::spawn();
    let [writer, reader] = <[Cache; 2]>::try_from(instances(&redis, "near_lost", 2, near).await).unwrap();
    let runs = AtomicU32::new(0);
    assert_eq!(read(&reader, "k", 1, &runs).await, 1);
    let mut raw = redis.raw().await;

    // Killed, the listener may miss the delete: the reader must not serve its
    // near copy afterwards, whether it reconnected before the delete or after.
    let killed: u32 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut raw).await.unwrap();
    assert!(killed >= 2, "both listeners were killed");
    assert!(writer.delete("k").await.unwrap());
    let _: () = raw.del(format!("{}:k", reader.config().key_prefix())).await.unwrap();
    listening(&reader).await;
    let value = fresh(&reader, "k", 1, &runs).await;
    let hits = reader.stats().await.unwrap().near_cache_hits;
    assert_eq!(read(&reader, "k", 3, &runs).await, value);
    assert!(reader.stats().await.unwrap().near_cache_hits > hits, "resubscribed, the near tier serves again");

    // A restart loses every subscription and every message meanwhile.
    let mut redis = redis;
    redis.restart();
    eventually("the reader hears the restart", || async { !reader.stats().await.unwrap().bus_listening })
        .await;
    listening(&reader).await;
    listening(&writer).await;
    let runs_before = runs.load(SeqCst);
    assert_eq!(
        read(&reader, "k", 4, &runs).await,
        4,
        "nothing near survived the restart; Redis lost the entry"
    );
    assert_eq!(runs.load(SeqCst), runs_before + 1);
}

#[tokio::test]
async fn a_cold_key_runs_its_body_once_across_instances() {
    let redis = Redis::start();
    for (lease, expected) in [(true, 1), (false, 4)] {
        let caches =
            instances(&redis, "lease", 4, if lease { |b| b } else { |b| b.fleet_lease(false) }).await;
        let runs = Arc::new(AtomicU32::new(0));
        let mut calls = Vec::new();
        for cache in &caches {
            for _ in 0..50 {
                let (cache, runs) = (cache.clone(), runs.clone());
                calls.push(tokio::spawn(async move {
                    cache
                        .get_with("cold", async {
                            runs.fetch_add(1, SeqCst);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            7u32
                        })
                        .await
                }));
            }
        }
        for call in calls {
            assert_eq!(call.await.unwrap(), 7);
        }
        // The control (no lease) shows the test can fail: one run per instance.
        assert_eq!(runs.load(SeqCst), expected, "fleet_lease = {lease}");
    }
}

#[tokio::test]
async fn a_dropped_holder_lets_the_others_go_at_once() {
    let redis = Redis::start();
    let [holder, waiter] = <[Cache; 2]>::try_from(
        instances(&redis, "lease_drop", 2, |b| b.fleet_lease_ttl(Duration::from_secs(30))).await,
    )
    .unwrap();
    let started = Arc::new(tokio::sync::Notify::new());
    let call = {
        let (holder, started) = (holder.clone(), started.clone());
        tokio::spawn(async move {
            holder
                .get_with("k", async {
                    started.notify_one();
                    std::future::pending::<u32>().await
                })
                .await
        })
    };
    started.notified().await;
    let began = Instant::now();
    let waiting = tokio::spawn(async move { waiter.get_with("k", async { 5u32 }).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "the waiter waits for the holder");
    call.abort();
    assert_eq!(waiting.await.unwrap(), 5);
    // Released on drop, not expired: far less than the lease's 30 s.
    assert!(began.elapsed() < Duration::from_secs(20), "took {:?}", began.elapsed());
}

#[cached(near = true, cache = support::current(), prefix = "mission", skip = [runs])]
async fn mission(id: u32, runs: &AtomicU32) -> u32 {
    runs.fetch_add(1, SeqCst);
    id * 10 + runs.load(SeqCst)
}

#[tokio::test]
async fn the_near_option_opts_one_function_in() {
    let redis = Redis::start();
    let [writer, reader] = <[Cache; 2]>::try_from(instances(&redis, "near_opt", 2, |b| b).await).unwrap();
    let runs = AtomicU32::new(0);
    let first = support::CURRENT.scope(reader.clone(), mission(1, &runs)).await;
    let hits = reader.stats().await.unwrap().near_cache_hits;
    assert_eq!(support::CURRENT.scope(reader.clone(), mission(1, &runs)).await, first);
    assert_eq!(reader.stats().await.unwrap().near_cache_hits, hits + 1, "a near hit");
    support::CURRENT.scope(writer.clone(), mission_invalidate(1)).await.unwrap();
    eventually("the reader hears the invalidation", || async {
        support::CURRENT.scope(reader.clone(), mission(1, &runs)).await != first
    })
    .await;
}

#[tokio::test]
async fn events_reach_the_handlers_of_every_instance() {
    let redis = Redis::start();
    let caches = instances(&redis, "events", 3, |b| b).await;
    let heard = Arc::new(AtomicU32::new(0));
    for cache in &caches {
        let (heard, handle) = (heard.clone(), cache.clone());
        cache.on_event("quantum_state_updated", move |event: Event| {
            let (heard, cache) = (heard.clone(), handle.clone());
            async move {
                assert_eq!(event.context["state"], 7);
                cache.delete_pattern("quantum_state:*").await.unwrap();
                heard.fetch_add(1, SeqCst);
            }
        });
    }
    caches[0].set("quantum_state:1", &1u32).await.unwrap();
    caches[1].emit("quantum_state_updated", serde_json::json!({ "state": 7 })).await.unwrap();
    eventually("every handler ran", || async { heard.load(SeqCst) == 3 }).await;
    assert_eq!(caches[2].get::<u32>("quantum_state:1").await.unwrap(), None, "a handler invalidated it");
    caches[1].emit("nobody_listens", ()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(heard.load(SeqCst), 3, "each event runs each handler once per instance");
}

#[tokio::test]
async fn a_listener_whose_heartbeat_stops_is_deaf_though_its_socket_stays_open() {
    let redis = Redis::spawn();
    let [reader] = <[Cache; 1]>::try_from(
        instances(&redis, "near_paused", 1, |b| near(b).operation_timeout(Duration::from_millis(100))).await,
    )
    .unwrap();
    let runs = AtomicU32::new(0);
    assert_eq!(read(&reader, "k", 1, &runs).await, 1);
    // SIGSTOP: every socket stays open, nothing is answered or delivered.
    redis.pause();
    eventually("the near tier stops serving", || async { !reader.stats().await.unwrap().bus_listening })
        .await;
    let hits = reader.stats().await.unwrap().near_cache_hits;
    read(&reader, "k", 2, &runs).await;
    assert_eq!(reader.stats().await.unwrap().near_cache_hits, hits, "nothing served near while deaf");
    redis.resume();
    listening(&reader).await;
}

#[tokio::test]
async fn an_invalidation_deferred_behind_a_partition_reaches_the_others_when_it_heals() {
    let redis = Redis::spawn();
    let proxy = support::proxy::Proxy::start(redis.port()).await;
    let prefix = unique_prefix("near_partition");
    let build = |url: String| {
        cache_runtime::CacheConfig::builder()
            .redis_url(url)
            .key_prefix(prefix.clone())
            .near_cache(true)
            .operation_timeout(Duration::from_millis(100))
            .circuit_breaker_threshold(1)
            .build()
            .unwrap()
    };
    let cut_off = Cache::new(build(proxy.url())).await.unwrap();
    let reader = Cache::new(build(redis.url().to_owned())).await.unwrap();
    listening(&reader).await;
    let runs = AtomicU32::new(0);
    assert_eq!(read(&reader, "k", 1, &runs).await, 1);

    // Only the invalidating instance loses Redis: its delete is queued, not applied.
    proxy.set(support::proxy::Fault::BlackHole);
    let deferred = cut_off.delete("k").await;
    assert!(matches!(deferred, Err(cache_runtime::CacheError::Deferred(_))), "{deferred:?}");
    assert_eq!(
        read(&reader, "k", 2, &runs).await,
        1,
        "not applied anywhere yet: the old value is still the value"
    );

    // Healed, the replay applies it to Redis and tells the reader's near tier.
    proxy.set(support::proxy::Fault::None);
    let value = fresh(&reader, "k", 1, &runs).await;
    assert_ne!(value, 1);
    assert_eq!(cut_off.stats().await.unwrap().pending_invalidations, 0);
}
