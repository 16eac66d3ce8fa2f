//! Load on a cluster while its topology changes: readers call a `#[cached]`
//! function on two instances, writers update the source and invalidate, and
//! the run counts what a user would see go wrong.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache_runtime::{cached, Cache, Mode};

use super::cluster::Cluster;
use super::{current, CURRENT};

/// What happens to the cluster while the load runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing (on a cluster without replicas).
    None,
    /// `CLUSTER FAILOVER` of the master of slot 0 to its replica.
    Failover,
    /// Every slot that holds one of the 32 default shards moves to another master.
    Migration,
    /// SIGKILL of the master of slot 0, until its replica took over.
    KillMaster,
}

/// Runs the load for `duration` on a cluster of its own (3 masters, with a
/// replica each unless the fault is `None`), `fault` at `fault_at`, on two
/// instances whose breakers close again within the run; stops the cluster.
pub async fn run_through(
    fault: Fault,
    name: &str,
    invalidate: bool,
    duration: Duration,
    fault_at: Duration,
) -> Figures {
    let replicas = if fault == Fault::None { 0 } else { 1 };
    let cluster = Arc::new(Mutex::new(Cluster::spawn(3, replicas)));
    let (config, master) = {
        let c = cluster.lock().unwrap();
        let config = c
            .config(name)
            .circuit_breaker_timeout(Duration::from_millis(500))
            .health_check_interval(Duration::from_millis(200))
            .build()
            .unwrap();
        (config, c.master_of(0))
    };
    let caches = [Cache::new(config.clone()).await.unwrap(), Cache::new(config).await.unwrap()];
    assert!(caches.iter().all(|c| c.mode() == Mode::Redis), "the cluster is unreachable");
    // The run's own reference keeps the cluster up until the load is over.
    let c = cluster.clone();
    let figures = run(caches, invalidate, duration, fault_at, move || {
        let mut c = c.lock().unwrap();
        match fault {
            Fault::None => {}
            Fault::Failover => {
                c.fail_over(&master);
            }
            Fault::Migration => {
                let masters: Vec<_> = c.topology().into_iter().filter(|n| n.master).collect();
                for slot in (0..16384).step_by(512) {
                    let from = c.master_of(slot);
                    c.migrate(slot, masters.iter().find(|m| m.id != from.id).unwrap());
                }
            }
            Fault::KillMaster => {
                let replica = c.replica_of(&master);
                c.kill(master.port);
                c.wait_for_master(&replica);
            }
        }
    })
    .await;
    drop(cluster);
    figures
}

/// Keys the run reads and writes.
pub const KEYS: u64 = 64;

/// The source of truth: each key's version, and the newest version whose
/// invalidation has returned (no read that starts after it may see less).
pub struct Source {
    version: Vec<AtomicU64>,
    committed: Vec<AtomicU64>,
    body_runs: AtomicU64,
}

tokio::task_local! {
    static SOURCE: Arc<Source>;
}

#[cached(cache = current(), prefix = "load", ttl = 600, tags = ["load:{key}"])]
async fn version(key: u64) -> Result<u64, String> {
    let source = SOURCE.with(Arc::clone);
    source.body_runs.fetch_add(1, Ordering::Relaxed);
    Ok(source.version[key as usize].load(Ordering::SeqCst))
}

/// What the run saw.
#[derive(Debug, Default)]
pub struct Figures {
    pub calls: u64,
    /// `Err` returned to a caller of the `#[cached]` function.
    pub caller_errors: u64,
    /// Reads older than an invalidation that had returned before they began,
    /// from a cache in Redis mode.
    pub stale_reads: u64,
    /// The same from a cache serving from its local tier (breaker open): it
    /// does not hear another instance's invalidations.
    pub stale_reads_local: u64,
    pub body_runs: u64,
    /// Cache faults (calls that fell back to the function), both instances.
    pub faults: u64,
    pub invalidations: u64,
    /// Invalidations answered `Deferred` (queued: Redis unavailable), sent again by the writer.
    pub invalidations_retried: u64,
    /// Invalidations that failed with anything but `Deferred`.
    pub invalidations_failed: u64,
    /// From the fault to the last cache fault or open breaker: when every
    /// call was served by Redis again.
    pub faults_until_ms: Option<u64>,
    pub slowest_call_ms: u64,
    /// Times either instance's breaker opened.
    pub breaker_opened: u64,
}

/// Runs the load on `caches` for `duration`, calling `fault` (on a blocking
/// thread) at `fault_at`. Without `invalidate`, writers update the source but
/// invalidate nothing: the control, which must see stale reads.
pub async fn run(
    caches: [Cache; 2],
    invalidate: bool,
    duration: Duration,
    fault_at: Duration,
    fault: impl FnOnce() + Send + 'static,
) -> Figures {
    let source = Arc::new(Source {
        version: (0..KEYS).map(|_| AtomicU64::new(1)).collect(),
        committed: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
        body_runs: AtomicU64::new(0),
    });
    let start = Instant::now();
    let end = start + duration;
    let faults_before: u64 = faults(&caches);
    let opened_before = opened(&caches).await;
    let counters = Arc::new(Counters::default());
    let mut tasks = tokio::task::JoinSet::new();
    for (i, cache) in caches.iter().enumerate() {
        for reader in 0..8u64 {
            let (shared, counters) = (source.clone(), counters.clone());
            let source = shared.clone();
            let task = async move {
                let mut k = reader * 7 + i as u64;
                while Instant::now() < end {
                    k = (k * 31 + 17) % KEYS;
                    let floor = source.committed[k as usize].load(Ordering::SeqCst);
                    let began = Instant::now();
                    let cache = current();
                    let served_by_redis = cache.mode() == cache_runtime::Mode::Redis;
                    let got = version(k).await;
                    // A local hit never yields: without this, readers would
                    // starve the writers and the watcher on the test's two threads.
                    tokio::task::yield_now().await;
                    counters.slowest.fetch_max(began.elapsed().as_millis() as u64, Ordering::Relaxed);
                    counters.calls.fetch_add(1, Ordering::Relaxed);
                    match got {
                        Ok(v) if v < floor => {
                            if served_by_redis && cache.mode() == cache_runtime::Mode::Redis {
                                counters.stale.fetch_add(1, Ordering::Relaxed);
                            } else {
                                counters.stale_local.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            };
            let scoped = SOURCE.scope(shared, task);
            tasks.spawn(CURRENT.scope(cache.clone(), scoped));
        }
        let (shared, counters) = (source.clone(), counters.clone());
        let source = shared.clone();
        let writer = async move {
            let mut k = i as u64;
            while Instant::now() < end {
                k = (k * 13 + 5) % KEYS;
                let new = source.version[k as usize].fetch_add(1, Ordering::SeqCst) + 1;
                if invalidate {
                    // Every third update goes by tag, which runs on every shard.
                    invalidate_until_done(k, new % 3 == 0, &counters, end).await;
                }
                source.committed[k as usize].fetch_max(new, Ordering::SeqCst);
                counters.invalidations.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tasks.spawn(CURRENT.scope(cache.clone(), SOURCE.scope(shared, writer)));
    }
    // Watches the fault counters and the breakers to see when calls are all
    // served by Redis again after the fault.
    let watch = {
        let caches = caches.clone();
        async move {
            let mut last = faults(&caches);
            let mut last_change = None;
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let now = faults(&caches);
                let degraded = now != last || caches.iter().any(|c| c.mode() != cache_runtime::Mode::Redis);
                if degraded && start.elapsed() >= fault_at {
                    last_change = Some(start.elapsed());
                }
                last = now;
            }
            last_change
        }
    };
    let watcher = tokio::spawn(watch);
    tokio::time::sleep(fault_at).await;
    tokio::task::spawn_blocking(fault).await.expect("the fault ran");
    while let Some(done) = tasks.join_next().await {
        done.expect("a load task panicked");
    }
    let last_fault = watcher.await.expect("the watcher ran");
    let c = &counters;
    Figures {
        calls: c.calls.load(Ordering::Relaxed),
        caller_errors: c.errors.load(Ordering::Relaxed),
        stale_reads: c.stale.load(Ordering::Relaxed),
        stale_reads_local: c.stale_local.load(Ordering::Relaxed),
        body_runs: source.body_runs.load(Ordering::Relaxed),
        faults: faults(&caches) - faults_before,
        invalidations: c.invalidations.load(Ordering::Relaxed),
        invalidations_retried: c.retried.load(Ordering::Relaxed),
        invalidations_failed: c.failed.load(Ordering::Relaxed),
        faults_until_ms: last_fault.map(|at| at.saturating_sub(fault_at).as_millis() as u64),
        slowest_call_ms: c.slowest.load(Ordering::Relaxed),
        breaker_opened: opened(&caches).await - opened_before,
    }
}

/// Invalidates key `k` (by its tag or by key) until it is done: `Deferred`
/// means queued, so it is sent again; anything else is counted as failed, as
/// is one still not done `GIVE_UP` after the run (the test then fails, not hangs).
async fn invalidate_until_done(k: u64, by_tag: bool, counters: &Counters, end: Instant) {
    const GIVE_UP: Duration = Duration::from_secs(20);
    loop {
        if Instant::now() > end + GIVE_UP {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let done = if by_tag {
            current().invalidate_tags([format!("load:{k}")]).await.map(drop)
        } else {
            version_invalidate(k).await.map(drop)
        };
        match done {
            Ok(()) => return,
            Err(cache_runtime::CacheError::Deferred(_)) => {
                counters.retried.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("invalidation failed: {e}");
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    errors: AtomicU64,
    stale: AtomicU64,
    stale_local: AtomicU64,
    slowest: AtomicU64,
    invalidations: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
}

/// Times the breakers opened so far, both instances.
async fn opened(caches: &[Cache]) -> u64 {
    let mut total = 0;
    for cache in caches {
        total += cache.stats().await.map_or(0, |s| s.breaker_opened);
    }
    total
}

/// Cache faults so far, both instances.
fn faults(caches: &[Cache]) -> u64 {
    caches.iter().map(|c| c.metrics().errors_total()).sum()
}
