//! What is stored reads back equal, or reads as a miss: an entry written for
//! another shape of the type (another build during a deploy) is a miss in every
//! format, and a value JSON can't hold is refused instead of changed.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};

use cache_runtime::{cached, Cache, CacheError, Serialization};
use serde::{Deserialize, Serialize};
use support::{Redis, CURRENT, FORMATS};

/// The stock entry as the build being replaced wrote it.
mod old {
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Item {
        pub price_cents: u64,
        pub stock: u64,
    }
}

/// The same entry after a refactor reordered the fields, without a `version` bump.
mod new {
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Item {
        pub stock: u64,
        pub price_cents: u64,
    }
}

static OLD_RUNS: AtomicU32 = AtomicU32::new(0);
static NEW_RUNS: AtomicU32 = AtomicU32::new(0);

// One key for both: `prefix` and the arguments are what the two builds share.
#[cached(cache = support::current(), prefix = "items")]
async fn item_in_old_build(id: u64) -> old::Item {
    OLD_RUNS.fetch_add(1, Ordering::SeqCst);
    old::Item { price_cents: 1999 + id, stock: 10 }
}

#[cached(cache = support::current(), prefix = "items")]
async fn item_in_new_build(id: u64) -> new::Item {
    NEW_RUNS.fetch_add(1, Ordering::SeqCst);
    new::Item { stock: 10, price_cents: 1999 + id }
}

/// Two processes on one Redis and one prefix: a build being replaced and its successor.
async fn two_builds(redis: &Redis, format: Serialization) -> (Cache, Cache) {
    let old_build = redis.cache("deploy", format).await;
    let config = cache_runtime::CacheConfig::builder()
        .redis_url(redis.url())
        .key_prefix(old_build.config().key_prefix())
        .serialization(format)
        .build()
        .unwrap();
    (old_build, Cache::new(config).await.unwrap())
}

#[tokio::test]
async fn a_rolling_deploy_with_a_reordered_struct_reads_misses_not_swapped_values() {
    let redis = Redis::start();
    for format in FORMATS {
        let (old_build, new_build) = two_builds(&redis, format).await;
        let (old_runs, new_runs) = (OLD_RUNS.load(Ordering::SeqCst), NEW_RUNS.load(Ordering::SeqCst));
        let expected_old = old::Item { price_cents: 2000, stock: 10 };
        let expected_new = new::Item { stock: 10, price_cents: 2000 };
        assert_eq!(CURRENT.scope(old_build.clone(), item_in_old_build(1)).await, expected_old);
        // The new build reads the old build's entry: a miss, and its own fill.
        assert_eq!(CURRENT.scope(new_build.clone(), item_in_new_build(1)).await, expected_new, "{format}");
        assert_eq!(NEW_RUNS.load(Ordering::SeqCst), new_runs + 1, "{format}: not a miss");
        assert_eq!(CURRENT.scope(new_build.clone(), item_in_new_build(1)).await, expected_new);
        assert_eq!(NEW_RUNS.load(Ordering::SeqCst), new_runs + 1, "{format}: its own fill is a hit");
        // The old build, still serving, reads the new one's entry as a miss too.
        assert_eq!(CURRENT.scope(old_build.clone(), item_in_old_build(1)).await, expected_old, "{format}");
        assert_eq!(OLD_RUNS.load(Ordering::SeqCst), old_runs + 2, "{format}");
        for build in [&old_build, &new_build] {
            let stats = build.stats().await.unwrap();
            // Per read: a miss soon after this process's own fill of the key reads twice.
            assert!(stats.type_mismatches >= 1, "{format}: {stats:?}");
            assert_eq!(stats.decode_failures, 0, "{format}: a mismatch is not corruption");
        }
    }
}

#[tokio::test]
async fn another_builds_entry_is_left_in_place_for_the_next_write() {
    let redis = Redis::start();
    for format in FORMATS {
        let cache = redis.cache("left", format).await;
        cache.set("item:7", &old::Item { price_cents: 1999, stock: 10 }).await.unwrap();
        assert_eq!(cache.get::<new::Item>("item:7").await.unwrap(), None, "{format}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(cache.exists("item:7").await.unwrap(), "{format}: dropped like a corrupt entry");
        let read = cache.get::<old::Item>("item:7").await.unwrap();
        assert_eq!(
            read,
            Some(old::Item { price_cents: 1999, stock: 10 }),
            "{format}: the old build still reads it"
        );
    }
}

#[tokio::test]
async fn a_retyped_field_reads_as_a_miss_in_every_format() {
    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(rename = "Item")]
    struct Retyped {
        price_cents: f64,
        stock: u64,
    }
    for format in FORMATS {
        let cache = support::local_cache("retyped", format);
        cache.set("item:1", &old::Item { price_cents: 1999, stock: 10 }).await.unwrap();
        assert_eq!(cache.get::<Retyped>("item:1").await.unwrap(), None, "{format}");
        assert_eq!(cache.stats().await.unwrap().type_mismatches, 1, "{format}");
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    value: Option<f64>,
}

static READS: AtomicU32 = AtomicU32::new(0);

#[cached(cache = support::current(), prefix = "readings")]
async fn read_sensor(sensor: String) -> Reading {
    READS.fetch_add(1, Ordering::SeqCst);
    Reading { sensor, value: Some(f64::NAN) }
}

async fn reads_of(cache: &Cache, sensor: &str) -> (Vec<Reading>, u32) {
    let before = READS.load(Ordering::SeqCst);
    let mut readings = Vec::new();
    for _ in 0..2 {
        readings.push(CURRENT.scope(cache.clone(), read_sensor(sensor.to_owned())).await);
    }
    (readings, READS.load(Ordering::SeqCst) - before)
}

#[tokio::test]
async fn json_refuses_a_nan_and_every_call_still_gets_it() {
    let cache = support::local_cache("nan-json", Serialization::Json);
    let (readings, runs) = reads_of(&cache, "json").await;
    assert!(readings.iter().all(|r| r.value.is_some_and(f64::is_nan)), "Some(NaN) came back as {readings:?}");
    assert_eq!(runs, 2, "nothing was cached");
    let stats = cache.stats().await.unwrap();
    assert_eq!(stats.errors, 2, "each refusal is a counted fault");
    assert_eq!(stats.decode_failures, 0, "refused at encode, not stored to fail at decode");

    let err = cache.set("direct", &f64::INFINITY).await.unwrap_err();
    assert!(matches!(err, CacheError::Encode { format: "json", .. }), "{err:?}");
    assert!(err.to_string().contains("NaN or infinity can't be stored as JSON"), "{err}");
    assert!(!cache.exists("direct").await.unwrap());
}

#[tokio::test]
async fn msgpack_and_binary_store_a_nan_as_it_is() {
    for format in [Serialization::MsgPack, Serialization::Binary] {
        let cache = support::local_cache("nan-bin", format);
        let (readings, runs) = reads_of(&cache, format.as_str()).await;
        assert!(readings.iter().all(|r| r.value.is_some_and(f64::is_nan)), "{format}: {readings:?}");
        assert_eq!(runs, 1, "{format}: the second call is a hit");
        cache.set("inf", &f64::NEG_INFINITY).await.unwrap();
        assert_eq!(cache.get::<f64>("inf").await.unwrap(), Some(f64::NEG_INFINITY), "{format}");
    }
}
