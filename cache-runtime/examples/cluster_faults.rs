//! Topology changes under load on a Redis Cluster of its own (3 masters, a
//! replica each): a manual failover (`CLUSTER FAILOVER`), the migration of
//! every slot that holds a shard to another master (clients see ASK, then
//! MOVED), and the SIGKILL of a master. Two cache instances read a `#[cached]`
//! function and invalidate it while the fault happens; each run prints what a
//! user would see go wrong.
//!
//! ```text
//! cargo run --release --example cluster_faults -- --seconds 10
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::cluster_load::{run_through, Fault, Figures};

fn print(fault: &str, f: &Figures) {
    println!(
        "{fault:<16} {:>9} {:>7} {:>6} {:>6} {:>9} {:>7} {:>8} {:>9} {:>12} {:>8}",
        f.calls,
        f.caller_errors,
        f.stale_reads + f.stale_reads_local,
        f.faults,
        f.body_runs,
        f.invalidations,
        f.invalidations_retried,
        f.faults_until_ms.map_or("-".to_owned(), |ms| ms.to_string()),
        f.slowest_call_ms,
        f.breaker_opened,
    );
    let json = serde_json::json!({
        "figure": "cluster_fault", "fault": fault, "calls": f.calls, "caller_errors": f.caller_errors,
        "stale_reads_after_invalidation": f.stale_reads + f.stale_reads_local,
        "calls_that_fell_back": f.faults, "body_runs": f.body_runs, "invalidations": f.invalidations,
        "invalidations_queued_and_resent": f.invalidations_retried,
        "invalidations_failed": f.invalidations_failed,
        "hits_resumed_after_ms": f.faults_until_ms.unwrap_or(0), "slowest_call_ms": f.slowest_call_ms,
        "breaker_opened": f.breaker_opened,
    });
    eprintln!("{json}");
}

fn main() {
    let seconds = support::arg("--seconds", 10);
    let (duration, fault_at) = (Duration::from_secs(seconds), Duration::from_secs(seconds / 3));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        println!("cluster faults: {seconds} s of load per fault, the fault at {} s", seconds / 3);
        println!(
            "{:<16} {:>9} {:>7} {:>6} {:>6} {:>9} {:>7} {:>8} {:>9} {:>12} {:>8}",
            "fault", "calls", "errors", "stale", "fell", "body runs", "invals", "requeued", "resumed", "slowest ms",
            "breaker"
        );

        // Each fault on a cluster of its own, stopped before the next starts.
        for (name, fault) in
            [("manual failover", Fault::Failover), ("slot migration", Fault::Migration), ("killed master", Fault::KillMaster)]
        {
            print(name, &run_through(fault, "faults", true, duration, fault_at).await);
        }
        println!(
            "stale: reads older than an invalidation that returned before they began; fell: calls that \
             fell back to the function (cache faults); requeued: invalidations answered Deferred and sent again; \
             resumed: ms from the fault until every call was served by Redis again \
             (no fault, no open breaker)"
        );
    });
}
