//! Fail-safe: 64 callers read 100 keys with a 1 s TTL while the origin behind
//! them fails for the middle half of the run, once with `fail_safe = true`
//! and once without (the control).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cache_runtime::{cached, Cache, CacheConfig};
use hdrhistogram::Histogram;

use crate::support;

static CACHE: OnceLock<Cache> = OnceLock::new();
/// Whether the origin fails every call.
static ORIGIN_DOWN: AtomicBool = AtomicBool::new(false);
static ORIGIN_CALLS: AtomicU64 = AtomicU64::new(0);

/// The origin: 2 ms a call, and an error while it is down.
async fn origin(id: u64) -> Result<u64, String> {
    ORIGIN_CALLS.fetch_add(1, Relaxed);
    tokio::time::sleep(Duration::from_millis(2)).await;
    if ORIGIN_DOWN.load(Relaxed) {
        return Err("origin unavailable".into());
    }
    Ok(id * 7)
}

#[cached(fail_safe = true, ttl = Duration::from_secs(1), cache = CACHE.get().unwrap(), prefix = "price_fs")]
async fn price_fail_safe(id: u64) -> Result<u64, String> {
    origin(id).await
}

#[cached(ttl = Duration::from_secs(1), cache = CACHE.get().unwrap(), prefix = "price")]
async fn price(id: u64) -> Result<u64, String> {
    origin(id).await
}

#[derive(Default)]
struct Figures {
    calls: u64,
    caller_errors: u64,
    stale_served: u64,
    origin_calls: u64,
    p99_us: u64,
}

async fn run(fail_safe: bool, seconds: u64) -> Figures {
    let cache = CACHE.get().unwrap();
    let stale_before = cache.stats().await.unwrap().stale_served;
    ORIGIN_CALLS.store(0, Relaxed);
    let started = Instant::now();
    let end = Duration::from_secs(seconds);
    let (down_at, up_at) = (end / 4, end * 3 / 4);
    let calls = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..64u64)
        .map(|t| {
            let (calls, errors) = (calls.clone(), errors.clone());
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
                let mut n = t;
                while started.elapsed() < end {
                    let id = n % 100;
                    n += 64;
                    let begun = Instant::now();
                    let got = if fail_safe { price_fail_safe(id).await } else { price(id).await };
                    hist.saturating_record(begun.elapsed().as_nanos() as u64);
                    calls.fetch_add(1, Relaxed);
                    if got != Ok(id * 7) {
                        errors.fetch_add(1, Relaxed);
                    }
                }
                hist
            })
        })
        .collect();
    // The outage: the middle half of the run.
    tokio::time::sleep(down_at).await;
    ORIGIN_DOWN.store(true, Relaxed);
    tokio::time::sleep(up_at - down_at).await;
    ORIGIN_DOWN.store(false, Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    for task in tasks {
        hist.add(task.await.unwrap()).unwrap();
    }
    Figures {
        calls: calls.load(Relaxed),
        caller_errors: errors.load(Relaxed),
        stale_served: cache.stats().await.unwrap().stale_served - stale_before,
        origin_calls: ORIGIN_CALLS.load(Relaxed),
        p99_us: hist.value_at_quantile(0.99) / 1_000,
    }
}

/// Runs the scenario for `seconds` on the Redis at `url`, printing its table and figures.
pub async fn scenario(url: &str, seconds: u64) {
    let config = CacheConfig::builder()
        .redis_url(url)
        .key_prefix(support::unique_prefix("trouble"))
        .fail_safe_throttle(Duration::from_secs(1))
        .hard_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    CACHE.set(Cache::new(config).await.unwrap()).unwrap();
    println!(
        "fail-safe: 64 callers, 100 keys, TTL 1 s, the origin down for {} s of {seconds} s",
        seconds / 2
    );
    println!(
        "{:<12} {:>9} {:>14} {:>13} {:>13} {:>9}",
        "function", "calls", "caller errors", "stale served", "origin calls", "p99 µs"
    );
    for fail_safe in [true, false] {
        let f = run(fail_safe, seconds).await;
        let name = if fail_safe { "fail_safe" } else { "control" };
        println!(
            "{name:<12} {:>9} {:>14} {:>13} {:>13} {:>9}",
            f.calls, f.caller_errors, f.stale_served, f.origin_calls, f.p99_us
        );
        let figure = if fail_safe { "fail_safe" } else { "fail_safe_control" };
        eprintln!(
            "{}",
            serde_json::json!({
                "figure": figure, "calls": f.calls, "caller_errors": f.caller_errors,
                "stale_served": f.stale_served, "origin_calls": f.origin_calls, "p99_us": f.p99_us,
                "outage_seconds": seconds / 2, "concurrency": 64,
            })
        );
    }
}
