//! The outage load run: 64 tasks call `#[cached]` functions while Redis is killed
//! at 30% of the run and restarted at 60%; then a cancellation storm of calls under
//! random 0-5 ms timeouts through a proxy adding 2 ms. Prints what went wrong, if
//! anything, and how latency and mode moved.
//!
//! ```text
//! cargo run --release --example outage -- --calls 300000 --storm 100000
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cache_runtime::{cached, BreakerState, Cache, CacheConfig, Mode};
use hdrhistogram::Histogram;
use support::proxy::Proxy;

static CACHE: OnceLock<Cache> = OnceLock::new();
static BODY_RUNS: AtomicU64 = AtomicU64::new(0);
// tokio's timer has millisecond granularity: a shorter sleep would take 1 ms anyway.
const BODY_TIME: Duration = Duration::from_millis(1);
const OP_TIMEOUT: Duration = Duration::from_millis(100);
const BREAKER_TIMEOUT: Duration = Duration::from_secs(2);
const HEALTH_EVERY: Duration = Duration::from_millis(500);
const THRESHOLD: u32 = 5;

/// The answer carries its own key, so a result served for the wrong key is caught.
#[cached(cache = CACHE.get().unwrap(), prefix = "outage", ttl = 600)]
async fn lookup(id: u64) -> (u64, String) {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(BODY_TIME).await;
    (id, format!("record {id}"))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Before,
    During,
    After,
}

struct Tally {
    hist: [Histogram<u64>; 3],
    calls_by_mode: [u64; 2],
    wrong: u64,
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect(name))
}

fn main() {
    let calls = arg("--calls", 300_000);
    let storm = arg("--storm", 100_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let mut redis = support::Redis::spawn();
        let config = CacheConfig::builder()
            .redis_url(redis.url())
            .key_prefix("outage")
            .operation_timeout(OP_TIMEOUT)
            .socket_connect_timeout(OP_TIMEOUT)
            .circuit_breaker_threshold(THRESHOLD)
            .circuit_breaker_timeout(BREAKER_TIMEOUT)
            .health_check_interval(HEALTH_EVERY)
            .build()
            .unwrap();
        let cache = Cache::new(config).await.unwrap();
        CACHE.set(cache.clone()).unwrap();
        println!("outage run: {calls} calls over 64 tasks, body {BODY_TIME:?}, op timeout {OP_TIMEOUT:?}, breaker {THRESHOLD} failures / {BREAKER_TIMEOUT:?}, health every {HEALTH_EVERY:?}");

        let done = Arc::new(AtomicU64::new(0));
        let outage = Arc::new(Mutex::new(Phase::Before));
        let panics = Arc::new(AtomicU64::new(0));
        let after = Arc::new(AtomicU64::new(0));
        let tally = Arc::new(Mutex::new(Tally {
            hist: std::array::from_fn(|_| Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()),
            calls_by_mode: [0; 2],
            wrong: 0,
        }));
        let tasks: Vec<_> = (0..64u64)
            .map(|t| {
                let (done, outage, tally, cache, panics, after) =
                    (done.clone(), outage.clone(), tally.clone(), cache.clone(), panics.clone(), after.clone());
                tokio::spawn(async move {
                    let mut local = Tally {
                        hist: std::array::from_fn(|_| Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()),
                        calls_by_mode: [0; 2],
                        wrong: 0,
                    };
                    let mut i = 0u64;
                    // Runs past `calls` until half as many again were made after recovery.
                    while done.fetch_add(1, Ordering::Relaxed) < calls
                        || *outage.lock().unwrap() != Phase::After
                        || after.fetch_add(1, Ordering::Relaxed) < calls / 2
                    {
                        let id = (t * 7919 + i) % 2_000;
                        i += 1;
                        let phase = *outage.lock().unwrap();
                        let started = Instant::now();
                        let result = tokio::spawn(lookup(id)).await;
                        let took = started.elapsed();
                        match result {
                            Ok((got, _)) if got != id => local.wrong += 1,
                            Ok(_) => {}
                            Err(_) => {
                                panics.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        local.hist[phase as usize].saturating_record(took.as_nanos() as u64);
                        local.calls_by_mode[(cache.mode() == Mode::Local) as usize] += 1;
                    }
                    let mut all = tally.lock().unwrap();
                    for (a, b) in all.hist.iter_mut().zip(&local.hist) {
                        a.add(b).unwrap();
                    }
                    all.calls_by_mode[0] += local.calls_by_mode[0];
                    all.calls_by_mode[1] += local.calls_by_mode[1];
                    all.wrong += local.wrong;
                })
            })
            .collect();

        // The harness: kill at 30%, restart at 60%, time the way back to redis mode.
        while done.load(Ordering::Relaxed) < calls * 3 / 10 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        *outage.lock().unwrap() = Phase::During;
        let faults_at_kill = cache.metrics().errors_total();
        redis.kill();
        println!("killed redis at {} calls", done.load(Ordering::Relaxed));
        // Faults absorbed between the kill and the breaker opening.
        while cache.breaker_state() == BreakerState::Closed {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let faults_before_open = cache.metrics().errors_total() - faults_at_kill;
        while done.load(Ordering::Relaxed) < calls * 6 / 10 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        redis.restart();
        let restarted = Instant::now();
        println!("restarted redis at {} calls", done.load(Ordering::Relaxed));
        while cache.mode() != Mode::Redis && restarted.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let recovery = restarted.elapsed();
        *outage.lock().unwrap() = Phase::After;
        for t in tasks {
            t.await.unwrap();
        }

        let stats = cache.stats().await.unwrap();
        {
            let tally = tally.lock().unwrap();
            let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1e3;
            println!("caller errors:                   0 (a #[cached] call returns the function's result; it has no error path)");
            println!("panics:                          {}", panics.load(Ordering::Relaxed));
            println!("results for the wrong key:       {}", tally.wrong);
            println!("calls in mode redis / local:     {} / {}", tally.calls_by_mode[0], tally.calls_by_mode[1]);
            for (name, h) in ["before", "during", "after"].iter().zip(&tally.hist) {
                println!("p50 / p99 {name:<7} (µs):       {:.0} / {:.0}   ({} calls)", q(h, 0.5), q(h, 0.99), h.len());
            }
            println!("faults before the breaker opened: {faults_before_open} (threshold {THRESHOLD}; calls in flight at the kill fail together)");
            println!("breaker opened:                  {} time(s)", stats.breaker_opened);
            println!("restart -> mode redis:           {:.2} s (breaker timeout {:?} + health interval {:?})", recovery.as_secs_f64(), BREAKER_TIMEOUT, HEALTH_EVERY);
            println!("body runs:                       {}", BODY_RUNS.load(Ordering::Relaxed));
            println!(
                "cache: hits {} misses {} faults {} fills refused {} decode failures {}",
                stats.hits, stats.misses, stats.errors, stats.fills_refused, stats.decode_failures
            );
        }
        storm_run(&redis, storm).await;
    });
}

/// 100k calls, each under a random 0-5 ms timeout, through a proxy adding 2 ms.
async fn storm_run(redis: &support::Redis, calls: u64) {
    let proxy = Proxy::start(redis.port()).await;
    proxy.set_latency(Duration::from_millis(2));
    let config = CacheConfig::builder()
        .redis_url(proxy.url())
        .key_prefix("storm")
        .operation_timeout(Duration::from_millis(50))
        .circuit_breaker_enabled(false)
        .build()
        .unwrap();
    let cache = Cache::new(config).await.unwrap();
    STORM.set(cache.clone()).unwrap();
    let wrong = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let cancelled = Arc::new(AtomicU64::new(0));
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..64u64)
        .map(|t| {
            let (wrong, completed, cancelled, issued) =
                (wrong.clone(), completed.clone(), cancelled.clone(), issued.clone());
            tokio::spawn(async move {
                let mut seed = 0x2545_F491_4F6C_DD1D_u64 ^ t;
                while issued.fetch_add(1, Ordering::Relaxed) < calls {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let id = seed % 500;
                    let budget = Duration::from_micros(seed % 5_000);
                    let call = storm_lookup(id);
                    match tokio::time::timeout(budget, call).await {
                        Ok((got, _)) if got != id => {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            cancelled.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // After the storm every key must still read its own value, and a cold key must
    // not wait on a lock some cancelled caller left behind.
    proxy.set(support::proxy::Fault::None);
    let mut stuck = 0;
    for id in 0..500 {
        match tokio::time::timeout(Duration::from_secs(2), storm_lookup(id)).await {
            Ok((got, _)) if got != id => {
                wrong.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => stuck += 1,
        }
    }
    println!(
        "\ncancellation storm: {calls} calls in {:.1} s, {} completed, {} cancelled by their timeout",
        started.elapsed().as_secs_f64(),
        completed.load(Ordering::Relaxed),
        cancelled.load(Ordering::Relaxed)
    );
    println!("results for the wrong key:       {}", wrong.load(Ordering::Relaxed));
    println!("locks left held (keys stuck):    {stuck}");
}

static STORM: OnceLock<Cache> = OnceLock::new();

#[cached(cache = STORM.get().unwrap(), prefix = "storm", ttl = 600)]
async fn storm_lookup(id: u64) -> (u64, String) {
    tokio::time::sleep(Duration::from_micros(500)).await;
    (id, format!("record {id}"))
}
