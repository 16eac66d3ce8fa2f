//! Big invalidations against a Redis of its own: a tag on 400,000 entries and a
//! pattern over 1,000,000 keys. Prints how long each call took, what it deleted,
//! and the longest single command Redis ran meanwhile (SLOWLOG), which is what
//! other clients of that Redis wait behind.
//!
//! ```text
//! cargo run --release --example big_invalidation -- --tagged 400000 --keys 1000000
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use cache_runtime::{Cache, CacheConfig};

/// The longest command in SLOWLOG (everything over 1 ms is logged), and its name.
async fn longest_command(raw: &mut redis::aio::MultiplexedConnection) -> (Duration, String) {
    let log: Vec<(u64, u64, u64, Vec<Vec<u8>>)> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async::<Vec<redis::Value>>(raw)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|entry| match entry {
            redis::Value::Array(fields) if fields.len() >= 4 => {
                let n = |v: &redis::Value| match v {
                    redis::Value::Int(i) => *i as u64,
                    _ => 0,
                };
                let args = match &fields[3] {
                    redis::Value::Array(a) => a
                        .iter()
                        .map(|v| match v {
                            redis::Value::BulkString(b) => b.clone(),
                            _ => Vec::new(),
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                Some((n(&fields[0]), n(&fields[1]), n(&fields[2]), args))
            }
            _ => None,
        })
        .collect();
    log.iter()
        .max_by_key(|e| e.2)
        .map(|e| {
            let name = e.3.first().map(|a| String::from_utf8_lossy(a).to_uppercase()).unwrap_or_default();
            (Duration::from_micros(e.2), name)
        })
        .unwrap_or((Duration::ZERO, "none over 1 ms".into()))
}

/// Runs one invalidation of `size` keys; prints how long it took, what it
/// deleted and the longest command Redis ran meanwhile, and one JSON line.
async fn measure(
    raw: &mut redis::aio::MultiplexedConnection,
    figure: &str,
    call: &str,
    size: u64,
    invalidation: impl std::future::Future<Output = Result<u64, cache_runtime::CacheError>>,
) {
    let _: () = redis::cmd("SLOWLOG").arg("RESET").query_async(raw).await.unwrap();
    let started = Instant::now();
    let deleted = invalidation.await.unwrap();
    let took = started.elapsed();
    let (longest, name) = longest_command(raw).await;
    println!("{call}: {deleted} deleted in {took:.1?}; longest command meanwhile {longest:?} ({name})");
    eprintln!(
        "{}",
        serde_json::json!({"figure": figure, "size": size, "deleted": deleted, "call_ms": took.as_secs_f64() * 1e3,
            "longest_command_us": longest.as_micros() as u64, "longest_command": name})
    );
}

#[tokio::main]
async fn main() {
    let tagged = support::arg("--tagged", 400_000);
    let keys = support::arg("--keys", 1_000_000);
    let server = support::Redis::spawn_with_args(&[
        "--slowlog-log-slower-than",
        "1000",
        "--slowlog-max-len",
        "100000",
    ]);
    let config = CacheConfig::builder().redis_url(server.url()).key_prefix("big").build().unwrap();
    let cache = Cache::new(config).await.unwrap();
    let mut raw = server.raw().await;
    println!("big invalidations on redis-server {}", server.url());

    // A tag on `tagged` entries, written through the cache (fenced, indexed).
    let started = Instant::now();
    let tasks: Vec<_> = (0..64u64)
        .map(|t| {
            let cache = cache.clone();
            tokio::spawn(async move {
                for i in (t..tagged).step_by(64) {
                    cache.set(&format!("item:{i}"), &i).ttl(3600).tags(["big"]).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    println!("wrote {tagged} tagged entries in {:.1?}", started.elapsed());
    let tag = cache.invalidate_tags(["big"]);
    measure(&mut raw, "big_tag", "invalidate_tags([\"big\"])", tagged, tag).await;

    // A pattern over `keys` keys, written raw in pipelines.
    let started = Instant::now();
    for chunk in (0..keys).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET").arg(format!("big:bulk:{i}")).arg(i).arg("PX").arg(3_600_000).ignore();
        }
        let _: () = pipe.query_async(&mut raw).await.unwrap();
    }
    println!("wrote {keys} keys in {:.1?}", started.elapsed());
    let pattern = cache.delete_pattern("bulk:*");
    measure(&mut raw, "big_pattern", "delete_pattern(\"bulk:*\")", keys, pattern).await;
}
