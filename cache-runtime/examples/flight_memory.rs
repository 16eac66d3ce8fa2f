//! What single flight keeps after a burst of misses: 2,000 misses of 100 KB
//! values at concurrency 64, through `get_with` (`--mode cached`) or through
//! plain `get` + `set` (`--mode plain`), against a Redis of its own. Prints the
//! process's resident set size before and after; run each mode in its own
//! process and compare the two "after" figures.
//!
//! ```text
//! cargo run --release --example flight_memory -- --mode plain
//! cargo run --release --example flight_memory -- --mode cached
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use cache_runtime::{Cache, CacheConfig, Serialization};

const MISSES: usize = 2_000;
const VALUE: usize = 100_000;

fn rss_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    pages * 4096.0 / 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args
        .iter()
        .position(|a| a == "--mode")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or("cached".into());
    let redis = support::Redis::spawn();
    let config = CacheConfig::builder()
        .redis_url(redis.url())
        .key_prefix("flightmem")
        .serialization(Serialization::Binary)
        .build()
        .unwrap();
    let cache = Cache::new(config).await.unwrap();
    let before = rss_mb();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..MISSES {
        while tasks.len() >= 64 {
            tasks.join_next().await.unwrap().unwrap();
        }
        let (cache, mode) = (cache.clone(), mode.clone());
        tasks.spawn(async move {
            let key = format!("k{i}");
            let value = || vec![(i % 251) as u8; VALUE];
            let got = if mode == "plain" {
                match cache.get::<Vec<u8>>(&key).await.unwrap() {
                    Some(v) => v,
                    None => {
                        let v = value();
                        cache.set(&key, &v).await.unwrap();
                        v
                    }
                }
            } else {
                cache.get_with(&key, async move { value() }).await
            };
            assert_eq!(got.len(), VALUE);
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    println!(
        "mode {mode}: {MISSES} misses of {VALUE} bytes, RSS before {before:.1} MB, after {:.1} MB",
        rss_mb()
    );
}
