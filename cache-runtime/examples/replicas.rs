//! Three instances as OS processes on a Redis of their own (or on
//! `REDIS_URL`, where the restart is skipped): a writer invalidates a
//! `#[cached(near = true)]` function while two readers read it, with nothing
//! happening to Redis, with every bus listener killed, and with Redis
//! restarted mid-run; then 4 processes x 250 callers x 100 cold keys, with and
//! without the fleet lease's holder killed mid-body.
//!
//! ```text
//! cargo run --release --example replicas -- --invalidations 200
//! ```
//!
//! A readable table on stdout, one JSON line per figure on stderr.

#[path = "../tests/support/replicas.rs"]
mod replicas;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use replicas::Fault;
use support::{arg, Redis};

/// Stale reads are counted after each invalidation returned, and after this bound.
const BOUND: Duration = Duration::from_millis(10);

fn main() {
    if replicas::child() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run());
}

async fn run() {
    let invalidations = arg("--invalidations", 200);
    let own = std::env::var("REDIS_URL").map_or(true, |u| u.is_empty());
    println!("coherence: 1 writer, 2 readers (processes); {invalidations} invalidations, 20 ms apart");
    println!(
        "{:<20} {:>8} {:>9} {:>8} {:>12} {:>14} {:>9} {:>9} {:>9}",
        "fault", "reads", "invalid.", "deferred", "stale>return", "stale>10ms", "p50 ms", "p99 ms", "max ms"
    );
    let mut faults = vec![Fault::None, Fault::ListenersKilled];
    if own {
        faults.push(Fault::RedisRestart);
    }
    faults.push(Fault::RawDelete);
    for fault in faults {
        let mut redis = if fault == Fault::RedisRestart { Redis::spawn() } else { Redis::start() };
        let f = replicas::coherence(&mut redis, fault, invalidations, BOUND).await;
        println!(
            "{:<20} {:>8} {:>9} {:>8} {:>12} {:>14} {:>9.3} {:>9.3} {:>9.3}",
            fault.as_str(),
            f.reads,
            f.invalidations,
            f.deferred,
            f.stale_reads_after_return,
            f.stale_reads_after_bound,
            f.p50_visible_ms,
            f.p99_visible_ms,
            f.max_visible_ms
        );
        eprintln!(
            "{}",
            serde_json::json!({
                "figure": "coherence", "fault": fault.as_str(), "p99_visible_ms": f.p99_visible_ms,
                "max_visible_ms": f.max_visible_ms, "stale_reads_after_return": f.stale_reads_after_return,
                "stale_reads_after_10ms": f.stale_reads_after_bound, "reads": f.reads,
                "invalidations": f.invalidations, "deferred": f.deferred, "read_errors": f.read_errors,
            })
        );
    }

    println!();
    println!("fleet stampede: 4 processes x 250 callers x 100 cold keys, body 200 ms, lease 1 s");
    println!(
        "{:<14} {:>8} {:>7} {:>10} {:>11} {:>5} {:>11} {:>7} {:>8}",
        "holder", "calls", "errors", "runs/key", "finished/key", "hung", "slowest ms", "faults", "breaker"
    );
    let redis = Redis::start();
    for kill in [false, true] {
        let body = Duration::from_millis(200);
        let f = replicas::stampede(&redis, 4, 250, 100, body, Duration::from_secs(1), kill).await;
        let holder = if kill { "killed" } else { "alive" };
        println!(
            "{:<14} {:>8} {:>7} {:>10} {:>11} {:>5} {:>11} {:>7} {:>8}",
            holder,
            f.calls,
            f.caller_errors,
            f.body_runs_per_key_max,
            f.finished_runs_per_key_max,
            f.hung,
            f.slowest_call_ms,
            f.faults,
            f.breaker_opened
        );
        eprintln!(
            "{}",
            serde_json::json!({
                "figure": "fleet_stampede", "processes": f.processes, "callers_per_process": 250,
                "keys": f.keys, "holder_killed": kill, "body_runs_per_key_max": f.body_runs_per_key_max,
                "finished_runs_per_key_max": f.finished_runs_per_key_max, "calls": f.calls,
                "caller_errors": f.caller_errors, "hung_processes": f.hung, "slowest_call_ms": f.slowest_call_ms,
                "cache_faults": f.faults, "breaker_opened": f.breaker_opened,
            })
        );
    }
}
