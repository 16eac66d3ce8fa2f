//! Instances as OS processes on one Redis (`support/replicas.rs`): the near
//! tier's coherence across processes, through a listener kill and a Redis
//! restart, with a control that bypasses the bus; and the fleet lease, with
//! its holder killed mid-body. Its own `main`: the binary runs itself again
//! as each instance.

mod support;
// The example reads every figure; the test asserts on some.
#[allow(dead_code)]
#[path = "support/replicas.rs"]
mod replicas;

use std::time::Duration;

use replicas::Fault;
use support::Redis;

/// A read that still returns the old value this long after the invalidation
/// returned counts as stale. Loopback delivery takes well under a
/// millisecond; the rest is room for a loaded two-core machine.
const BOUND: Duration = Duration::from_millis(100);

const KEYS: u64 = 20;

fn main() {
    if replicas::child() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        for fault in [Fault::None, Fault::ListenersKilled, Fault::RedisRestart] {
            let mut redis = Redis::spawn();
            let f = replicas::coherence(&mut redis, fault, 60, BOUND).await;
            println!("coherence, {}: {f:?}", fault.as_str());
            assert!(f.reads > 1000, "{fault:?}: the readers read ({f:?})");
            assert!(f.invalidations >= 40, "{fault:?}: most invalidations returned Ok ({f:?})");
            assert_eq!(f.stale_reads_after_bound, 0, "{fault:?}: {f:?}");
        }
        // The control: invalidations nobody hears leave the readers' near copies stale.
        let mut redis = Redis::spawn();
        let f = replicas::coherence(&mut redis, Fault::RawDelete, 20, BOUND).await;
        println!("coherence, {}: {f:?}", Fault::RawDelete.as_str());
        assert!(f.stale_reads_after_bound > 0, "the control must see stale reads: {f:?}");

        // 20 keys, not the example's 100: in a debug build, 100,000 callers'
        // first reads at once overload a two-core machine into timeouts.
        let redis = Redis::spawn();
        let body = Duration::from_millis(200);
        let lease = Duration::from_secs(1);
        let f = replicas::stampede(&redis, 4, 250, KEYS, body, lease, false).await;
        println!("fleet stampede: {f:?}");
        assert_eq!((f.hung, f.caller_errors, f.calls), (0, 0, 4 * 250 * KEYS), "{f:?}");
        assert_eq!(f.body_runs_per_key_max, 1, "{f:?}");

        let f = replicas::stampede(&redis, 4, 250, KEYS, body, lease, true).await;
        println!("fleet stampede, holder killed: {f:?}");
        assert_eq!((f.hung, f.caller_errors, f.calls), (0, 0, 3 * 250 * KEYS), "{f:?}");
        assert_eq!(f.finished_runs_per_key_max, 1, "one survivor finished each key: {f:?}");
        assert_eq!(f.body_runs_per_key_max, 2, "the killed holder's run and one more: {f:?}");
    });
    println!("replicas: ok");
}
