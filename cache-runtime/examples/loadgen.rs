//! Load generator: the `#[cached]` paths beside their raw baselines, interleaved
//! in rounds (A B A B …) so noisy machines compare like with like.
//!
//! ```text
//! cargo run --release --example loadgen -- --concurrency 1,16,64,256 --ops 200000 --rounds 5
//! ```
//!
//! Starts its own `redis-server` on a free loopback port unless `REDIS_URL` is set.
//! Prints a table and one JSON line per row.

#[path = "../tests/support/mod.rs"]
mod support;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cache_runtime::{cached, Cache, CacheConfig};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// ~207 bytes as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Mission {
    id: u64,
    name: String,
    status: String,
    priority: u8,
    crew: Vec<String>,
    progress: f64,
    tags: Vec<String>,
}

fn mission(id: u64) -> Mission {
    Mission {
        id,
        name: format!("Survey of the outer belt, leg {id:06}"),
        status: "active".into(),
        priority: 3,
        crew: vec!["ada.lovelace".into(), "grace.hopper".into(), "linus.torvalds".into()],
        progress: 0.4242,
        tags: vec!["missions".into(), "queue".into(), "high-priority".into()],
    }
}

static REDIS: OnceLock<Cache> = OnceLock::new();
static LOCAL: OnceLock<Cache> = OnceLock::new();
static BODY_RUNS: AtomicU64 = AtomicU64::new(0);

#[cached(cache = REDIS.get().unwrap(), prefix = "lg", tags = ["missions"])]
async fn redis_mission(id: u64) -> Mission {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    mission(id)
}

#[cached(cache = LOCAL.get().unwrap(), prefix = "lg", tags = ["missions"])]
async fn local_mission(id: u64) -> Mission {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    mission(id)
}

/// The mix's own function, so its invalidations never turn the hit scenarios into misses.
#[cached(cache = REDIS.get().unwrap(), prefix = "lg_mix", tags = ["missions"])]
async fn mix_mission(id: u64) -> Mission {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    mission(id)
}

#[cached(cache = REDIS.get().unwrap(), prefix = "lg_stampede")]
async fn slow_mission(id: u64) -> Mission {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(20)).await;
    mission(id)
}

const KEYSPACE: u64 = 1_000;

struct Args {
    concurrency: Vec<usize>,
    ops: u64,
    rounds: usize,
    scenarios: Vec<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        concurrency: vec![1, 16, 64, 256],
        ops: 200_000,
        rounds: 5,
        scenarios: ["raw_get", "cached_redis_hit", "moka_get", "cached_local_hit", "mix_90_10", "stampede"]
            .map(String::from)
            .to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--concurrency" => {
                args.concurrency =
                    value.split(',').map(|v| v.parse().expect("--concurrency 1,16,64")).collect()
            }
            "--ops" => args.ops = value.parse().expect("--ops N"),
            "--rounds" => args.rounds = value.parse().expect("--rounds N"),
            "--scenarios" => args.scenarios = value.split(',').map(String::from).collect(),
            other => panic!("unknown flag {other} (--concurrency, --ops, --rounds, --scenarios)"),
        }
    }
    args
}

/// Runs `ops` calls of `op` over `concurrency` tasks; returns ops/s and latencies.
async fn drive<F, Fut>(concurrency: usize, ops: u64, op: F) -> (f64, Histogram<u64>)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let per_task = ops / concurrency as u64;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
                for i in 0..per_task {
                    let n = (t as u64).wrapping_mul(7919).wrapping_add(i);
                    let begun = Instant::now();
                    op(n).await;
                    hist.saturating_record(begun.elapsed().as_nanos() as u64);
                }
                hist
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    for t in tasks {
        hist.add(t.await.unwrap()).unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    ((per_task * concurrency as u64) as f64 / secs, hist)
}

async fn run_scenario(
    name: &str,
    concurrency: usize,
    ops: u64,
    raw: &redis::aio::MultiplexedConnection,
) -> (f64, Histogram<u64>) {
    match name {
        "raw_get" => {
            let raw = raw.clone();
            drive(concurrency, ops, move |n| {
                let mut conn = raw.clone();
                async move {
                    let key = format!("lgraw:{}", n % KEYSPACE);
                    let bytes: Vec<u8> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
                    let m: Mission = serde_json::from_slice(&bytes).unwrap();
                    std::hint::black_box(m);
                }
            })
            .await
        }
        "cached_redis_hit" => {
            drive(concurrency, ops, |n| async move {
                std::hint::black_box(redis_mission(n % KEYSPACE).await);
            })
            .await
        }
        "moka_get" => {
            let moka: moka::sync::Cache<u64, Arc<Mission>> = moka::sync::Cache::new(10_000);
            for id in 0..KEYSPACE {
                moka.insert(id, Arc::new(mission(id)));
            }
            drive(concurrency, ops, move |n| {
                let m = moka.get(&(n % KEYSPACE));
                async move {
                    std::hint::black_box(m.unwrap());
                }
            })
            .await
        }
        "cached_local_hit" => {
            drive(concurrency, ops, |n| async move {
                std::hint::black_box(local_mission(n % KEYSPACE).await);
            })
            .await
        }
        "mix_90_10" => {
            drive(concurrency, ops, |n| async move {
                // Deterministic spread: 1 call in 10 invalidates the key it lands on.
                let id = (n.wrapping_mul(2654435761) >> 7) % KEYSPACE;
                if n % 10 == 9 {
                    let _ = mix_mission_invalidate(id).await;
                } else {
                    std::hint::black_box(mix_mission(id).await);
                }
            })
            .await
        }
        "stampede" => {
            let id = BODY_RUNS.load(Ordering::Relaxed) + 1_000_000;
            let started = Instant::now();
            let callers: Vec<_> = (0..1_000)
                .map(|_| {
                    tokio::spawn(async move {
                        let begun = Instant::now();
                        std::hint::black_box(slow_mission(id).await);
                        begun.elapsed().as_nanos() as u64
                    })
                })
                .collect();
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
            for c in callers {
                hist.saturating_record(c.await.unwrap());
            }
            (1_000.0 / started.elapsed().as_secs_f64(), hist)
        }
        other => panic!("unknown scenario {other}"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn baseline_of(scenario: &str) -> Option<&'static str> {
    match scenario {
        "cached_redis_hit" | "mix_90_10" => Some("raw_get"),
        "cached_local_hit" => Some("moka_get"),
        _ => None,
    }
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let server = support::Redis::start();
        let config =
            |prefix: &str| CacheConfig::builder().redis_url(server.url()).key_prefix(prefix).build().unwrap();
        let redis_cache = Cache::new(config("loadgen")).await.unwrap();
        assert_eq!(redis_cache.mode(), cache_runtime::Mode::Redis, "Redis unreachable at {}", server.url());
        REDIS.set(redis_cache.clone()).unwrap();
        LOCAL.set(Cache::local(config("loadgen"))).unwrap();
        redis_cache.clear().await.unwrap();

        let raw =
            redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let mut conn = raw.clone();
        for id in 0..KEYSPACE {
            let json = serde_json::to_vec(&mission(id)).unwrap();
            let _: () =
                redis::cmd("SET").arg(format!("lgraw:{id}")).arg(json).query_async(&mut conn).await.unwrap();
            redis_mission(id).await;
            local_mission(id).await;
        }
        println!(
            "loadgen: {} ops per scenario per round, {} rounds, value {} bytes as JSON, redis {}",
            args.ops,
            args.rounds,
            serde_json::to_vec(&mission(1)).unwrap().len(),
            server.url()
        );
        println!(
            "{:>5} {:<18} {:>11} {:>9} {:>9} {:>10} {:>13} {:>10}",
            "conc", "scenario", "ops/s", "p50 µs", "p99 µs", "p999 µs", "vs baseline", "body runs"
        );
        for &concurrency in &args.concurrency {
            let mut per_round: Vec<Vec<f64>> = vec![Vec::new(); args.scenarios.len()];
            let mut hists: Vec<Histogram<u64>> = (0..args.scenarios.len())
                .map(|_| Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap())
                .collect();
            let mut runs = vec![0u64; args.scenarios.len()];
            for _ in 0..args.rounds {
                for (i, scenario) in args.scenarios.iter().enumerate() {
                    if scenario == "stampede" && concurrency != args.concurrency[0] {
                        continue;
                    }
                    let before = BODY_RUNS.load(Ordering::Relaxed);
                    let (ops_s, hist) =
                        run_scenario(scenario, concurrency, args.ops / args.rounds as u64, &raw).await;
                    runs[i] += BODY_RUNS.load(Ordering::Relaxed) - before;
                    per_round[i].push(ops_s);
                    hists[i].add(hist).unwrap();
                }
            }
            for (i, scenario) in args.scenarios.iter().enumerate() {
                if per_round[i].is_empty() {
                    continue;
                }
                let ratio = baseline_of(scenario)
                    .and_then(|b| args.scenarios.iter().position(|s| s == b))
                    .map(|b| median(per_round[i].iter().zip(&per_round[b]).map(|(x, y)| x / y).collect()));
                let q = |p: f64| hists[i].value_at_quantile(p) as f64 / 1e3;
                let ops_s = median(per_round[i].clone());
                let body_runs = if scenario == "stampede" {
                    format!("{} / {}", runs[i], args.rounds)
                } else {
                    runs[i].to_string()
                };
                println!(
                    "{:>5} {:<18} {:>11.0} {:>9.1} {:>9.1} {:>10.1} {:>13} {:>10}",
                    if scenario == "stampede" { 1000 } else { concurrency },
                    scenario,
                    ops_s,
                    q(0.5),
                    q(0.99),
                    q(0.999),
                    ratio.map(|r| format!("{:.1}%", r * 100.0)).unwrap_or_else(|| "-".into()),
                    body_runs
                );
                let json = serde_json::json!({
                    "concurrency": if scenario == "stampede" { 1000 } else { concurrency },
                    "scenario": scenario,
                    "ops_per_sec": ops_s.round(),
                    "p50_us": q(0.5), "p99_us": q(0.99), "p999_us": q(0.999),
                    "ratio_to_baseline": ratio,
                    "baseline": baseline_of(scenario),
                    "body_runs": runs[i],
                    "rounds": per_round[i].len(),
                });
                eprintln!("{json}");
            }
        }
        let stats = redis_cache.stats().await.unwrap();
        println!(
            "redis cache: hits {} misses {} faults {} decode failures {} fills refused {} breaker opened {}",
            stats.hits,
            stats.misses,
            stats.errors,
            stats.decode_failures,
            stats.fills_refused,
            stats.breaker_opened
        );
        redis_cache.clear().await.unwrap();
    });
}
