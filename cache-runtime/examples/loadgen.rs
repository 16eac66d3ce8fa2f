//! Load generator: the `#[cached]` paths beside their raw baselines, interleaved
//! in rounds (A B, B A, …) so noisy machines compare like with like.
//!
//! ```text
//! cargo run --release --example loadgen -- --concurrency 1,16,64,256 --ops 200000 --rounds 5
//! ```
//!
//! Starts its own `redis-server` on a free loopback port unless `REDIS_URL` is set
//! (every scenario needs one: the setup fills the Redis-backed functions too).
//! Prints a table and one JSON line per row.
//!
//! Baselines, each run in the same rounds as what it is compared with:
//! `raw_get` (redis-rs GET + decode) for `cached_redis_hit` and `mix_90_10`,
//! `raw_get_set` for `cached_miss` (and `cached_miss_no_lease`, the same
//! without the fleet lease), and for `cached_local_hit` both `moka_get`
//! (`moka::future::Cache<u64, Arc<Mission>>::get`) and `cached_crate_hit` (the
//! `cached` crate's in-memory `#[cached]` on an async fn); a ratio is printed
//! for each baseline that ran. Those two hits clone a `Mission`; the `_arc`
//! variants (`cached_local_hit_arc`, `cached_crate_hit_arc`) return an
//! `Arc<Mission>`, as the moka get does.
//!
//! `cached_redis_hit_signed` is the Redis hit with `signing_key` set (every
//! read checks the entry's MAC), compared with `cached_redis_hit`.
//!
//! `cached_near_hit` and `cached_near_hit_arc` are hits of `#[cached(near =
//! true)]` functions on the Redis-backed cache: served by the near tier, they
//! are compared with `moka_get` and with `cached_redis_hit`.
//!
//! `--scenarios invalidation_load` runs the fence figure instead: readers at
//! concurrency 64 over 1,000 keys with 5 ms bodies and a 1 s TTL, while another
//! instance invalidates keys the readers never read at 0, 10, 100 and 1,000 per
//! second; per rate it prints the hit rate, body runs and refused fills.
//!
//! `--subscriber info` installs a `tracing_subscriber::fmt` subscriber at INFO,
//! as a service would run: the cache's DEBUG call spans are then filtered out,
//! and the hit figures show what that filtering costs.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cache_runtime::{cached, Cache, CacheConfig};
use hdrhistogram::Histogram;
use support::bench::{drive, median, mission, Mission};

static REDIS: OnceLock<Cache> = OnceLock::new();
static LOCAL: OnceLock<Cache> = OnceLock::new();
/// The Redis-backed cache with signed entries (`signing_key`).
static SIGNED: OnceLock<Cache> = OnceLock::new();
/// The Redis-backed cache without the fleet lease: what the lease costs a cold miss.
static SOLO: OnceLock<Cache> = OnceLock::new();
/// Reached like the caches of the `#[cached]` functions: through a static.
static MOKA: OnceLock<moka::future::Cache<u64, Arc<Mission>>> = OnceLock::new();
static BODY_RUNS: AtomicU64 = AtomicU64::new(0);

/// The `cached` crate's own `#[cached]`, in memory: a baseline for the local tier.
#[cached::proc_macro::cached]
async fn cached_crate_mission(id: u64) -> Mission {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    mission(id)
}

/// The same, returning what a moka get returns: a hit clones an `Arc`.
#[cached::proc_macro::cached]
async fn cached_crate_arc(id: u64) -> Arc<Mission> {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    Arc::new(mission(id))
}

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

/// A local hit that clones an `Arc`, like a moka get, instead of the value.
#[cached(cache = LOCAL.get().unwrap(), prefix = "lg_arc", tags = ["missions"])]
async fn local_arc(id: u64) -> Arc<Mission> {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    Arc::new(mission(id))
}

/// Two tiers: decoded values in this process in front of Redis.
#[cached(cache = REDIS.get().unwrap(), prefix = "lg_near", tags = ["missions"], near = true)]
async fn near_mission(id: u64) -> Mission {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    mission(id)
}

/// The same, returning an `Arc`, as a moka get does.
#[cached(cache = REDIS.get().unwrap(), prefix = "lg_near_arc", tags = ["missions"], near = true)]
async fn near_arc(id: u64) -> Arc<Mission> {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    Arc::new(mission(id))
}

/// The mix's own function, so its invalidations never turn the hit scenarios into misses.
#[cached(cache = REDIS.get().unwrap(), prefix = "lg_mix", tags = ["missions"])]
async fn mix_mission(id: u64) -> Mission {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    mission(id)
}

/// Every call a fresh key: read, body, fenced fill (untagged, like its raw baseline).
#[cached(cache = REDIS.get().unwrap(), prefix = "lg_miss")]
async fn miss_mission(id: u64) -> Mission {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    mission(id)
}

/// A Redis hit whose entry carries a MAC, checked on every read.
#[cached(cache = SIGNED.get().unwrap(), prefix = "lg_signed", tags = ["missions"])]
async fn signed_mission(id: u64) -> Mission {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    mission(id)
}

/// The same without the fleet lease (single flight in this process only).
#[cached(cache = SOLO.get().unwrap(), prefix = "lg_miss_solo")]
async fn miss_solo(id: u64) -> Mission {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    mission(id)
}

/// The readers of the invalidation-load figure: short-lived entries, so fills
/// keep happening while another instance invalidates other keys.
#[cached(cache = REDIS.get().unwrap(), prefix = "lg_reader", ttl = 1)]
async fn reader_mission(id: u64) -> Mission {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(5)).await;
    mission(id)
}

/// Fresh ids for the miss scenarios, never repeated (started from the clock, so
/// not across runs against a shared Redis either).
static FRESH: AtomicU64 = AtomicU64::new(0);

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
    subscriber: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        concurrency: vec![1, 16, 64, 256],
        ops: 200_000,
        rounds: 5,
        scenarios: ["raw_get", "cached_redis_hit", "moka_get", "cached_local_hit", "mix_90_10", "stampede"]
            .map(String::from)
            .to_vec(),
        subscriber: None,
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
            "--subscriber" => args.subscriber = Some(value),
            other => {
                panic!("unknown flag {other} (--concurrency, --ops, --rounds, --scenarios, --subscriber)")
            }
        }
    }
    args
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
        "cached_redis_hit_signed" => {
            drive(concurrency, ops, |n| async move {
                std::hint::black_box(signed_mission(n % KEYSPACE).await);
            })
            .await
        }
        "raw_get_set" => {
            let raw = raw.clone();
            drive(concurrency, ops, move |_| {
                let mut conn = raw.clone();
                async move {
                    let key = format!("lgrawmiss:{}", FRESH.fetch_add(1, Ordering::Relaxed));
                    let got: Option<Vec<u8>> =
                        redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
                    assert!(got.is_none());
                    let json = serde_json::to_vec(&mission(7)).unwrap();
                    let _: () = redis::cmd("SET")
                        .arg(&key)
                        .arg(json)
                        .arg("PX")
                        .arg(300_000)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
            })
            .await
        }
        "cached_miss" => {
            drive(concurrency, ops, |_| async move {
                std::hint::black_box(miss_mission(FRESH.fetch_add(1, Ordering::Relaxed)).await);
            })
            .await
        }
        "cached_miss_no_lease" => {
            drive(concurrency, ops, |_| async move {
                std::hint::black_box(miss_solo(FRESH.fetch_add(1, Ordering::Relaxed)).await);
            })
            .await
        }
        "moka_get" => {
            drive(concurrency, ops, |n| async move {
                std::hint::black_box(MOKA.get().unwrap().get(&(n % KEYSPACE)).await.unwrap());
            })
            .await
        }
        "cached_crate_hit" => {
            drive(concurrency, ops, |n| async move {
                std::hint::black_box(cached_crate_mission(n % KEYSPACE).await);
            })
            .await
        }
        "cached_crate_hit_arc" => {
            drive(concurrency, ops, |n| async move {
                std::hint::black_box(cached_crate_arc(n % KEYSPACE).await);
            })
            .await
        }
        "cached_local_hit_arc" => {
            drive(concurrency, ops, |n| async move {
                std::hint::black_box(local_arc(n % KEYSPACE).await);
            })
            .await
        }
        "cached_local_hit" => {
            drive(concurrency, ops, |n| async move {
                std::hint::black_box(local_mission(n % KEYSPACE).await);
            })
            .await
        }
        "cached_near_hit" => {
            drive(concurrency, ops, |n| async move {
                std::hint::black_box(near_mission(n % KEYSPACE).await);
            })
            .await
        }
        "cached_near_hit_arc" => {
            drive(concurrency, ops, |n| async move {
                std::hint::black_box(near_arc(n % KEYSPACE).await);
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

/// One run of the invalidation-load figure.
#[derive(Clone, Copy)]
struct InvalidationRun {
    calls: u64,
    hit_rate: f64,
    body_runs: u64,
    fills_refused: u64,
    invalidations: u64,
}

async fn invalidation_run(reader: &Cache, writer: &Cache, rate: u64, run: Duration) -> InvalidationRun {
    let before = reader.stats().await.unwrap();
    let runs_before = BODY_RUNS.load(Ordering::Relaxed);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let invalidator = {
        let (writer, stop) = (writer.clone(), stop.clone());
        tokio::spawn(async move {
            let mut done = 0u64;
            if rate == 0 {
                return done;
            }
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                // Keys of another function: the readers never read them.
                let _ = writer
                    .delete(&format!("lg_other:v{}:{}", cache_runtime::codec::WIRE_VERSION, done % KEYSPACE))
                    .await;
                done += 1;
                let due = started + Duration::from_secs_f64(done as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            done
        })
    };
    let calls = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..64u64)
        .map(|t| {
            let (stop, calls) = (stop.clone(), calls.clone());
            tokio::spawn(async move {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(reader_mission(i.wrapping_mul(2654435761) % KEYSPACE).await);
                    calls.fetch_add(1, Ordering::Relaxed);
                    i += 64;
                }
            })
        })
        .collect();
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let invalidations = invalidator.await.unwrap();
    let after = reader.stats().await.unwrap();
    let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
    InvalidationRun {
        calls: calls.load(Ordering::Relaxed),
        hit_rate: hits as f64 / (hits + misses).max(1) as f64,
        body_runs: BODY_RUNS.load(Ordering::Relaxed) - runs_before,
        fills_refused: after.fills_refused - before.fills_refused,
        invalidations,
    }
}

/// Hit rate of readers while another instance invalidates keys they never read,
/// the rates interleaved in rounds so machine noise hits them all alike.
async fn invalidation_load(reader: &Cache, writer: &Cache) {
    const RUN: Duration = Duration::from_secs(3);
    const ROUNDS: usize = 3;
    const RATES: [u64; 4] = [0, 10, 100, 1_000];
    println!(
        "invalidation load: 64 readers over {KEYSPACE} keys, 5 ms bodies, TTL 1 s; rates interleaved, {ROUNDS} rounds of {RUN:?}"
    );
    let mut results: Vec<Vec<InvalidationRun>> = vec![Vec::new(); RATES.len()];
    for _ in 0..ROUNDS {
        for (i, &rate) in RATES.iter().enumerate() {
            results[i].push(invalidation_run(reader, writer, rate, RUN).await);
        }
    }
    println!(
        "{:>15} {:>10} {:>9} {:>10} {:>13} {:>14} {:>10}",
        "invalidations/s", "calls", "hit rate", "body runs", "fills refused", "invalidations", "vs 0/s"
    );
    let base = median(results[0].iter().map(|r| r.hit_rate).collect());
    for (i, &rate) in RATES.iter().enumerate() {
        let r = &results[i];
        let hit_rate = median(r.iter().map(|x| x.hit_rate).collect());
        let sum = |f: fn(&InvalidationRun) -> u64| r.iter().map(f).sum::<u64>();
        let (calls, runs, refused, invalidations) =
            (sum(|x| x.calls), sum(|x| x.body_runs), sum(|x| x.fills_refused), sum(|x| x.invalidations));
        println!(
            "{rate:>15} {calls:>10} {:>8.2}% {runs:>10} {refused:>13} {invalidations:>14} {:>9.1}%",
            hit_rate * 100.0,
            hit_rate / base * 100.0
        );
        eprintln!(
            "{}",
            serde_json::json!({
                "figure": "invalidation_load", "invalidations_per_sec": rate, "invalidations": invalidations,
                "calls": calls, "hit_rate_median": hit_rate, "hit_rate_vs_0": hit_rate / base,
                "body_runs": runs, "fills_refused": refused, "rounds": ROUNDS,
            })
        );
    }
}

/// What a scenario is compared with, the main baseline first.
fn baselines_of(scenario: &str) -> &'static [&'static str] {
    match scenario {
        "cached_redis_hit" | "mix_90_10" => &["raw_get"],
        "cached_redis_hit_signed" => &["cached_redis_hit", "raw_get"],
        "cached_miss" => &["raw_get_set", "cached_miss_no_lease"],
        "cached_miss_no_lease" => &["raw_get_set"],
        "cached_local_hit" => &["moka_get", "cached_crate_hit"],
        "cached_local_hit_arc" => &["moka_get", "cached_crate_hit_arc"],
        "cached_near_hit" | "cached_near_hit_arc" => &["moka_get", "cached_redis_hit"],
        _ => &[],
    }
}

fn main() {
    let args = parse_args();
    if let Some(level) = &args.subscriber {
        let filter = tracing_subscriber::EnvFilter::new(level);
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    FRESH.store(now.as_micros() as u64 * 1_000, Ordering::Relaxed);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let server = support::Redis::start();
        let config = |prefix: &str| {
            let builder = CacheConfig::builder().redis_url(server.url()).key_prefix(prefix);
            // Near entries outlive the run: its hits stay near hits.
            builder.near_cache_ttl(Duration::from_secs(3600)).build().unwrap()
        };
        let redis_cache = Cache::new(config("loadgen")).await.unwrap();
        assert_eq!(redis_cache.mode(), cache_runtime::Mode::Redis, "Redis unreachable at {}", server.url());
        while !redis_cache.stats().await.unwrap().bus_listening {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        REDIS.set(redis_cache.clone()).unwrap();
        let solo = CacheConfig::builder().redis_url(server.url()).key_prefix("loadgen").fleet_lease(false);
        SOLO.set(Cache::new(solo.build().unwrap()).await.unwrap()).unwrap();
        let signed = CacheConfig::builder().redis_url(server.url()).key_prefix("loadgen").signing_key("loadgen-signing-secret");
        SIGNED.set(Cache::new(signed.build().unwrap()).await.unwrap()).unwrap();
        LOCAL.set(Cache::local(config("loadgen"))).unwrap();
        redis_cache.clear().await.unwrap();

        let raw =
            redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let mut conn = raw.clone();
        let moka = moka::future::Cache::new(10_000);
        for id in 0..KEYSPACE {
            let json = serde_json::to_vec(&mission(id)).unwrap();
            let _: () =
                redis::cmd("SET").arg(format!("lgraw:{id}")).arg(json).query_async(&mut conn).await.unwrap();
            redis_mission(id).await;
            signed_mission(id).await;
            near_mission(id).await;
            near_arc(id).await;
            local_mission(id).await;
            cached_crate_mission(id).await;
            local_arc(id).await;
            cached_crate_arc(id).await;
            moka.insert(id, Arc::new(mission(id))).await;
        }
        MOKA.set(moka).unwrap();
        if args.scenarios.iter().any(|s| s == "invalidation_load") {
            let writer = Cache::new(config("loadgen")).await.unwrap();
            invalidation_load(&redis_cache, &writer).await;
            return;
        }
        println!(
            "loadgen: {} ops per scenario per round, {} rounds, value {} bytes as JSON, redis {}",
            args.ops,
            args.rounds,
            serde_json::to_vec(&mission(1)).unwrap().len(),
            server.url()
        );
        println!(
            "{:>5} {:<20} {:>11} {:>9} {:>9} {:>10} {:>10}  vs baselines",
            "conc", "scenario", "ops/s", "p50 µs", "p99 µs", "p999 µs", "body runs"
        );
        for &concurrency in &args.concurrency {
            let mut per_round: Vec<Vec<f64>> = vec![Vec::new(); args.scenarios.len()];
            let mut hists: Vec<Histogram<u64>> = (0..args.scenarios.len())
                .map(|_| Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap())
                .collect();
            let mut runs = vec![0u64; args.scenarios.len()];
            for round in 0..args.rounds {
                // A B, then B A: neither side always runs first, after the other's tail.
                let order: Vec<usize> = if round % 2 == 0 {
                    (0..args.scenarios.len()).collect()
                } else {
                    (0..args.scenarios.len()).rev().collect()
                };
                for i in order {
                    let scenario = &args.scenarios[i];
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
                let ratios: Vec<(&str, f64)> = baselines_of(scenario)
                    .iter()
                    .filter_map(|&b| {
                        let b_at = args.scenarios.iter().position(|s| s == b)?;
                        let per = per_round[i].iter().zip(&per_round[b_at]).map(|(x, y)| x / y).collect();
                        Some((b, median(per)))
                    })
                    .collect();
                let vs = ratios.iter().map(|(b, r)| format!("{:.1}% of {b}", r * 100.0)).collect::<Vec<_>>();
                let q = |p: f64| hists[i].value_at_quantile(p) as f64 / 1e3;
                let ops_s = median(per_round[i].clone());
                let body_runs = if scenario == "stampede" {
                    format!("{} / {}", runs[i], args.rounds)
                } else {
                    runs[i].to_string()
                };
                println!(
                    "{:>5} {:<20} {:>11.0} {:>9.1} {:>9.1} {:>10.1} {:>10}  {}",
                    if scenario == "stampede" { 1000 } else { concurrency },
                    scenario,
                    ops_s,
                    q(0.5),
                    q(0.99),
                    q(0.999),
                    body_runs,
                    if vs.is_empty() { "-".to_owned() } else { vs.join(", ") },
                );
                let json = serde_json::json!({
                    "concurrency": if scenario == "stampede" { 1000 } else { concurrency },
                    "scenario": scenario,
                    "ops_per_sec": ops_s.round(),
                    "p50_us": q(0.5), "p99_us": q(0.99), "p999_us": q(0.999),
                    "ratio_to_baseline": ratios.first().map(|r| r.1),
                    "baseline": ratios.first().map(|r| r.0),
                    "ratios": ratios.iter().map(|&(b, r)| (b.to_owned(), serde_json::json!(r))).collect::<serde_json::Map<_, _>>(),
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
