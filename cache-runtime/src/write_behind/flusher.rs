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
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use redis::aio::MultiplexedConnection;
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

use super::redis_of;
use super::stream::{self, Entry, Keys, Scripts};
use crate::bus::jittered;
use crate::redis_store::RedisStore;
use crate::store::BoxFuture;
use crate::{Cache, CacheError};

/// The longest one read waits for a new job: how long a flusher can take to
/// notice a stop it was not woken for.
const BLOCK: Duration = Duration::from_secs(2);
/// Reconnecting and retrying Redis back off between these.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the flusher refreshes the queue's gauges.
const GAUGES_EVERY: Duration = Duration::from_secs(1);

/// One job, as the handler gets it.
#[derive(Debug)]
pub struct Job<J> {
    job: J,
    key: String,
    id: String,
    attempt: u32,
    redelivered: bool,
}

impl<J> Job<J> {
    /// The job, decoded.
    pub fn job(&self) -> &J {
        &self.job
    }

    /// The job, owned.
    pub fn into_job(self) -> J {
        self.job
    }

    /// The cache key it was queued with.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// A key unique to this job and the same at every delivery of it (its
    /// stream entry id): apply the job under it (a unique key, a conditional
    /// write) and a job delivered twice takes effect once.
    pub fn idempotency_key(&self) -> &str {
        &self.id
    }

    /// This delivery's attempt, from 1; a job delivered again after a
    /// flusher died counts from 1 again.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the job was read back from the jobs in flight of an earlier
    /// active flusher (one that died or lost its lease): it may have been applied already.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }
}

/// What one attempt came to.
enum Outcome {
    Applied,
    Failed(String),
    /// Not a job this handler reads: retrying can't help.
    Unreadable(String),
}

type Apply = Arc<dyn Fn(&Entry, u32) -> BoxFuture<'static, Outcome> + Send + Sync>;

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
        let apply: Apply = Arc::new(move |entry: &Entry, attempt: u32| -> BoxFuture<'static, Outcome> {
            let Some((key, bytes)) = &entry.job else {
                return Box::pin(std::future::ready(Outcome::Unreadable("the entry holds no job".into())));
            };
            let job = match serde_json::from_slice::<J>(bytes) {
                Ok(job) => job,
                Err(e) => {
                    return Box::pin(std::future::ready(Outcome::Unreadable(format!("undecodable job: {e}"))))
                }
            };
            let job =
                Job { job, key: key.clone(), id: entry.id.clone(), attempt, redelivered: entry.redelivered };
            // A handler that panics, building its future or running it, fails this attempt only.
            let Ok(fut) = std::panic::catch_unwind(AssertUnwindSafe(|| handler(job))) else {
                return Box::pin(std::future::ready(Outcome::Failed("the handler panicked".into())));
            };
            Box::pin(AssertUnwindSafe(fut).catch_unwind().map(|done| match done {
                Ok(Ok(())) => Outcome::Applied,
                Ok(Err(e)) => Outcome::Failed(e.to_string()),
                Err(_) => Outcome::Failed("the handler panicked".into()),
            }))
        });
        Flusher { cache, apply }
    }
}

impl Flusher {
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
            token: token(self.cache.inner.tiers.bus.me()),
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

struct Shared {
    cache: Cache,
    apply: Apply,
    keys: Keys,
    scripts: Scripts,
    /// This flusher's lease token.
    token: String,
    concurrency: usize,
    max_attempts: u32,
    backoff: Duration,
    backoff_max: Duration,
    lease_ttl: Duration,
    /// Handler calls running at once.
    permits: Semaphore,
    /// The jobs read and not settled yet, by cache key; a key is here while a worker runs its jobs.
    queues: Mutex<HashMap<String, VecDeque<Entry>>>,
    held: AtomicUsize,
    /// A job settled: there is room to read more.
    room: Notify,
    /// Set by a graceful shutdown.
    stop: watch::Sender<bool>,
    active: AtomicBool,
    /// Acknowledgements are failing (said once).
    acks_failing: AtomicBool,
}

impl Shared {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Jobs held in memory at most: enough to keep every handler slot busy
    /// across keys, few enough that a takeover re-reads little.
    fn capacity(&self) -> usize {
        (self.concurrency * 8).max(64)
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let wait = self.backoff.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        jittered(wait.min(self.backoff_max))
    }
}

fn token(me: u64) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{me:x}:{}:{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
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
        let wait = match redis.take_flusher_lease(&shared.keys, &shared.token, shared.lease_ttl).await {
            Ok(true) => {
                faults.recovered();
                let mut lease = Lease::hold(&shared);
                tracing::info!("write-behind flusher: active");
                match session(&shared, &mut lease.lost).await {
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

/// The lease while this flusher holds it: renewed by a task of its own, which
/// says when it can no longer prove it holds it.
struct Lease {
    shared: Arc<Shared>,
    lost: watch::Receiver<bool>,
    renewal: AbortHandle,
    released: bool,
}

impl Lease {
    fn hold(shared: &Arc<Shared>) -> Lease {
        let (tell, lost) = watch::channel(false);
        let renewal = tokio::spawn(renew(shared.clone(), tell)).abort_handle();
        Lease { shared: shared.clone(), lost, renewal, released: false }
    }

    async fn release(&mut self) {
        self.renewal.abort();
        self.released = true;
        if let Ok(redis) = redis_of(&self.shared.cache) {
            let shared = &self.shared;
            if let Err(e) = redis.release_flusher_lease(&shared.scripts, &shared.keys, &shared.token).await {
                tracing::debug!(error = %e, "write-behind flusher: lease not released; it expires");
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
        self.shared.active.store(false, Ordering::Release);
        if self.released {
            return;
        }
        // Dropped with the flusher: let a standby take over now, not when the lease expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            runtime.spawn(async move {
                if let Ok(redis) = redis_of(&shared.cache) {
                    let _ = redis.release_flusher_lease(&shared.scripts, &shared.keys, &shared.token).await;
                }
            });
        }
    }
}

/// Renews every third of the lease. A renewal refused means another flusher
/// holds it; renewals that fail for two thirds of the lease mean this one can
/// no longer be sure it holds it, and must stop before it could have expired.
async fn renew(shared: Arc<Shared>, lost: watch::Sender<bool>) {
    let ttl = shared.lease_ttl;
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        loop {
            let attempt = Instant::now();
            let result = match redis_of(&shared.cache) {
                Ok(redis) => {
                    redis.renew_flusher_lease(&shared.scripts, &shared.keys, &shared.token, ttl).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(true) => {
                    renewed = attempt;
                    break;
                }
                Ok(false) => {
                    tracing::warn!(
                        "write-behind flusher: the lease expired and another flusher took it; standing by"
                    );
                    lost.send_replace(true);
                    return;
                }
                Err(e) if renewed.elapsed() >= ttl * 2 / 3 => {
                    tracing::warn!(error = %e, "write-behind flusher: the lease could not be renewed in time; standing by");
                    lost.send_replace(true);
                    return;
                }
                Err(_) => tokio::time::sleep(ttl / 12).await,
            }
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
async fn session(shared: &Arc<Shared>, lost: &mut watch::Receiver<bool>) -> End {
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
        if *lost.borrow() {
            break End::Lost;
        }
        let room = shared.capacity().saturating_sub(shared.held.load(Ordering::Acquire));
        let read = tokio::select! {
            read = reader.read(shared, room), if room > 0 => read,
            // Woken by a settled job, and now and then to reap finished workers.
            _ = shared.room.notified(), if room == 0 => Ok(Vec::new()),
            _ = tokio::time::sleep(Duration::from_millis(100)), if room == 0 => Ok(Vec::new()),
            _ = stop.changed() => Ok(Vec::new()),
            _ = lost.changed() => Ok(Vec::new()),
        };
        match read {
            Ok(entries) => {
                for entry in entries {
                    dispatch(shared, &mut workers, entry);
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
    /// Re-reading the pending list, after this id; `None` once it is read:
    /// the jobs of this session held in memory are not read again after a reconnect.
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
    async fn read(&mut self, shared: &Shared, count: usize) -> Result<Vec<Entry>, Duration> {
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
        let limit = BLOCK + redis.op_timeout() * 4;
        let read = stream::read(&mut dedicated.conn, &shared.keys, self.after.as_deref(), count, BLOCK);
        match tokio::time::timeout(limit, read).await {
            Ok(Ok(entries)) => {
                self.faults.recovered();
                if self.after.is_some() {
                    // The pending list is read once it reads empty; new jobs from then on.
                    self.after = entries.last().map(|last| last.id.clone());
                }
                Ok(entries)
            }
            Ok(Err(CacheError::Redis(e))) if e.redirect_node().is_some() => {
                self.node = e.redirect_node().map(|(host, port)| (host.to_owned(), port));
                self.conn = None;
                Ok(Vec::new())
            }
            Ok(Err(e)) => {
                self.conn = None;
                Err(self.faults.failed(&e))
            }
            Err(_) => {
                self.conn = None;
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

fn dispatch(shared: &Arc<Shared>, workers: &mut JoinSet<()>, entry: Entry) {
    let key = entry.job.as_ref().map(|(key, _)| key.clone()).unwrap_or_default();
    shared.held.fetch_add(1, Ordering::AcqRel);
    let mut queues = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(queue) = queues.get_mut(&key) {
        queue.push_back(entry);
        return;
    }
    queues.insert(key.clone(), VecDeque::from([entry]));
    drop(queues);
    workers.spawn(work(shared.clone(), key));
}

/// Runs one key's jobs in order, one at a time, until none is left.
async fn work(shared: Arc<Shared>, key: String) {
    loop {
        let entry = {
            let queues = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            match queues.get(&key).and_then(VecDeque::front) {
                Some(entry) => entry.clone(),
                None => return,
            }
        };
        let settled = deliver(&shared, &entry).await;
        let mut queues = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
        let Some(queue) = queues.get_mut(&key) else { return };
        let done = if settled { queue.pop_front().map_or(0, |_| 1) } else { queue.len() };
        // Stopping: this key's other jobs stay pending in Redis, in order, for the next active flusher.
        if !settled || queue.is_empty() {
            queues.remove(&key);
        }
        let more = queues.contains_key(&key);
        drop(queues);
        shared.held.fetch_sub(done, Ordering::AcqRel);
        shared.room.notify_one();
        if !more {
            return;
        }
    }
}

/// Tries `entry` until it is applied or dead-lettered, and settles it in
/// Redis; `false` if a shutdown came first.
async fn deliver(shared: &Shared, entry: &Entry) -> bool {
    let mut stop = shared.stop.subscribe();
    let metrics = &shared.cache.inner.metrics.write_behind;
    let mut attempt = 0;
    loop {
        attempt += 1;
        if shared.stopping() {
            return false;
        }
        let Ok(permit) = shared.permits.acquire().await else { return false };
        if shared.stopping() {
            return false;
        }
        let outcome = (shared.apply)(entry, attempt).await;
        drop(permit);
        let error = match outcome {
            Outcome::Applied => {
                settle(shared, entry, None).await;
                metrics.applied.inc();
                return true;
            }
            Outcome::Unreadable(error) => {
                tracing::warn!(id = %entry.id, "write-behind: a job the handler can't read; dead-lettered");
                error
            }
            Outcome::Failed(error) if attempt >= shared.max_attempts => {
                tracing::warn!(id = %entry.id, attempts = attempt, "write-behind: a job failed every attempt; dead-lettered");
                error
            }
            Outcome::Failed(error) => {
                metrics.retries.inc();
                tracing::debug!(id = %entry.id, attempt, error = %error, "write-behind: a job failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(shared.backoff(attempt)) => {}
                    _ = stop.changed() => return false,
                }
                continue;
            }
        };
        settle(shared, entry, Some((&error, attempt))).await;
        metrics.dead_letters.inc();
        return true;
    }
}

/// Acknowledges `entry`, or dead-letters it with `error` after so many
/// attempts, retrying while Redis can't take it. A shutdown gives up after
/// one failure: the job is then delivered again by the next active flusher.
async fn settle(shared: &Shared, entry: &Entry, dead: Option<(&str, u32)>) {
    let mut wait = MIN_BACKOFF;
    loop {
        let Ok(redis) = redis_of(&shared.cache) else { return };
        let done = match dead {
            None => redis.ack(&shared.scripts, &shared.keys, &entry.id).await,
            Some((error, attempts)) => {
                redis.dead_letter(&shared.scripts, &shared.keys, entry, error, attempts).await
            }
        };
        match done {
            Ok(()) => {
                if shared.acks_failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("write-behind: acknowledgements reach Redis again");
                }
                return;
            }
            Err(e) => {
                if !shared.acks_failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(error = %e, "write-behind: acknowledgements fail; retrying until Redis takes them");
                }
                if shared.stopping() {
                    return;
                }
                tokio::time::sleep(jittered(wait)).await;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
        }
    }
}
