//! The flusher: stands by until it holds the queue's lease, then reads jobs
//! on a connection of its own and hands them to the handler, one key's jobs
//! in order and one at a time, different keys' concurrently.
//!
//! Blocking reads (`XREADGROUP … BLOCK`) get a connection of their own,
//! opened through `Endpoint` like the bus listener's (TLS, Sentinel,
//! credentials): a blocked command holds up every command behind it on its
//! connection, so it must never be one of the shared multiplexed ones, and a
//! pool (deadpool-redis) would add a dependency for one long-lived connection
//! that is replaced, not returned, when it fails. Acknowledgements are small
//! commands and travel on the shared connections.
//!
//! A lease lost (not renewed in time: Redis unreachable, or this process
//! stalled) ends the session at once: handler calls in flight are dropped and
//! nothing more is read, so that the next active flusher, which takes over
//! only once the lease has expired, is never running one key's jobs beside
//! this one's.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

use super::job::{Apply, Job};
use super::lease::Lease;
use super::redis_of;
use super::stream::{self, Entry, Keys, Read, Scripts};
use crate::bus::jittered;
use crate::redis_store::RedisStore;
use crate::{Cache, CacheError};

/// The longest one read waits for a new job: how long a flusher can take to
/// notice a stop it was not woken for.
const BLOCK: Duration = Duration::from_secs(2);
/// Reconnecting and retrying Redis back off between these.
pub(super) const MIN_BACKOFF: Duration = Duration::from_millis(50);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the flusher refreshes the queue's gauges.
const GAUGES_EVERY: Duration = Duration::from_secs(1);

/// A flusher not started yet; see [`Cache::write_behind_flusher`].
#[must_use = "a Flusher does nothing until started"]
pub struct Flusher {
    cache: Cache,
    apply: Apply,
}

impl Flusher {
    pub(crate) fn new<J, F, Fut, E>(cache: Cache, handler: F) -> Flusher
    where
        J: DeserializeOwned + Send + 'static,
        F: Fn(Job<J>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        Flusher { cache, apply: super::job::erase(handler) }
    }

    /// Starts the flusher on the current Tokio runtime, where the handler
    /// runs too. It stands by until it holds the queue's lease (at once if no
    /// other flusher of this Redis and prefix is active), then delivers the
    /// jobs: first those an earlier active flusher had read but not
    /// acknowledged, then new ones as they are queued.
    ///
    /// # Errors
    ///
    /// [`CacheError::NoRuntime`] outside a Tokio runtime,
    /// [`CacheError::Unavailable`] for a cache without Redis. Redis being
    /// unreachable is not an error: the flusher waits for it.
    pub fn start(self) -> Result<FlusherHandle, CacheError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| CacheError::NoRuntime)?;
        redis_of(&self.cache)?;
        let config = self.cache.config();
        let concurrency = config.write_behind_concurrency();
        let shared = Arc::new(Shared {
            keys: Keys::new(&self.cache.inner.schema),
            scripts: Scripts::new(),
            me: self.cache.inner.tiers.bus.me(),
            concurrency,
            max_attempts: config.write_behind_max_attempts(),
            backoff: config.write_behind_backoff(),
            backoff_max: config.write_behind_backoff_max(),
            lease_ttl: config.write_behind_lease_ttl(),
            permits: Semaphore::new(concurrency),
            queues: Mutex::default(),
            held: AtomicUsize::new(0),
            room: Notify::new(),
            stop: watch::channel(false).0,
            active: AtomicBool::new(false),
            lease_until: Mutex::new(None),
            acks_failing: AtomicBool::new(false),
            cache: self.cache,
            apply: self.apply,
        });
        let task = runtime.spawn(run(shared.clone()));
        Ok(FlusherHandle { shared, task: Some(task) })
    }
}

/// A started flusher; dropping it stops it at once (jobs in flight are
/// delivered again by the next active flusher), [`shutdown`](Self::shutdown) stops it gracefully.
pub struct FlusherHandle {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FlusherHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlusherHandle").field("active", &self.is_active()).finish()
    }
}

impl FlusherHandle {
    /// Whether this flusher is the active one of its Redis and prefix now.
    pub fn is_active(&self) -> bool {
        self.shared.active.load(Ordering::Acquire)
    }

    /// Stops: reads nothing more, waits for the handler calls in flight and
    /// their acknowledgements, leaves every other job queued for the next
    /// active flusher, and lets the lease go so that a standby takes over now
    /// rather than when the lease expires.
    pub async fn shutdown(mut self) {
        self.shared.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FlusherHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub(super) struct Shared {
    pub(super) cache: Cache,
    pub(super) apply: Apply,
    pub(super) keys: Keys,
    pub(super) scripts: Scripts,
    /// This process's id on the bus, in each of its lease tokens.
    pub(super) me: u64,
    pub(super) concurrency: usize,
    pub(super) max_attempts: u32,
    pub(super) backoff: Duration,
    pub(super) backoff_max: Duration,
    pub(super) lease_ttl: Duration,
    /// Handler calls running at once.
    pub(super) permits: Semaphore,
    /// The jobs read and not settled yet, by cache key; a key is here while a worker runs its jobs.
    pub(super) queues: Mutex<HashMap<String, VecDeque<Entry>>>,
    pub(super) held: AtomicUsize,
    /// A job settled: there is room to read more.
    pub(super) room: Notify,
    /// Set by a graceful shutdown.
    pub(super) stop: watch::Sender<bool>,
    pub(super) active: AtomicBool,
    /// The lease this flusher holds, by its token, and until when for sure.
    lease_until: Mutex<Option<(Arc<str>, Instant)>>,
    /// Acknowledgements are failing (said once).
    pub(super) acks_failing: AtomicBool,
}

impl Shared {
    pub(super) fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Whether the lease is this flusher's for sure now: a handler call
    /// starts only then, whatever the renewal task has had time to say (a
    /// process that stalled past its lease wakes with its deadline passed).
    pub(super) fn holds_lease(&self) -> bool {
        let held = self.lease_until.lock().unwrap_or_else(|e| e.into_inner());
        held.as_ref().is_some_and(|(_, until)| Instant::now() < *until)
    }

    /// Holds the lease taken under `token` until `until`.
    pub(super) fn hold_lease(&self, token: &Arc<str>, until: Instant) {
        *self.lease_until.lock().unwrap_or_else(|e| e.into_inner()) = Some((token.clone(), until));
    }

    /// Moves the deadline of the lease held under `token` to `until`, unless
    /// that lease has been let go or its deadline has passed: a lease this
    /// flusher stopped acting on is never taken up again, though a renewal
    /// answered late says Redis still has it. Whether it was moved.
    pub(super) fn extend_lease(&self, token: &str, until: Instant) -> bool {
        let mut held = self.lease_until.lock().unwrap_or_else(|e| e.into_inner());
        match held.as_mut() {
            Some((mine, deadline)) if &**mine == token && Instant::now() < *deadline => {
                *deadline = until;
                true
            }
            _ => false,
        }
    }

    /// Lets go of the lease held under `token`, if it is still the one held.
    pub(super) fn let_go(&self, token: &str) {
        let mut held = self.lease_until.lock().unwrap_or_else(|e| e.into_inner());
        if held.as_ref().is_some_and(|(mine, _)| &**mine == token) {
            *held = None;
        }
    }

    /// Jobs held in memory at most: enough to keep every handler slot busy
    /// across keys, few enough that a takeover re-reads little.
    fn capacity(&self) -> usize {
        (self.concurrency * 8).max(64)
    }

    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        let wait = self.backoff.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        jittered(wait.min(self.backoff_max))
    }
}

/// A Redis fault seen by a loop that retries: warned once when it starts,
/// said once when it ends, and the next wait, backing off.
struct Faults {
    what: &'static str,
    failing: bool,
    backoff: Duration,
}

impl Faults {
    fn new(what: &'static str) -> Faults {
        Faults { what, failing: false, backoff: MIN_BACKOFF }
    }

    fn failed(&mut self, e: &CacheError) -> Duration {
        if self.failing {
            tracing::debug!(error = %e, "{}: Redis fault, still retrying", self.what);
        } else {
            tracing::warn!(error = %e, "{}: Redis fault; retrying with backoff until it answers", self.what);
        }
        self.failing = true;
        let wait = jittered(self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        wait
    }

    fn recovered(&mut self) {
        if self.failing {
            tracing::info!("{}: Redis answers again", self.what);
        }
        self.failing = false;
        self.backoff = MIN_BACKOFF;
    }
}

/// Stands by, holds the lease, runs sessions, until stopped.
async fn run(shared: Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    let mut faults = Faults::new("write-behind flusher");
    // A standby asks this often whether the lease is free.
    let standby = (shared.lease_ttl / 4).min(Duration::from_secs(1));
    loop {
        if *stop.borrow() {
            return;
        }
        let Ok(redis) = redis_of(&shared.cache) else { return };
        let taking = Instant::now();
        // A token of its own for each lease: nothing sent under an earlier
        // one (a late read, a late release) acts on this one.
        let token: Arc<str> = super::lease::token(shared.me).into();
        let wait = match redis.take_flusher_lease(&shared.keys, &token, shared.lease_ttl).await {
            Ok(true) => {
                faults.recovered();
                let mut lease = Lease::hold(&shared, taking, token);
                tracing::info!("write-behind flusher: active");
                match session(&shared, &mut lease).await {
                    End::Stopped => {
                        lease.release().await;
                        return;
                    }
                    End::Lost => continue,
                }
            }
            Ok(false) => {
                faults.recovered();
                jittered(standby)
            }
            Err(e) => faults.failed(&e),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Stopped,
    Lost,
}

/// Delivers jobs while the lease holds: reads, and hands each job to its
/// key's worker.
async fn session(shared: &Arc<Shared>, lease: &mut Lease) -> End {
    let (token, lost) = (lease.token.clone(), &mut lease.lost);
    shared.active.store(true, Ordering::Release);
    let mut stop = shared.stop.subscribe();
    let mut workers = JoinSet::new();
    // The pending list first, from its start: the jobs an earlier active
    // flusher read and did not settle (it died, or lost the lease).
    let mut reader = Reader {
        conn: None,
        node: None,
        after: Some("0".into()),
        faults: Faults::new("write-behind reader"),
    };
    let mut gauges_at = Instant::now();
    let end = loop {
        while workers.try_join_next().is_some() {}
        if *stop.borrow() {
            break End::Stopped;
        }
        // The renewal task and a refused read let the lease go before they wake this loop.
        if !shared.holds_lease() {
            break End::Lost;
        }
        let room = shared.capacity().saturating_sub(shared.held.load(Ordering::Acquire));
        let read = tokio::select! {
            read = reader.read(shared, &token, room), if room > 0 => read,
            // Woken by a settled job, and now and then to reap finished workers.
            _ = shared.room.notified(), if room == 0 => Ok(Vec::new()),
            _ = tokio::time::sleep(Duration::from_millis(100)), if room == 0 => Ok(Vec::new()),
            _ = stop.changed() => Ok(Vec::new()),
            _ = lost.changed() => Ok(Vec::new()),
        };
        match read {
            Ok(entries) => {
                for entry in entries {
                    super::worker::dispatch(shared, &mut workers, entry);
                }
            }
            Err(wait) => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                    _ = lost.changed() => {}
                }
            }
        }
        if gauges_at.elapsed() >= GAUGES_EVERY {
            gauges_at = Instant::now();
            refresh_gauges(shared).await;
        }
    };
    if end == End::Lost {
        workers.abort_all();
    }
    // Stopped: each worker ends after its job in flight (see `deliver`).
    while workers.join_next().await.is_some() {}
    // What was read and not settled stays pending in Redis for the next active flusher.
    shared.queues.lock().unwrap_or_else(|e| e.into_inner()).clear();
    shared.held.store(0, Ordering::Release);
    refresh_gauges(shared).await;
    end
}

async fn refresh_gauges(shared: &Shared) {
    let Ok(redis) = redis_of(&shared.cache) else { return };
    if let Ok(figures) = redis.queue_figures(&shared.keys).await {
        let metrics = &shared.cache.inner.metrics.write_behind;
        metrics.queue_length.set(figures.length as i64);
        metrics.oldest_job_age.set(figures.oldest_age.as_secs_f64());
    }
}

/// The session's connection of its own and where its reads are.
struct Reader {
    conn: Option<Dedicated>,
    /// The cluster node a MOVED named: where the queue's slot lives.
    node: Option<(String, u16)>,
    /// Re-reading the pending list, after this id; `None` once it is read.
    /// Jobs it returns that this session holds already are skipped (`dispatch`).
    after: Option<String>,
    faults: Faults,
}

struct Dedicated {
    conn: MultiplexedConnection,
    driver: AbortHandle,
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Reader {
    /// Up to `count` jobs; `Err` is how long to wait before the next try.
    async fn read(&mut self, shared: &Shared, token: &str, count: usize) -> Result<Vec<Entry>, Duration> {
        let redis = redis_of(&shared.cache).map_err(|_| MAX_BACKOFF)?;
        if self.conn.is_none() {
            // The group first: a read without it fails, and it may have been deleted.
            if let Err(e) = redis.ensure_group(&shared.keys).await {
                return Err(self.faults.failed(&e));
            }
            match open(redis, self.node.as_ref()).await {
                Ok(conn) => self.conn = Some(conn),
                Err(e) => {
                    self.node = None;
                    return Err(self.faults.failed(&e));
                }
            }
        }
        let Some(dedicated) = self.conn.as_mut() else { return Err(MIN_BACKOFF) };
        // A blocked read must end well within the lease: one still blocked in
        // Redis after a takeover would take new jobs into the pending list.
        let block = BLOCK.min(shared.lease_ttl / 6).max(Duration::from_millis(1));
        let limit = block + redis.op_timeout() * 4;
        let (keys, after) = (&shared.keys, self.after.as_deref());
        let read = stream::read(&mut dedicated.conn, &shared.scripts, keys, token, after, count, block);
        match tokio::time::timeout(limit, read).await {
            Ok(Ok(Read::NotHolder)) => {
                tracing::warn!("write-behind flusher: the lease is no longer this flusher's; standing by");
                shared.let_go(token);
                Err(MIN_BACKOFF)
            }
            Ok(Ok(Read::Entries(entries))) => {
                self.faults.recovered();
                if self.after.is_some() {
                    // The pending list is read once it reads empty; new jobs from then on.
                    self.after = entries.last().map(|last| last.id.clone());
                }
                Ok(entries)
            }
            // `MOVED {slot} {host}:{port}`: the queue's slot lives on that node.
            Ok(Err(CacheError::Redis(e))) if e.redirect_node().is_some() => {
                self.node = e.redirect_node().and_then(|(addr, _slot)| {
                    let (host, port) = addr.rsplit_once(':')?;
                    Some((host.to_owned(), port.parse().ok()?))
                });
                self.conn = None;
                Ok(Vec::new())
            }
            // Redis may have run a `>` read whose reply was lost: its jobs are
            // pending and held by nobody. The pending list is read again
            // (skipping the jobs held here) before any newer job, so none is
            // left behind and each key keeps its order.
            Ok(Err(e)) => {
                self.conn = None;
                self.after.get_or_insert_with(|| "0".into());
                Err(self.faults.failed(&e))
            }
            Err(_) => {
                self.conn = None;
                self.after.get_or_insert_with(|| "0".into());
                Err(self.faults.failed(&CacheError::Timeout(limit)))
            }
        }
    }
}

async fn open(redis: &RedisStore, node: Option<&(String, u16)>) -> Result<Dedicated, CacheError> {
    let mut failed = CacheError::Unavailable("no Redis node to read the write-behind queue from".into());
    let node = node.map(|(host, port)| (host.as_str(), *port));
    for endpoint in &redis.listeners {
        match endpoint.open_dedicated(node, redis.connect_timeout).await {
            Ok((conn, driver)) => return Ok(Dedicated { conn, driver }),
            Err(e) => failed = e,
        }
    }
    Err(failed)
}
