//! Big values travel on a connection of their own, under a timeout that grows
//! with their size, stored as a pointer and a body.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use cache_runtime::{Cache, Mode, Serialization};
use redis::AsyncCommands;
use support::Redis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_big_hits_time_nothing_out_and_trip_no_breaker() {
    let redis = Redis::start();
    // Correctness under concurrency, with room for a loaded debug build: the
    // figure at the default 250 ms timeout, and its control, are the
    // `big_values` example's (`--big-value-bytes 100000000` turns the bulk
    // connection off). `CACHE_BIG_VALUE_BYTES` does the same here.
    let big_value_bytes = std::env::var("CACHE_BIG_VALUE_BYTES").map_or(64 << 10, |v| v.parse().unwrap());
    let config = redis
        .config("big_hits")
        .operation_timeout(std::time::Duration::from_secs(1))
        .big_value_bytes(big_value_bytes)
        // Decoding is a copy: the executor is not what makes the replies late.
        .serialization(Serialization::Binary)
        .build()
        .unwrap();
    let cache = Cache::new(config).await.unwrap();
    let big = "b".repeat(4 << 20);
    let runs = Arc::new(AtomicU32::new(0));
    let load = |big: String, runs: Arc<AtomicU32>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        big
    };
    cache.get_with("big", load(big.clone(), runs.clone())).ttl(600).await;
    for _ in 0..3 {
        let hits: Vec<_> = (0..32)
            .map(|_| {
                let (cache, big, runs) = (cache.clone(), big.clone(), runs.clone());
                tokio::spawn(async move { cache.get_with("big", load(big, runs)).ttl(600).await.len() })
            })
            .collect();
        let smalls: Vec<_> = (0..64)
            .map(|i| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get_with(&format!("small:{}", i % 8), async { 1u8 }).await })
            })
            .collect();
        for h in hits {
            assert_eq!(h.await.unwrap(), 4 << 20);
        }
        for s in smalls {
            assert_eq!(s.await.unwrap(), 1);
        }
    }
    let stats = cache.stats().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "every big call after the first was a hit: {stats:?}");
    assert_eq!((stats.errors, stats.breaker_opened, stats.mode), (0, 0, Mode::Redis));
}

#[tokio::test]
async fn a_big_value_is_a_pointer_and_a_body_and_invalidation_removes_both() {
    let redis = Redis::start();
    let cache = Cache::new(redis.config("big_layout").big_value_bytes(1024).build().unwrap()).await.unwrap();
    let prefix = cache.config().key_prefix().to_owned();
    let mut raw = redis.raw().await;
    let value = "v".repeat(10_000);

    cache.set("k", &value).tags(["t"]).await.unwrap();
    let entry: Vec<u8> = raw.get(format!("{prefix}:k")).await.unwrap();
    assert!(entry.len() < 16, "the entry holds a pointer, not {} bytes", entry.len());
    let body: Option<Vec<u8>> = raw.get(format!("{prefix}#body:k")).await.unwrap();
    assert!(body.unwrap().len() > 10_000);
    assert_eq!(cache.get::<String>("k").await.unwrap(), Some(value.clone()));

    // Removed by key: the body goes with the pointer.
    assert!(cache.delete("k").await.unwrap());
    assert_eq!(cache.get::<String>("k").await.unwrap(), None);
    assert!(!raw.exists::<_, bool>(format!("{prefix}#body:k")).await.unwrap());

    // By tag and by clear: a miss at once.
    cache.set("k", &value).tags(["t"]).await.unwrap();
    cache.invalidate_tags(["t"]).await.unwrap();
    assert_eq!(cache.get::<String>("k").await.unwrap(), None);
    cache.set("k", &value).await.unwrap();
    cache.clear().await.unwrap();
    assert_eq!(cache.get::<String>("k").await.unwrap(), None);
    assert!(!raw.exists::<_, bool>(format!("{prefix}#body:k")).await.unwrap());

    // A body evicted while its pointer stayed reads as a miss, not an error.
    cache.set("k", &value).await.unwrap();
    let _: () = raw.del(format!("{prefix}#body:k")).await.unwrap();
    assert_eq!(cache.get::<String>("k").await.unwrap(), None);
    // Small values stay whole in their entry.
    cache.set("small", &"s".to_owned()).await.unwrap();
    assert!(!raw.exists::<_, bool>(format!("{prefix}#body:small")).await.unwrap());
    assert_eq!(cache.get::<String>("small").await.unwrap(), Some("s".to_owned()));
}
