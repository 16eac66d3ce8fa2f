//! Early refresh: one hot key with a 1 s TTL and a 50 ms body, read by 64
//! callers, once with `early_refresh = true` and once without (the control).
//! A caller "waited for the body" when its call missed: it ran the body or
//! waited for the caller that did.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cache_runtime::{cached, Cache, CacheConfig};
use hdrhistogram::Histogram;

use crate::support;

static CACHE: OnceLock<Cache> = OnceLock::new();
static BODY_RUNS: AtomicU64 = AtomicU64::new(0);

const BODY: Duration = Duration::from_millis(50);

#[cached(early_refresh = true, ttl = 1, cache = CACHE.get().unwrap(), prefix = "hot_early")]
async fn hot_early(id: u64) -> u64 {
    BODY_RUNS.fetch_add(1, Relaxed);
    tokio::time::sleep(BODY).await;
    id * 7
}

#[cached(ttl = 1, cache = CACHE.get().unwrap(), prefix = "hot")]
async fn hot(id: u64) -> u64 {
    BODY_RUNS.fetch_add(1, Relaxed);
    tokio::time::sleep(BODY).await;
    id * 7
}

struct Figures {
    calls: u64,
    waited_for_body: u64,
    body_runs: u64,
    early_refreshes: u64,
    p99_us: u64,
    max_us: u64,
}

async fn run(early: bool, seconds: u64) -> Figures {
    let cache = CACHE.get().unwrap();
    // The first fill, before the clock starts: what follows is the steady state.
    let first = if early { hot_early(1).await } else { hot(1).await };
    assert_eq!(first, 7);
    let before = cache.stats().await.unwrap();
    BODY_RUNS.store(0, Relaxed);
    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
                while Instant::now() < end {
                    let begun = Instant::now();
                    let got = if early { hot_early(1).await } else { hot(1).await };
                    hist.saturating_record(begun.elapsed().as_nanos() as u64);
                    assert_eq!(got, 7);
                }
                hist
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    for task in tasks {
        hist.add(task.await.unwrap()).unwrap();
    }
    let after = cache.stats().await.unwrap();
    Figures {
        calls: hist.len(),
        waited_for_body: after.misses - before.misses,
        body_runs: BODY_RUNS.load(Relaxed),
        early_refreshes: after.early_refreshes - before.early_refreshes,
        p99_us: hist.value_at_quantile(0.99) / 1_000,
        max_us: hist.max() / 1_000,
    }
}

/// Runs the scenario for `seconds` on the Redis at `url`, printing its table and figures.
pub async fn scenario(url: &str, seconds: u64) {
    let config =
        CacheConfig::builder().redis_url(url).key_prefix(support::unique_prefix("early")).build().unwrap();
    CACHE.set(Cache::new(config).await.unwrap()).unwrap();
    println!("early refresh: 64 callers, 1 hot key, TTL 1 s, a 50 ms body, {seconds} s");
    println!(
        "{:<14} {:>10} {:>16} {:>10} {:>10} {:>9} {:>9}",
        "function", "calls", "waited for body", "body runs", "refreshes", "p99 µs", "max µs"
    );
    for early in [true, false] {
        let f = run(early, seconds).await;
        let name = if early { "early_refresh" } else { "control" };
        println!(
            "{name:<14} {:>10} {:>16} {:>10} {:>10} {:>9} {:>9}",
            f.calls, f.waited_for_body, f.body_runs, f.early_refreshes, f.p99_us, f.max_us
        );
        let figure = if early { "early_refresh" } else { "early_refresh_control" };
        eprintln!(
            "{}",
            serde_json::json!({
                "figure": figure, "calls": f.calls, "waited_for_body": f.waited_for_body,
                "body_runs": f.body_runs, "early_refreshes": f.early_refreshes,
                "p99_us": f.p99_us, "max_us": f.max_us, "seconds": seconds, "concurrency": 64, "ttl_ms": 1000,
            })
        );
    }
}
