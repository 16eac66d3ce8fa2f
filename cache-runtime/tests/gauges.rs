//! The gauges the cache refreshes on its own thread, and the hit rate.

mod support;

use std::time::{Duration, Instant};

use cache_runtime::{Cache, CacheConfig};
use support::{unique_prefix, Redis};

/// The value of the sample `name` in `text`, if it is there.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Waits (a few seconds at most) for `name` to read `want` in the cache's own
/// scrape; the last value read otherwise.
async fn settles(cache: &Cache, name: &str, want: f64) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = sample(&cache.metrics().render(), name);
        if now == Some(want) || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn gauges_follow_the_store_without_refresh_gauges() {
    assert_eq!(CacheConfig::default().metrics_refresh_interval(), Duration::from_secs(15));
    let redis = Redis::start();
    let every = Duration::from_millis(100);
    let redis_mode = Cache::new(
        redis.config("gauges").metrics_namespace("brain").metrics_refresh_interval(every).build().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(redis_mode.mode(), cache_runtime::Mode::Redis);
    let local = Cache::local(
        CacheConfig::builder()
            .key_prefix(unique_prefix("gauges_local"))
            .metrics_refresh_interval(every)
            .build()
            .unwrap(),
    );
    for (cache, keys) in [(&redis_mode, "brain_cache_keys_total"), (&local, "cache_keys_total")] {
        assert_eq!(sample(&cache.metrics().render(), keys), Some(0.0), "nothing refreshed yet");
        for id in 0..3 {
            cache.set(&format!("mission:{id}"), &id).await.unwrap();
        }
        assert_eq!(settles(cache, keys, 3.0).await, Some(3.0), "{keys} after the refresh interval");
        cache.delete("mission:0").await.unwrap();
        assert_eq!(settles(cache, keys, 2.0).await, Some(2.0), "{keys} after a delete");
    }
    let size = sample(&local.metrics().render(), "cache_size_bytes").unwrap();
    assert!(size > 0.0, "the local tier's bytes: {size}");
    redis_mode.clear().await.unwrap();
}

#[tokio::test]
async fn the_hit_rate_is_hits_over_lookups() {
    let redis = Redis::start();
    let cache = redis.cache("hit_rate", Default::default()).await;
    let rate = |cache: &Cache| sample(&cache.metrics().render(), "cache_hit_rate");
    assert_eq!(rate(&cache), Some(0.0), "0 before any lookup");
    cache.set("a", &1u32).await.unwrap();
    for key in ["a", "a", "a", "missing"] {
        cache.get::<u32>(key).await.unwrap();
    }
    assert_eq!(rate(&cache), Some(0.75));
    assert_eq!(cache.metrics().hit_rate(), 0.75);
    cache.clear().await.unwrap();
}
