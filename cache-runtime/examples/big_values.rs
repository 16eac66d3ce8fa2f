//! Big values beside small ones, against a Redis of its own: rounds of 32
//! concurrent hits of one value just under `max_value_bytes` (8 MiB), while 16
//! tasks keep reading small values from the same cache. Prints, per phase, the
//! small hits' p50/p99, the big hits' p50/max, body re-runs, cache faults and
//! breaker trips. The first phase has no big hits: it is the small hits' control.
//!
//! ```text
//! cargo run --release --example big_values -- --rounds 10
//! ```
//!
//! `--big-value-bytes 100000000` turns the bulk connection off: the control.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::{Cache, CacheConfig, Serialization};
use hdrhistogram::Histogram;

const BIG: usize = (8 << 20) - 4096;

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// Small hits at concurrency 16 until `stop`; their latencies in µs.
async fn small_readers(cache: &Cache, stop: Arc<AtomicBool>) -> Histogram<u64> {
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let (cache, stop) = (cache.clone(), stop.clone());
            tokio::spawn(async move {
                let mut h = hist();
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("small:{}", i % 100);
                    let began = Instant::now();
                    let v = cache.get_with(&key, async { vec![7u8; 64] }).await;
                    h.record(began.elapsed().as_micros().max(1) as u64).unwrap();
                    assert_eq!(v.len(), 64);
                    i += 16;
                }
                h
            })
        })
        .collect();
    let mut all = hist();
    for t in tasks {
        all.add(t.await.unwrap()).unwrap();
    }
    all
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let rounds = support::arg("--rounds", 10);
    let redis = support::Redis::spawn();
    // Binary: a byte vector is stored at its own size (JSON would triple it).
    let config = CacheConfig::builder()
        .redis_url(redis.url())
        .key_prefix("bigvalues")
        .serialization(Serialization::Binary)
        .big_value_bytes(support::arg("--big-value-bytes", 256 << 10) as usize)
        .build()
        .unwrap();
    let cache = Cache::new(config).await.unwrap();
    let big = Arc::new(vec![42u8; BIG]);
    let runs = Arc::new(AtomicU32::new(0));
    // Stored once; every later call should be a hit.
    let load = {
        let (big, runs) = (big.clone(), runs.clone());
        move || {
            let (big, runs) = (big.clone(), runs.clone());
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                big.to_vec()
            }
        }
    };
    cache.get_with("big", load()).ttl(600).await;
    let baseline_runs = runs.load(Ordering::SeqCst);

    println!("big value {} bytes, {rounds} rounds of 32 concurrent hits", BIG);
    println!(
        "{:<10} {:>10} {:>10} {:>12} {:>12} {:>8} {:>8} {:>8}",
        "phase", "small p50", "small p99", "big p50 ms", "big max ms", "reruns", "faults", "breaker"
    );
    for phase in ["control", "big hits"] {
        let stop = Arc::new(AtomicBool::new(false));
        let readers = {
            let (cache, stop) = (cache.clone(), stop.clone());
            tokio::spawn(async move { small_readers(&cache, stop).await })
        };
        let mut big_hist = hist();
        for _ in 0..rounds {
            if phase == "control" {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let hits: Vec<_> = (0..32)
                .map(|_| {
                    let (cache, load) = (cache.clone(), load.clone());
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let v = cache.get_with("big", load()).ttl(600).await;
                        assert_eq!(v.len(), BIG);
                        t.elapsed()
                    })
                })
                .collect();
            for h in hits {
                big_hist.record(h.await.unwrap().as_micros().max(1) as u64).unwrap();
            }
        }
        stop.store(true, Ordering::Relaxed);
        let small = readers.await.unwrap();
        let stats = cache.stats().await.unwrap();
        let (p50, max) = if big_hist.is_empty() {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                format!("{:.1}", big_hist.value_at_quantile(0.5) as f64 / 1000.0),
                format!("{:.1}", big_hist.max() as f64 / 1000.0),
            )
        };
        println!(
            "{:<10} {:>8}µs {:>8}µs {:>12} {:>12} {:>8} {:>8} {:>8}",
            phase,
            small.value_at_quantile(0.5),
            small.value_at_quantile(0.99),
            p50,
            max,
            runs.load(Ordering::SeqCst) - baseline_runs,
            stats.errors,
            stats.breaker_opened,
        );
    }
}
