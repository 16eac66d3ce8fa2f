//! Durable write-behind: the cache is written at once, the database later, by
//! a flusher, from a queue in Redis that outlives the process that queued.
//!
//! [`Cache::write_behind`] first appends the job to a Redis stream, then
//! writes the value as [`Cache::set`] does. A job Redis did not take is an
//! error and nothing is written to the cache; a job Redis took is never lost
//! afterwards, whatever the cache write did, and the result says whether the
//! cache part is done.
//!
//! [`Cache::write_behind_flusher`] starts a flusher that hands the jobs to an
//! async handler. Of all the flushers started against one Redis and prefix,
//! one is active at a time (a lease in Redis, renewed while it lives); the
//! others stand by and take over when its lease expires. A job is
//! acknowledged (and removed) only after the handler returned `Ok`; one that
//! keeps failing goes to a dead-letter stream with its last error. A new
//! active flusher first re-reads the jobs its predecessor had read but not
//! acknowledged: that is how jobs in flight in a process that died are
//! delivered again.
//!
//! The guarantee: every job queued is delivered to a handler at least once,
//! until it succeeds or is dead-lettered; a handler that applies each job
//! under its [`idempotency key`](Job::idempotency_key) (a unique key or a
//! conditional write in the database) applies each job's effect exactly once.
//! Jobs of one cache key are handed over in the order they were queued, one
//! at a time; a job that is being retried holds back the later ones of its key.

mod flusher;
mod job;
mod lease;
mod stream;
mod worker;

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use serde::Serialize;

use crate::cache::{Mode, Set};
use crate::codec::Storable;
use crate::redis_store::RedisStore;
use crate::{Cache, CacheError, IntoTtl};

pub use flusher::{Flusher, FlusherHandle};
pub use job::Job;
pub(crate) use stream::Figures;

impl Cache {
    /// Queues `job` for the database durably, then writes `value` at `key`
    /// as [`set`](Self::set) does (`.ttl(..)` and `.tags(..)` refine it).
    /// A flusher started with [`write_behind_flusher`](Self::write_behind_flusher),
    /// in this process or another, hands the job to its handler.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), cache_runtime::CacheError> {
    /// # let cache = cache_runtime::Cache::new(Default::default()).await?;
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct SaveMission { id: u64, status: String }
    ///
    /// let queued = cache
    ///     .write_behind("missions:7", "launched", &SaveMission { id: 7, status: "launched".into() })
    ///     .ttl(300)
    ///     .await?;
    /// if !queued.is_done() {
    ///     // The job is queued, but the cache holds no value for the key (yet).
    ///     tracing::warn!(cache = ?queued.cache(), "write-behind: cache not written");
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// Every error means the job was not queued, and the cache was not written:
    /// those of [`set`](Self::set) found before anything is sent
    /// ([`CacheError::InvalidArgument`], [`CacheError::Encode`] for the value
    /// or the job, [`CacheError::TooLarge`]); [`CacheError::Unavailable`]
    /// without Redis (write-behind has no local mode); and the errors of the
    /// append to the stream. One exception: after a [`CacheError::Timeout`]
    /// Redis may still have appended the job (the reply was late, not the
    /// request), so the job may be delivered even though this call failed.
    ///
    /// # Cancel safety
    ///
    /// Dropped before the append's reply, the job may or may not be queued;
    /// after it, the cache write may not have happened, and no invalidation
    /// makes up for it: an older value can be read until it expires.
    pub fn write_behind<'a, T, J>(&'a self, key: &'a str, value: &'a T, job: &'a J) -> WriteBehind<'a, T, J>
    where
        T: Storable + ?Sized + Sync,
        J: Serialize + ?Sized + Sync,
    {
        WriteBehind { set: self.set(key, value), job }
    }

    /// A flusher of this cache's write-behind queue, with `handler` applying
    /// each job; [`start`](Flusher::start) it. See [`Job`] for what the
    /// handler gets, and the module's guarantee in the README's "Write-behind".
    ///
    /// ```no_run
    /// use cache_runtime::{Cache, Job};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), cache_runtime::CacheError> {
    /// # let cache = Cache::new(Default::default()).await?;
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct SaveMission { id: u64, status: String }
    ///
    /// let flusher = cache
    ///     .write_behind_flusher(|job: Job<SaveMission>| async move {
    ///         // e.g. INSERT … ON CONFLICT (idempotency_key) DO NOTHING
    ///         let (_key, _mission) = (job.idempotency_key(), job.job());
    ///         Ok::<(), String>(())
    ///     })
    ///     .start()?;
    /// // … on the way out: finishes the jobs in flight, leaves the rest queued.
    /// flusher.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn write_behind_flusher<J, F, Fut, E>(&self, handler: F) -> Flusher
    where
        J: serde::de::DeserializeOwned + Send + 'static,
        F: Fn(Job<J>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        Flusher::new(self.clone(), handler)
    }
}

/// The Redis server of `cache`'s queue.
fn redis_of(cache: &Cache) -> Result<&RedisStore, CacheError> {
    cache.inner.tiers.shared_store().and_then(|store| store.redis()).ok_or_else(|| {
        CacheError::Unavailable("write-behind needs Redis: this cache has none configured".into())
    })
}

/// The queue's length and oldest job's age, for `stats()`; `None` without
/// Redis or when it can't be asked now (`stats()` degrades, it does not fail).
pub(crate) async fn queue_figures(cache: &Cache) -> Option<Figures> {
    let redis = redis_of(cache).ok()?;
    match redis.queue_figures(&stream::Keys::new(&cache.inner.schema)).await {
        Ok(figures) => Some(figures),
        Err(e) => {
            tracing::debug!(error = %e, "write-behind queue figures not read");
            None
        }
    }
}

/// A pending [`Cache::write_behind`]; await it to queue the job and write the value.
#[must_use = "a WriteBehind does nothing until awaited"]
pub struct WriteBehind<'a, T: ?Sized, J: ?Sized> {
    set: Set<'a, T>,
    job: &'a J,
}

impl<'a, T, J> WriteBehind<'a, T, J>
where
    T: Storable + ?Sized + Sync,
    J: Serialize + ?Sized + Sync,
{
    /// The value's time to live, as [`Set::ttl`].
    pub fn ttl(mut self, ttl: impl IntoTtl) -> Self {
        self.set = self.set.ttl(ttl);
        self
    }

    /// The value's tags, as [`Set::tags`].
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.set = self.set.tags(tags);
        self
    }

    async fn run(self) -> Result<Queued, CacheError> {
        // Jobs are JSON whatever the cache's format: they outlive deploys and
        // are read by people in the dead-letter stream.
        let job = serde_json::to_vec(self.job).map_err(|e| CacheError::Encode {
            format: "json",
            message: format!("the write-behind job: {e}"),
        })?;
        let set = self.set.prepare()?;
        let (cache, key) = (set.cache, set.key);
        let redis = redis_of(cache)?;
        let id = token();
        redis.enqueue(&stream::Keys::new(&cache.inner.schema), key, &job, &id).await?;
        let written = match set.write().await {
            Ok(()) if cache.mode() == Mode::Redis => return Ok(Queued { id, cache: CacheWrite::Written }),
            // The breaker opened: the value went to this process's local tier only,
            // and the other instances would go on reading the older one from Redis.
            Ok(()) => {
                CacheError::Unavailable("the breaker is open: the value reached this process only".into())
            }
            // Redis took the value, but a queued invalidation will delete it.
            Err(e @ CacheError::Deferred(_)) => return Ok(Queued { id, cache: CacheWrite::Invalidated(e) }),
            Err(e) => e,
        };
        // The job will change the database: the value the cache holds now is
        // older than it, so it must go.
        let cache_write = match cache.delete(key).await {
            Ok(_) | Err(CacheError::Deferred(_)) => CacheWrite::Invalidated(written),
            Err(e) => {
                tracing::warn!(error = %e, "write-behind: the cache write and the invalidation after it both failed");
                CacheWrite::Stale(written)
            }
        };
        Ok(Queued { id, cache: cache_write })
    }
}

impl<'a, T, J> IntoFuture for WriteBehind<'a, T, J>
where
    T: Storable + ?Sized + Sync,
    J: Serialize + ?Sized + Sync,
{
    type Output = Result<Queued, CacheError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

/// A job Redis took: it will be delivered. [`is_done`](Self::is_done) says
/// whether the cache part is done too.
#[derive(Debug)]
#[must_use = "the cache part of a write-behind may not be done: check `is_done`"]
pub struct Queued {
    id: String,
    cache: CacheWrite,
}

impl Queued {
    /// The job's idempotency key: what its handler gets as
    /// [`Job::idempotency_key`].
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What became of the cache write.
    pub fn cache(&self) -> &CacheWrite {
        &self.cache
    }

    /// Whether the value is in the cache as [`Cache::set`] leaves it.
    pub fn is_done(&self) -> bool {
        matches!(self.cache, CacheWrite::Written)
    }
}

/// What became of the cache write of a queued write-behind job.
#[derive(Debug)]
#[non_exhaustive]
pub enum CacheWrite {
    /// Written to Redis and announced, as [`Cache::set`] does.
    Written,
    /// Not written (the error says why), or written and about to be deleted:
    /// the key was deleted, or its deletion queued, so no value older than the
    /// job is read here, nor by other instances once the deletion is replayed.
    Invalidated(CacheError),
    /// Not written, and the key could not be invalidated either: the value
    /// the cache held before may be read until it expires.
    Stale(CacheError),
}

/// A new idempotency key: 128 bits, unique across processes (a keyed hash of
/// a counter, keyed by this process's id and start), as text.
fn token() -> String {
    static SEED: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = SEED.get_or_init(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut hasher = blake3::Hasher::new();
        hasher.update(&std::process::id().to_le_bytes());
        hasher.update(&now.as_nanos().to_le_bytes());
        hasher.update(&(&NEXT as *const _ as usize).to_le_bytes());
        *hasher.finalize().as_bytes()
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let hash = blake3::keyed_hash(seed, &n.to_le_bytes());
    hash.to_hex()[..32].to_owned()
}
