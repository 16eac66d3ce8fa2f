//! The [`Cache`] handle and the process-wide default.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use tracing::instrument::WithSubscriber;
use tracing::Instrument;

use crate::background::{Background, Thread};
use crate::breaker::{Breaker, BreakerState};
use crate::bus::{Bus, Event};
use crate::codec::{self, Storable};
use crate::config::CacheConfig;
use crate::failover::{Coherence, Failover};
use crate::flight::Flights;
use crate::key::display_key;
use crate::local::LocalTier;
use crate::metrics::{Metrics, Op};
use crate::misconfig::Misconfig;
use crate::near::Near;
use crate::pending::Pending;
use crate::redis_store::RedisStore;
use crate::redis_tier::RedisTier;
use crate::schema::Schema;
use crate::seal::Sealer;
use crate::stats::{CacheStats, Counters, Health};
use crate::store::{FillFence, Raw, Store, Write};
use crate::{CacheError, IntoTtl};

/// Which store serves the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Redis is the store; entries are shared by every process using it.
    Redis,
    /// The in-process tier is the store.
    Local,
}

impl Mode {
    /// `"redis"` or `"local"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Redis => "redis",
            Mode::Local => "local",
        }
    }
}

/// The remaining lifetime of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyTtl {
    /// No such key.
    Missing,
    /// The key exists and never expires (written by something other than this cache).
    Persistent,
    /// The key expires after this long.
    Expires(Duration),
}

impl KeyTtl {
    /// Remaining whole seconds in Redis's `TTL` convention: -2 missing, -1 no expiry.
    pub fn as_redis_secs(self) -> i64 {
        match self {
            KeyTtl::Missing => -2,
            KeyTtl::Persistent => -1,
            KeyTtl::Expires(d) => d.as_secs() as i64,
        }
    }
}

/// A cache: cheap to clone, `Send + Sync`; clones share everything.
///
/// # Cancel safety
///
/// Every method's future can be dropped at any `.await` without leaving a
/// connection out of sync: replies are matched to requests by the connection's
/// own driver task, so a command already sent completes in Redis (and counts as
/// sent) whether or not anyone waits for it. What a dropped call did or did not
/// do is said under each method.
///
/// While invalidations are queued ([`CacheError::Deferred`]), the first call
/// that finds Redis usable replays the queue before its own command. A call
/// dropped during that replay puts back what it had not applied yet, and the
/// next call replays it (invalidations are idempotent, so one cut off
/// mid-command is simply applied again); nothing is served from Redis until
/// the queue is empty.
#[derive(Clone)]
pub struct Cache {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: CacheConfig,
    pub(crate) schema: Schema,
    /// The tiers: Redis (when configured) with the local tier behind it.
    pub(crate) tiers: Arc<Failover>,
    pub(crate) counters: Counters,
    pub(crate) metrics: Metrics,
    pub(crate) flights: Flights,
    /// Start-up warmers still running (`warmers.rs`).
    pub(crate) warming: std::sync::atomic::AtomicUsize,
    /// Which prefixes are encrypted in Redis (`seal.rs`), shared with the Redis tier.
    pub(crate) sealer: Arc<Sealer>,
    /// The runtime the Redis connections and upkeep loops live on, when Redis is configured.
    background: Option<Background>,
    /// In local mode, the thread the gauge refresh runs on (Redis mode uses `background`).
    upkeep: Option<Thread>,
}

impl AsRef<Cache> for Cache {
    fn as_ref(&self) -> &Cache {
        self
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("mode", &self.mode())
            .field("redis", &self.inner.config.redis)
            .field("key_prefix", &self.inner.config.key_prefix)
            .finish()
    }
}

impl Cache {
    /// Builds a cache from `config`. With Redis configured and reachable the mode is
    /// `redis`; with none configured, or none reachable now, it is `local`, said once
    /// in the log, and a background health check switches to `redis` once Redis answers.
    ///
    /// # Errors
    ///
    /// A Redis that answers but refuses the cache is an error, not a fallback:
    /// [`CacheError::Auth`] for a wrong or missing password,
    /// [`CacheError::Permission`] when the ACL user lacks a command or key pattern
    /// the cache uses (each is tried once here), and [`CacheError::Config`] for a
    /// URL that can't be used or a setting Redis shows to be wrong (a
    /// `master_name` no sentinel watches, a `cluster_shards` other instances
    /// of the prefix don't use). [`CacheError::NoRuntime`] when the cache's own
    /// threads can't be started.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes leaves no cache behind: the
    /// upkeep loops are spawned only once the connection check is done.
    pub async fn new(config: CacheConfig) -> Result<Cache, CacheError> {
        config.check_bounds()?;
        let Some(target) = config.redis().cloned() else {
            tracing::info!(prefix = %config.key_prefix, "no Redis configured: cache runs in local mode");
            return Ok(Cache::local(config));
        };
        let metrics = Metrics::for_config(&config);
        let misconfig = Arc::new(Misconfig::new(metrics.config_errors.clone()));
        // Named by its settings key, whichever of the file, the environment or
        // the builder it came from (`REDIS_URL` is the variable for `url`).
        let refused = |reason: String| CacheError::config("url", &target, reason);
        let background = Background::start()?;
        let runtime = background.handle().clone();
        let store =
            RedisStore::new(&config, &target, misconfig.clone(), &background).map_err(|e| match e {
                CacheError::Redis(e) => refused(e.to_string()),
                other => other,
            })?;
        let connect = config.socket_connect_timeout.max(config.operation_timeout());
        let schema = Schema::new(&config.key_prefix, store.shards());
        let signer = match config.signing_key() {
            // However it was set (builder, settings, environment): a short key is a guessable one.
            Some(key) if key.chars().count() < 16 => {
                return Err(CacheError::config("signing_key", "***", "must be at least 16 characters"));
            }
            key => key.map(crate::sign::Signer::new),
        };
        let sealer = Arc::new(Sealer::new(
            config.encryption_keys(),
            config.sensitive_prefixes(),
            &config.key_prefix,
            schema.shards() > 1,
        )?);
        let redis =
            RedisTier::new(store, schema.clone(), connect, config.big_value_bytes, signer, sealer.clone());
        let shared = Some((Box::new(redis) as Box<dyn Store>, background));
        let cache = Cache::assemble(config, schema, metrics, misconfig, sealer, shared);
        if cache.inner.tiers.start().await? == Mode::Redis {
            tracing::info!(redis = %target, prefix = %cache.inner.config.key_prefix, "cache runs in redis mode");
        }
        Failover::spawn_loops(&cache.inner.tiers, cache.inner.config.health_check_interval, &runtime);
        cache.spawn_gauge_loop(&runtime);
        Ok(cache)
    }

    /// [`new`](Self::new), then `warmers` in the background, `warmup_concurrency`
    /// at a time (none if `warmup_enabled` is off): [`health`](Self::health)
    /// says `ready: false` until the last one ends. A warmer that fails or
    /// panics is logged at error level and stops nothing.
    ///
    /// # Errors
    ///
    /// Those of [`new`](Self::new).
    pub async fn new_with_warmers(config: CacheConfig, warmers: crate::Warmers) -> Result<Cache, CacheError> {
        let cache = Cache::new(config).await?;
        cache.start_warmers(warmers);
        Ok(cache)
    }

    /// A cache in local mode, whatever `config` says about Redis.
    pub fn local(config: CacheConfig) -> Cache {
        let metrics = Metrics::for_config(&config);
        let misconfig = Arc::new(Misconfig::new(metrics.config_errors.clone()));
        let schema = Schema::new(&config.key_prefix, 1);
        let mut cache = Cache::assemble(config, schema, metrics, misconfig, Arc::new(Sealer::local()), None);
        match Thread::start("upkeep") {
            Ok(upkeep) => {
                let runtime = upkeep.handle().clone();
                // Nothing else holds the new cache yet.
                if let Some(inner) = Arc::get_mut(&mut cache.inner) {
                    inner.upkeep = Some(upkeep);
                }
                cache.spawn_gauge_loop(&runtime);
            }
            Err(e) => tracing::warn!(error = %e, "cache gauges are refreshed only by refresh_gauges"),
        }
        cache
    }

    /// Refreshes the gauges every `metrics_refresh_interval` on `runtime`, a
    /// runtime of the cache's own: holding only a weak reference, the loop
    /// ends with the cache.
    fn spawn_gauge_loop(&self, runtime: &tokio::runtime::Handle) {
        let cache = Arc::downgrade(&self.inner);
        let every = self.inner.config.metrics_refresh_interval;
        let refresh = async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = cache.upgrade() else { return };
                if let Err(e) = (Cache { inner }).refresh_gauges().await {
                    tracing::debug!(error = %e, "cache gauges not refreshed");
                }
            }
        };
        runtime.spawn(refresh.with_current_subscriber());
    }

    fn assemble(
        config: CacheConfig,
        schema: Schema,
        metrics: Metrics,
        misconfig: Arc<Misconfig>,
        sealer: Arc<Sealer>,
        shared: Option<(Box<dyn Store>, Background)>,
    ) -> Cache {
        let (shared, background) = shared.unzip();
        let breaker = Breaker::new(
            config.circuit_breaker_enabled,
            config.circuit_breaker_threshold,
            config.circuit_breaker_timeout,
        );
        let local = LocalTier::new(config.local_max_entries, schema.clone());
        let local_fallback = config.local_fallback();
        let coherence = Coherence {
            near: Near::new(config.near_cache_max_entries, config.near_cache_ttl, schema.clone()),
            bus: Bus::new(schema.meta("bus")),
            // A heartbeat comes back over loopback in well under a millisecond;
            // a false alarm costs no more than the near tier's contents.
            heartbeat_timeout: (config.operation_timeout() * 2).max(Duration::from_millis(250)),
        };
        let tiers = Failover::new(
            shared,
            local,
            breaker,
            misconfig,
            metrics.breaker_state.clone(),
            local_fallback,
            coherence,
        );
        Cache {
            inner: Arc::new(Inner {
                tiers: Arc::new(tiers),
                counters: Counters::default(),
                metrics,
                // A marker outlives any read that can still be running (reads time out).
                background,
                upkeep: None,
                flights: Flights::new(config.operation_timeout() * 2 + Duration::from_millis(100)),
                warming: std::sync::atomic::AtomicUsize::new(0),
                sealer,
                schema,
                config,
            }),
        }
    }

    /// The configuration this cache was built from.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Which store serves the cache now: `redis` only while the breaker is closed.
    pub fn mode(&self) -> Mode {
        self.inner.tiers.mode()
    }

    /// The circuit breaker's state (always closed in local-only mode).
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.tiers.breaker().state()
    }

    /// Reads `key`; `None` when it is missing, expired, unreadable (an unreadable
    /// entry is removed, counted and logged) or written for another shape of `T`
    /// (counted, and left for the next write to replace).
    ///
    /// # Errors
    ///
    /// Only while Redis serves (breaker closed): [`CacheError::Timeout`] or
    /// [`CacheError::Redis`] when it does not answer in time or fails,
    /// [`CacheError::Auth`] or [`CacheError::Permission`] when it starts refusing
    /// the cache's credentials or commands, and [`CacheError::NoRuntime`] outside a
    /// Tokio runtime. These count towards the breaker; once it is open, calls are
    /// answered by the local tier and do not fail.
    ///
    /// # Cancel safety
    ///
    /// Reads change nothing: dropping the future is safe, and the connection
    /// stays usable (replies are matched by its driver, not by the caller). See
    /// [`Cache`] for the one exception, a call that was replaying queued
    /// invalidations.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, CacheError> {
        let full = self.full_key(key);
        let raw = self.read(&full, Instant::now()).await?;
        // A fail-safe entry past its expiry is kept for its function's failures only.
        let raw = raw.filter(|raw| !crate::fail_safe::expired(raw));
        let value = raw.and_then(|raw| self.decode_or_drop(&full, &raw));
        self.record_lookup(value.is_some());
        Ok(value)
    }

    /// Writes `key`; `.ttl(..)` and `.tags(..)` refine it before it is awaited.
    ///
    /// The entry records the shape of the type it is read back as ([`Storable`]):
    /// a [`get`](Self::get) of a type of another shape is a miss. A `set` also
    /// refuses the fills of `key` that read before it, so a slower computation
    /// can't put an older value back over it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), cache_runtime::CacheError> {
    /// # let cache = cache_runtime::Cache::local(Default::default());
    /// cache.set("missions:123", "launch").ttl(60).tags(["missions", "queue"]).await?;
    /// assert_eq!(cache.get::<String>("missions:123").await?.as_deref(), Some("launch"));
    /// assert_eq!(cache.invalidate_tags(["queue"]).await?, 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// Before anything is sent: [`CacheError::InvalidArgument`] for a zero TTL,
    /// [`CacheError::Encode`] for a value the format can't hold (a NaN in JSON),
    /// [`CacheError::TooLarge`] over `max_value_bytes`. While Redis serves, the
    /// errors of [`get`](Self::get); during an outage the value goes to the local
    /// tier and only this process sees it, or, with `local_fallback` off,
    /// nowhere: [`CacheError::Unavailable`]. A `set` Redis took but the
    /// other instances' near tiers could not be told of (the bus announces it,
    /// see the README's "Several instances") is [`CacheError::Deferred`]: an
    /// invalidation of `key` is queued, and its replay deletes the value and tells them.
    ///
    /// # Cancel safety
    ///
    /// Nothing happens until the [`Set`] is awaited. Dropped while awaited, the
    /// write may or may not have been applied; it is one command, so never half
    /// of it. A big value's body is written before its entry: a drop between the
    /// two leaves a body nothing points to, which lives out its TTL.
    pub fn set<'a, T: Storable + ?Sized + Sync>(&'a self, key: &'a str, value: &'a T) -> Set<'a, T> {
        Set { cache: self, key, value, ttl: None, tags: Vec::new() }
    }

    /// Deletes `key`; whether it existed. Fills of `key` that read before the
    /// delete are refused, so the old value can't come back.
    ///
    /// # Errors
    ///
    /// [`CacheError::Deferred`] when Redis can't take it now (breaker open,
    /// timeout, connection lost): it was applied to this process's local tier and
    /// queued, not applied to Redis, where other processes may still read the
    /// entry until the queue is replayed (every 200 ms, and before this process
    /// reads from Redis again). An error Redis answered with
    /// ([`CacheError::Permission`], [`CacheError::Auth`], [`CacheError::Redis`])
    /// is returned and not queued, since replaying it would fail forever, as is
    /// [`CacheError::NoRuntime`] outside a Tokio runtime.
    ///
    /// # Cancel safety
    ///
    /// The local tier is updated at the first poll. Dropped after that, the
    /// delete may or may not have reached Redis (one script: all of it or none),
    /// and it is not queued: queueing happens only when the call returns
    /// `Deferred`. Repeat it if you need it to have happened.
    pub async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        Ok(self.invalidate(Op::Delete, Pending::Key(self.full_key(key))).await? > 0)
    }

    /// Whether `key` holds a live entry.
    ///
    /// # Errors
    ///
    /// Only while Redis serves (breaker closed): [`CacheError::Timeout`] or
    /// [`CacheError::Redis`] when it does not answer in time or fails,
    /// [`CacheError::Auth`] or [`CacheError::Permission`] when it starts refusing
    /// the cache's credentials or commands, and [`CacheError::NoRuntime`] outside a
    /// Tokio runtime. These count towards the breaker; once it is open, calls are
    /// answered by the local tier and do not fail.
    ///
    /// # Cancel safety
    ///
    /// Reads change nothing: dropping the future is safe, and the connection
    /// stays usable (replies are matched by its driver, not by the caller). See
    /// [`Cache`] for the one exception, a call that was replaying queued
    /// invalidations.
    pub async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        self.inner.tiers.exists(&self.full_key(key)).await
    }

    /// How long `key` has left.
    ///
    /// # Errors
    ///
    /// Only while Redis serves (breaker closed): [`CacheError::Timeout`] or
    /// [`CacheError::Redis`] when it does not answer in time or fails,
    /// [`CacheError::Auth`] or [`CacheError::Permission`] when it starts refusing
    /// the cache's credentials or commands, and [`CacheError::NoRuntime`] outside a
    /// Tokio runtime. These count towards the breaker; once it is open, calls are
    /// answered by the local tier and do not fail.
    ///
    /// # Cancel safety
    ///
    /// Reads change nothing: dropping the future is safe, and the connection
    /// stays usable (replies are matched by its driver, not by the caller). See
    /// [`Cache`] for the one exception, a call that was replaying queued
    /// invalidations.
    pub async fn ttl(&self, key: &str) -> Result<KeyTtl, CacheError> {
        self.inner.tiers.ttl(&self.full_key(key)).await
    }

    /// Deletes every key matching the Redis glob `pattern` (relative to the prefix);
    /// how many were deleted. Uses SCAN, never KEYS, and UNLINKs in batches, so
    /// a pattern over millions of keys doesn't block Redis.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidArgument`] for an empty pattern, before anything is
    /// sent: [`clear`](Self::clear) says "everything" explicitly.
    /// [`CacheError::Deferred`] when Redis can't take it now: applied to this
    /// process's local tier and queued, not applied to Redis, where other
    /// processes may still read what it covers until the queue is replayed
    /// (every 200 ms). An error Redis answered with is returned and not queued, as
    /// is [`CacheError::NoRuntime`]; see [`delete`](Self::delete).
    ///
    /// # Cancel safety
    ///
    /// The local tier is updated at the first poll. In Redis the pattern is
    /// fenced first (fills that read before it are refused), then matching keys
    /// are deleted batch by batch: dropped mid-way, keys not deleted yet stay
    /// readable until their TTL or a later invalidation covering them. A dropped
    /// call is not queued.
    pub async fn delete_pattern(&self, pattern: &str) -> Result<u64, CacheError> {
        if pattern.is_empty() {
            return Err(CacheError::InvalidArgument(
                "empty pattern (use clear() to delete everything)".into(),
            ));
        }
        let full = self.inner.schema.entries_matching(pattern);
        self.invalidate(Op::DeletePattern, Pending::Pattern(full)).await
    }

    /// Deletes every entry carrying any of `tags`; how many were deleted. Once it
    /// returns, no entry written before it with one of these tags is alive.
    ///
    /// # Errors
    ///
    /// [`CacheError::Deferred`] when Redis can't take it now: applied to this
    /// process's local tier and queued, not applied to Redis, where other
    /// processes may still read what it covers until the queue is replayed
    /// (every 200 ms). An error Redis answered with is returned and not queued, as
    /// is [`CacheError::NoRuntime`]; see [`delete`](Self::delete).
    ///
    /// # Cancel safety
    ///
    /// The local tier is updated at the first poll. In Redis each tag's index
    /// is fenced and set aside in one script, then its entries are deleted 500 at
    /// a time: dropped mid-way, the entries not deleted yet stay readable until
    /// their TTL or the next invalidation of the tag, which finishes the drain
    /// first. A dropped call is not queued.
    pub async fn invalidate_tags<I, S>(&self, tags: I) -> Result<u64, CacheError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let tags = tags.into_iter().map(|t| t.as_ref().to_owned()).collect();
        self.invalidate(Op::InvalidateTags, Pending::Tags(tags)).await
    }

    /// Deletes every entry under this cache's prefix (and its tag index); never
    /// FLUSHDB, so other prefixes and other applications on the same Redis keep
    /// their keys.
    ///
    /// # Errors
    ///
    /// [`CacheError::Deferred`] when Redis can't take it now: applied to this
    /// process's local tier and queued, not applied to Redis, where other
    /// processes may still read what it covers until the queue is replayed
    /// (every 200 ms). An error Redis answered with is returned and not queued, as
    /// is [`CacheError::NoRuntime`]; see [`delete`](Self::delete).
    ///
    /// # Cancel safety
    ///
    /// The local tier is emptied at the first poll. In Redis every fill in flight
    /// is refused first, then the prefix is scanned and deleted in batches:
    /// dropped mid-way, entries not deleted yet stay readable until their TTL or
    /// a later invalidation covering them. A dropped call is not queued.
    pub async fn clear(&self) -> Result<u64, CacheError> {
        self.invalidate(Op::Clear, Pending::Everything).await
    }

    /// Counts, sizes and server facts. Counting keys scans the prefix: not for hot
    /// paths. A Redis fault degrades the answer (`connected: false`) instead of failing it.
    ///
    /// # Errors
    ///
    /// None today: a Redis fault gives `connected: false` and the local tier's
    /// counts. The `Result` leaves room for failures that can't be degraded.
    ///
    /// # Cancel safety
    ///
    /// Reads only: dropping it is safe (see [`Cache`] for a replay in progress).
    pub async fn stats(&self) -> Result<CacheStats, CacheError> {
        let pattern = self.inner.schema.all_entries();
        let tiers = &self.inner.tiers;
        let local = &tiers.local;
        let mut stats =
            self.inner.counters.snapshot(&self.inner.metrics, self.mode(), local.len(), local.size_bytes());
        stats.breaker = tiers.breaker().state();
        stats.breaker_opened = tiers.breaker().opened_total();
        stats.pending_invalidations = tiers.pending_len() as u64;
        stats.bad_signatures = tiers.shared_store().map_or(0, |s| s.bad_signatures());
        stats.bad_encryption = self.inner.sealer.refused();
        stats.near_cache_size = tiers.near.len();
        stats.near_cache_hits = tiers.near.hits.load(Ordering::Relaxed);
        stats.bus_listening = tiers.near.is_listening();
        if let Some(queue) = crate::write_behind::queue_figures(self).await {
            stats.write_behind_queue_length = queue.length;
            stats.write_behind_oldest_job_age_seconds = queue.oldest_age.as_secs_f64();
        }
        match tiers.shared_stats(&pattern).await {
            Some((keys, None)) => {
                stats.total_keys = keys;
                stats.connected = true;
            }
            Some((keys, Some(info))) => {
                stats.total_keys = keys;
                stats.connected = true;
                stats.redis_version = Some(info.version);
                stats.used_memory_bytes = Some(info.used_memory);
                stats.used_memory_human = Some(info.used_memory_human);
                stats.peak_memory_bytes = Some(info.peak_memory);
                stats.peak_memory_human = Some(info.peak_memory_human);
                stats.connected_clients = Some(info.connected_clients);
            }
            None => stats.total_keys = local.count(&pattern),
        }
        stats.mode = self.mode();
        Ok(stats)
    }

    /// Whether the store answers, and how fast: one PING, no scan. Never fails: a
    /// failure is the answer. A credentials or permission problem Redis reported
    /// makes it `unhealthy` with the cause until a check of the cache's access passes.
    ///
    /// # Cancel safety
    ///
    /// One PING: dropping it is safe (see [`Cache`] for a replay in progress).
    pub async fn health(&self) -> Health {
        let mut health = self.inner.tiers.health().await;
        health.ready = self.is_ready();
        health
    }

    /// Whether the start-up warmers ([`new_with_warmers`](Self::new_with_warmers)) have all ended; no I/O.
    pub fn is_ready(&self) -> bool {
        self.inner.warming.load(Ordering::Acquire) == 0
    }

    /// Pre-loads `entries` (key, value) with `ttl` (the default when `None`) and
    /// `tags`: `warmup_concurrency` tasks each write a batch of
    /// `warmup_batch_size` at a time. Returns how many were written: an entry whose
    /// key was invalidated after this call began is not. Does nothing when
    /// `warmup_enabled` is off. The duration lands in `*_cache_warmup_duration_seconds`.
    ///
    /// # Errors
    ///
    /// [`CacheError::Encode`] or [`CacheError::TooLarge`] for any entry, before
    /// anything is written: every entry is encoded first. Then the first write
    /// error (those of [`set`](Self::set)) ends the call and aborts the batches
    /// still running; entries already written stay. [`CacheError::InvalidArgument`]
    /// if a warm-up task panicked.
    ///
    /// # Cancel safety
    ///
    /// The batches run on spawned tasks owned by the call: dropping it aborts
    /// them. Entries already written stay, the rest are not written, and the
    /// count is lost; warming again rewrites them all.
    pub async fn warm<K, V, I>(
        &self,
        entries: I,
        ttl: Option<Duration>,
        tags: &[&str],
    ) -> Result<u64, CacheError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Storable,
    {
        let config = &self.inner.config;
        if !config.warmup_enabled {
            tracing::info!("cache warm-up is disabled (warmup_enabled: false)");
            return Ok(0);
        }
        let started = Instant::now();
        let entries: Vec<(String, V)> =
            entries.into_iter().map(|(k, v)| (self.full_key(k.as_ref()), v)).collect();
        // The entries were read before this call: an invalidation made since
        // refuses them. Each key's fence is taken before anything is encoded.
        let fences: Vec<FillFence> = entries.iter().map(|(full, _)| self.fill_fence(full, started)).collect();
        let ttl = ttl.unwrap_or(config.default_ttl);
        let tags: Arc<[String]> = tags.iter().map(|t| (*t).to_owned()).collect();
        let mut encoded = Vec::new();
        for ((full, value), fence) in entries.into_iter().zip(fences) {
            let bytes = codec::encode(config.serialization, &value)?;
            self.check_size(bytes.len())?;
            encoded.push((full, bytes, fence));
        }
        let mut tasks = tokio::task::JoinSet::new();
        let mut written = 0;
        let mut batches = encoded.chunks(config.warmup_batch_size.max(1)).map(<[_]>::to_vec);
        loop {
            while tasks.len() < config.warmup_concurrency.max(1) {
                let Some(batch) = batches.next() else { break };
                let (cache, tags) = (self.clone(), tags.clone());
                tasks.spawn(async move {
                    let mut stored = 0;
                    for (full, bytes, fence) in &batch {
                        let write = Write {
                            full,
                            bytes,
                            ttl: cache.jittered(full, ttl),
                            tags: &tags,
                            expected: Some(*fence),
                            bump: true,
                            check_only: false,
                            replaces: None,
                        };
                        stored += u64::from(cache.inner.tiers.write(write).await?);
                    }
                    Ok::<u64, CacheError>(stored)
                });
            }
            match tasks.join_next().await {
                Some(done) => {
                    written +=
                        done.map_err(|e| CacheError::InvalidArgument(format!("a warm-up task failed: {e}")))??
                }
                None => break,
            }
        }
        let took = started.elapsed();
        self.inner.metrics.observe_warmup(took);
        tracing::info!(entries = written, ?took, "cache warmed");
        Ok(written)
    }

    /// One page of keys matching the glob `pattern` (relative to the prefix), from
    /// `cursor` (0 to start); the cursor of the next page is 0 at the end. Names
    /// are listed escaped, since another client may have written bytes that are
    /// not UTF-8: `\\` for a backslash, `\xNN` for such a byte.
    ///
    /// # Errors
    ///
    /// Only while Redis serves (breaker closed): [`CacheError::Timeout`] or
    /// [`CacheError::Redis`] when it does not answer in time or fails,
    /// [`CacheError::Auth`] or [`CacheError::Permission`] when it starts refusing
    /// the cache's credentials or commands, and [`CacheError::NoRuntime`] outside a
    /// Tokio runtime. These count towards the breaker; once it is open, calls are
    /// answered by the local tier and do not fail.
    ///
    /// # Cancel safety
    ///
    /// Reads change nothing: dropping the future is safe, and the connection
    /// stays usable (replies are matched by its driver, not by the caller). See
    /// [`Cache`] for the one exception, a call that was replaying queued
    /// invalidations.
    /// Resume from the last cursor returned.
    pub async fn scan_keys(
        &self,
        pattern: &str,
        cursor: u64,
        count: usize,
    ) -> Result<(Vec<String>, u64), CacheError> {
        let full = self.inner.schema.entries_matching(pattern);
        let strip = self.inner.schema.prefix_len();
        let (keys, next) = self.inner.tiers.scan_page(&full, cursor, count).await?;
        Ok((keys.iter().map(|k| display_key(&k[strip.min(k.len())..])).collect(), next))
    }

    /// This cache's Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Sets the gauges that need Redis (keys, memory) and the local tier's size.
    /// Runs a SCAN over the prefix. The cache already runs it every
    /// `metrics_refresh_interval` on a thread of its own; call it to see the
    /// gauges current now (before a scrape in a test, say), not per request.
    ///
    /// # Errors
    ///
    /// Those of [`stats`](Self::stats): none today.
    ///
    /// # Cancel safety
    ///
    /// Dropped before the scan ends, the gauges keep their previous values.
    pub async fn refresh_gauges(&self) -> Result<(), CacheError> {
        let stats = self.stats().await?;
        let m = &self.inner.metrics;
        m.keys.set(stats.total_keys as i64);
        m.memory_bytes.set(stats.used_memory_bytes.unwrap_or(stats.local_cache_bytes) as i64);
        m.size_bytes.set(stats.local_cache_bytes as i64);
        m.breaker_state.set(stats.breaker.as_gauge());
        m.write_behind.queue_length.set(stats.write_behind_queue_length as i64);
        m.write_behind.oldest_job_age.set(stats.write_behind_oldest_job_age_seconds);
        Ok(())
    }

    /// The cache's own runtime, where its upkeep runs: Redis's connections'
    /// in Redis mode, the gauges' thread in local mode.
    pub(crate) fn runtime(&self) -> Option<&tokio::runtime::Handle> {
        match (&self.inner.background, &self.inner.upkeep) {
            (Some(background), _) => Some(background.handle()),
            (None, Some(upkeep)) => Some(upkeep.handle()),
            (None, None) => None,
        }
    }

    /// Registers `handler` for the events named `name` that any instance
    /// sharing this cache's Redis and prefix emits with [`emit`](Self::emit),
    /// this one included. Each event runs each handler once per instance that
    /// hears it, in a task of its own; handlers may invalidate keys, tags and
    /// patterns.
    ///
    /// ```
    /// use cache_runtime::{Cache, CacheConfig, Event};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), cache_runtime::CacheError> {
    /// let cache = Cache::local(CacheConfig::default());
    /// let handle = cache.clone();
    /// cache.on_event("quantum_state_updated", move |event: Event| {
    ///     let cache = handle.clone();
    ///     async move {
    ///         let _ = cache.delete_pattern("quantum_state:*").await;
    ///         tracing::info!(context = %event.context, "quantum state cache dropped");
    ///     }
    /// });
    /// cache.emit("quantum_state_updated", serde_json::json!({"state": 7})).await?;
    /// # Ok(()) }
    /// ```
    pub fn on_event<F, Fut>(&self, name: &str, handler: F)
    where
        F: Fn(Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.inner.tiers.bus.on_event(name, Arc::new(move |event| Box::pin(handler(event))));
    }

    /// Emits the event `name` with `context` to the handlers of every
    /// instance sharing this cache's Redis and prefix (see
    /// [`on_event`](Self::on_event)): this instance's run at once, whatever
    /// Redis does; the others' once each, on every instance whose bus listener
    /// is subscribed when Redis publishes it. An instance reconnecting at that
    /// moment misses it (its near tier is dropped then, but its handlers don't
    /// run). In local mode, this instance's handlers run.
    ///
    /// # Errors
    ///
    /// [`CacheError::Unavailable`] when Redis can't take it now: this
    /// instance's handlers have run, the other instances' have not, and the
    /// event is not queued (an event is news, not state: handlers that
    /// invalidate make their invalidations queue themselves).
    /// [`CacheError::InvalidArgument`] when `context` can't be written as JSON.
    pub async fn emit(&self, name: &str, context: impl serde::Serialize) -> Result<(), CacheError> {
        let context = serde_json::to_value(context)
            .map_err(|e| CacheError::InvalidArgument(format!("the context of event `{name}`: {e}")))?;
        self.inner.tiers.emit(Event { name: name.to_owned(), context }, self.runtime()).await
    }

    pub(crate) fn full_key(&self, key: &str) -> String {
        self.inner.schema.entry(key)
    }

    /// Runs an invalidation on both tiers, timed. `Ok` means Redis applied it;
    /// [`CacheError::Deferred`] that it is queued (see `failover.rs`).
    ///
    /// Each runs in an INFO span, `cache.invalidate`, with the operation, how
    /// many keys, tags or patterns it names (never the names: they can carry
    /// user ids) and, once known, how many entries it deleted.
    async fn invalidate(&self, op: Op, what: Pending) -> Result<u64, CacheError> {
        let arguments = match &what {
            Pending::Key(_) | Pending::Pattern(_) => 1,
            Pending::Tags(tags) => tags.len(),
            Pending::Everything => 0,
        };
        let span = tracing::info_span!(
            "cache.invalidate",
            operation = op.as_str(),
            arguments,
            deleted = tracing::field::Empty,
        );
        let result = self.timed(op, self.inner.tiers.invalidate(what)).instrument(span.clone()).await;
        if let Ok(n) = &result {
            span.record("deleted", n);
        }
        result
    }

    /// Whether a fill of `full` under `fence` would be stored now (nothing
    /// covering it was invalidated since), without storing anything.
    pub(crate) async fn unfenced(&self, full: &str, tags: &[String], fence: FillFence) -> bool {
        let check = Write {
            full,
            bytes: &[],
            ttl: Duration::from_secs(1),
            tags,
            expected: Some(fence),
            bump: false,
            check_only: true,
            replaces: None,
        };
        matches!(self.inner.tiers.write(check).await, Ok(true))
    }

    /// What a fill whose read starts now is checked against: no round trip.
    #[inline]
    pub(crate) fn fill_fence(&self, full: &str, now: Instant) -> FillFence {
        self.inner.tiers.fence(full, now)
    }

    /// Reads `full` for a call that began at `now`: that one clock reading
    /// times the read and is when a local entry must still be alive.
    pub(crate) async fn read(&self, full: &str, now: Instant) -> Result<Option<Raw>, CacheError> {
        let result = self.inner.tiers.read(full, now).await;
        match &result {
            Ok(Some(Raw::Local(_))) => self.inner.metrics.count(Op::Get, true),
            _ => self.inner.metrics.record(Op::Get, result.is_ok(), now.elapsed()),
        }
        result
    }

    /// Stores encoded bytes: a fill with `expected` (refused if anything covering
    /// `full` was invalidated since), a `set` without; `bump` refuses the fills of
    /// `full` that read before this write.
    pub(crate) async fn write(
        &self,
        full: &str,
        bytes: &[u8],
        ttl: Duration,
        tags: &[String],
        expected: Option<FillFence>,
        bump: bool,
    ) -> Result<bool, CacheError> {
        let write = Write { full, bytes, ttl, tags, expected, bump, check_only: false, replaces: None };
        self.timed(Op::Set, self.inner.tiers.write(write)).await
    }

    /// Writes `bytes` back over `read`, what a read under `fence` found,
    /// and only over it: an entry since filled by another call or instance,
    /// or invalidated, stays as it is. Whether it was stored.
    pub(crate) async fn write_back(
        &self,
        full: &str,
        read: &[u8],
        bytes: &[u8],
        ttl: Duration,
        tags: &[String],
        fence: FillFence,
    ) -> Result<bool, CacheError> {
        let write = Write {
            full,
            bytes,
            ttl,
            tags,
            expected: Some(fence),
            bump: false,
            check_only: false,
            replaces: Some(read),
        };
        self.timed(Op::Set, self.inner.tiers.write(write)).await
    }

    /// Decodes, or removes the unreadable entry and reports a miss. The removal
    /// fences nothing: the value that replaces it is not refused. An entry
    /// written for another shape of `T` is a miss but stays: during a deploy the
    /// other build still reads it, and the next fill replaces it anyway.
    pub(crate) fn decode_or_drop<T: DeserializeOwned>(&self, full: &str, raw: &[u8]) -> Option<T> {
        match codec::decode(raw) {
            Ok(v) => Some(v),
            Err(e @ CacheError::TypeMismatch { .. }) => {
                self.inner.counters.type_mismatches.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key = full, error = %e, "cache entry of another shape: a miss");
                None
            }
            Err(e) => {
                self.inner.counters.decode_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = full, error = %e, "unreadable cache entry dropped");
                let this = self.clone();
                let (full, raw) = (full.to_owned(), raw.to_vec());
                // Best effort and off the caller's path: the entry reads as a miss either way.
                let runtime = self.inner.background.as_ref().map(|b| b.handle().clone());
                if let Some(rt) = runtime.or_else(|| tokio::runtime::Handle::try_current().ok()) {
                    rt.spawn(async move { this.inner.tiers.drop_if_same(&full, &raw).await });
                }
                None
            }
        }
    }

    /// Runs `work` (decoding a big value, say) on the thread that reads big
    /// values, off the callers' workers; inline where the
    /// cache has no such thread (local mode). `None` when `work` gives none, or
    /// when the cache is shutting down and the thread has gone: a miss.
    pub(crate) async fn off_workers<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Option<T> + Send + 'static,
    ) -> Option<T> {
        match &self.inner.background {
            Some(background) => {
                let bulk = background.bulk_handle();
                Background::run(bulk, async move { work() }).await.ok().flatten()
            }
            None => work(),
        }
    }

    /// Refuses (and counts) a value over `max_value_bytes`.
    pub(crate) fn check_size(&self, size: usize) -> Result<(), CacheError> {
        let limit = self.inner.config.max_value_bytes;
        if size > limit {
            self.inner.counters.oversized.fetch_add(1, Ordering::Relaxed);
            return Err(CacheError::TooLarge { size, limit });
        }
        Ok(())
    }

    /// `ttl` less up to `ttl_jitter_percent` of it, drawn from the key and
    /// the clock: entries written in the same instant still spread out.
    pub(crate) fn jittered(&self, full: &str, ttl: Duration) -> Duration {
        let percent = u64::from(self.inner.config.ttl_jitter_percent());
        if percent == 0 {
            return ttl;
        }
        let cut = ttl.mul_f64(crate::detached::draw(full.as_bytes()) * percent as f64 / 100.0);
        ttl.saturating_sub(cut).max(Duration::from_millis(1))
    }

    /// A hit served by the near tier: counted as a hit, with no Redis latency to record.
    pub(crate) fn record_near_hit(&self) {
        self.inner.tiers.near.hits.fetch_add(1, Ordering::Relaxed);
        self.inner.metrics.count(Op::Get, true);
        self.record_lookup(true);
    }

    pub(crate) fn record_lookup(&self, hit: bool) {
        if self.inner.config.track_stats {
            if hit { &self.inner.metrics.hits } else { &self.inner.metrics.misses }.inc();
        }
    }

    pub(crate) async fn timed<T>(
        &self,
        op: Op,
        fut: impl std::future::Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        let started = Instant::now();
        let result = fut.await;
        self.inner.metrics.record(op, result.is_ok(), started.elapsed());
        result
    }

    pub(crate) fn record_fault(&self, op: &'static str, key: &str, error: &CacheError) {
        self.inner.metrics.errors.inc();
        // Logged once per cause where it was recorded; per call it would bury everything else.
        if error.is_misconfiguration() {
            return;
        }
        if matches!(error, CacheError::NoRuntime) {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!(op, error = %error, "cache bypassed"));
            return;
        }
        tracing::warn!(op, key, error = %error, "cache fault: serving the function's own result");
    }
}

/// A pending write made by [`Cache::set`]; await it to store the value. See
/// that method for its errors and cancel safety.
#[must_use = "a Set does nothing until awaited"]
pub struct Set<'a, T: ?Sized> {
    cache: &'a Cache,
    key: &'a str,
    value: &'a T,
    ttl: Option<Duration>,
    tags: Vec<String>,
}

impl<'a, T: Storable + ?Sized + Sync> Set<'a, T> {
    /// Time to live: seconds as an integer, or a `Duration`; the default TTL otherwise.
    pub fn ttl(mut self, ttl: impl IntoTtl) -> Self {
        self.ttl = Some(ttl.into_ttl());
        self
    }

    /// Tags for [`Cache::invalidate_tags`].
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    async fn run(self) -> Result<(), CacheError> {
        self.prepare()?.write().await
    }

    /// Everything a `set` checks and encodes before it sends anything: a
    /// write-behind call queues its job only once the value can be written.
    pub(crate) fn prepare(self) -> Result<PreparedSet<'a>, CacheError> {
        let ttl = self.ttl.unwrap_or(self.cache.inner.config.default_ttl);
        if ttl.is_zero() {
            return Err(CacheError::InvalidArgument("ttl must be positive".into()));
        }
        let bytes = codec::encode(self.cache.inner.config.serialization, self.value)?;
        self.cache.check_size(bytes.len())?;
        let full = self.cache.full_key(self.key);
        let ttl = self.cache.jittered(&full, ttl);
        Ok(PreparedSet { cache: self.cache, key: self.key, full, bytes, ttl, tags: self.tags })
    }
}

/// A [`Set`] checked and encoded, not yet sent.
pub(crate) struct PreparedSet<'a> {
    pub(crate) cache: &'a Cache,
    pub(crate) key: &'a str,
    full: String,
    bytes: Vec<u8>,
    ttl: Duration,
    tags: Vec<String>,
}

impl PreparedSet<'_> {
    pub(crate) async fn write(&self) -> Result<(), CacheError> {
        self.cache.write(&self.full, &self.bytes, self.ttl, &self.tags, None, true).await?;
        Ok(())
    }
}

impl<'a, T: Storable + ?Sized + Sync> IntoFuture for Set<'a, T> {
    type Output = Result<(), CacheError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

static GLOBAL: OnceLock<Cache> = OnceLock::new();

/// Builds the process-wide cache that `#[cached]` functions use by default.
///
/// Fails if it was already set (by an earlier `init` or a `get_cache` before it):
/// functions already called would otherwise have used another cache than the one
/// configured.
///
/// # Errors
///
/// Those of [`Cache::new`], and [`CacheError::InvalidArgument`] when the global
/// cache is already set.
///
/// # Cancel safety
///
/// The global cache is set only when the new cache is built: dropping the
/// future before that leaves it unset, and `init` can be called again.
pub async fn init(config: CacheConfig) -> Result<&'static Cache, CacheError> {
    let cache = Cache::new(config).await?;
    GLOBAL
        .set(cache)
        .map_err(|_| CacheError::InvalidArgument("the global cache is already initialised".into()))?;
    Ok(get_cache())
}

/// [`init`], with `warmers` run in the background as
/// [`Cache::new_with_warmers`] runs them.
///
/// # Errors
///
/// Those of [`init`].
pub async fn init_with_warmers(
    config: CacheConfig,
    warmers: crate::Warmers,
) -> Result<&'static Cache, CacheError> {
    let cache = init(config).await?;
    cache.start_warmers(warmers);
    Ok(cache)
}

/// The process-wide cache; before [`init`], a local-mode cache with default settings.
pub fn get_cache() -> &'static Cache {
    GLOBAL.get_or_init(|| {
        tracing::warn!("cache_runtime::init was not called: using a local-mode cache with default settings");
        Cache::local(CacheConfig::default())
    })
}
