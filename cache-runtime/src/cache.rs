//! The [`Cache`] handle and the process-wide default.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::breaker::{Breaker, BreakerState, Permit};
use crate::codec;
use crate::config::CacheConfig;
use crate::fence::{Fence, Fill, Observed, WINDOW};
use crate::flight::SingleFlight;
use crate::glob::to_lua_pattern;
use crate::key::display_key;
use crate::local::LocalTier;
use crate::metrics::{Metrics, Op};
use crate::misconfig::Misconfig;
use crate::pending::{Pending, PendingLog};
use crate::redis_store::RedisStore;
use crate::schema::Schema;
use crate::stats::{CacheStats, Counters, Health};
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
#[derive(Clone)]
pub struct Cache {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: CacheConfig,
    pub(crate) redis: Option<RedisStore>,
    pub(crate) breaker: Breaker,
    pub(crate) pending: PendingLog,
    /// A credentials or permission problem Redis reported, until a check passes.
    pub(crate) misconfig: Arc<Misconfig>,
    /// The newest fence this process has seen of Redis (see `fence.rs`).
    observed: Observed,
    /// When the fence hash was last pruned.
    pruned_at: std::sync::Mutex<Option<Instant>>,
    pub(crate) local: LocalTier,
    pub(crate) counters: Counters,
    pub(crate) metrics: Metrics,
    pub(crate) flights: SingleFlight,
    pub(crate) schema: Schema,
    fence_key: String,
}

/// What a fill is checked against, taken before its read: a fill is stored only
/// in the tier it read, and only if nothing covering its key was invalidated since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FillFence {
    /// Redis's fence as the process last saw it, and when it was taken.
    Redis(Fence, Instant),
    /// The local tier's invalidation counter, and when it was taken.
    Local(u64, Instant),
}

/// Bytes read from a tier.
pub(crate) enum Raw {
    Owned(Vec<u8>),
    Shared(Arc<[u8]>),
}

impl std::ops::Deref for Raw {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Raw::Owned(v) => v,
            Raw::Shared(a) => a,
        }
    }
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
    /// URL that can't be used.
    pub async fn new(config: CacheConfig) -> Result<Cache, CacheError> {
        let Some(target) = config.redis().cloned() else {
            tracing::info!(prefix = %config.key_prefix, "no Redis configured: cache runs in local mode");
            return Ok(Cache::local(config));
        };
        let metrics = Metrics::for_config(&config);
        let misconfig = Arc::new(Misconfig::new(metrics.config_errors.clone()));
        let store = RedisStore::new(&config, target.as_str(), misconfig.clone()).map_err(|e| match e {
            CacheError::Redis(e) => CacheError::config("REDIS_URL", &target, e.to_string()),
            other => other,
        })?;
        let cache = Cache::assemble(config, metrics, misconfig, Some(store));
        let connect = cache.inner.config.socket_connect_timeout.max(cache.inner.config.operation_timeout());
        let Some(redis) = &cache.inner.redis else { unreachable!("assembled with a store") };
        let prefix = &cache.inner.config.key_prefix;
        let reachable = tokio::time::timeout(connect, async {
            redis.connect().await?;
            redis.check_access(&cache.inner.schema).await
        })
        .await
        .unwrap_or(Err(CacheError::Timeout(connect)));
        match reachable {
            Ok(()) => {
                // Fills are checked against the newest fence seen: start from the current one,
                // and clear what an earlier incarnation of the fence may have left unindexed.
                cache.observe_fence(redis).await;
                tracing::info!(redis = %target, prefix = %prefix, "cache runs in redis mode")
            }
            Err(e) if e.is_misconfiguration() => return Err(e),
            Err(e) => cache.start_degraded(&target, &e),
        }
        tokio::spawn(health_loop(Arc::downgrade(&cache.inner)));
        tokio::spawn(replay_loop(Arc::downgrade(&cache.inner)));
        Ok(cache)
    }

    fn start_degraded(&self, target: &crate::RedisTarget, error: &CacheError) {
        tracing::warn!(redis = %target, error = %error, "Redis unreachable at start: cache runs in local mode until it answers");
        self.inner.breaker.trip();
        if let Some(redis) = &self.inner.redis {
            redis.revive();
        }
        self.inner.metrics.breaker_state.set(self.inner.breaker.state().as_gauge());
    }

    /// A cache in local mode, whatever `config` says about Redis.
    pub fn local(config: CacheConfig) -> Cache {
        let metrics = Metrics::for_config(&config);
        let misconfig = Arc::new(Misconfig::new(metrics.config_errors.clone()));
        Cache::assemble(config, metrics, misconfig, None)
    }

    fn assemble(
        config: CacheConfig,
        metrics: Metrics,
        misconfig: Arc<Misconfig>,
        redis: Option<RedisStore>,
    ) -> Cache {
        let schema = Schema::new(&config.key_prefix);
        let fence_key = schema.fence();
        Cache {
            inner: Arc::new(Inner {
                local: LocalTier::new(config.local_max_entries),
                counters: Counters::default(),
                metrics,
                flights: SingleFlight::default(),
                breaker: Breaker::new(
                    config.circuit_breaker_enabled,
                    config.circuit_breaker_threshold,
                    config.circuit_breaker_timeout,
                ),
                pending: PendingLog::new(),
                misconfig,
                observed: Observed::default(),
                pruned_at: std::sync::Mutex::new(None),
                redis,
                fence_key,
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
        match (&self.inner.redis, self.inner.breaker.state()) {
            (Some(_), BreakerState::Closed) => Mode::Redis,
            _ => Mode::Local,
        }
    }

    /// The circuit breaker's state (always closed in local-only mode).
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// Reads `key`; `None` when it is missing, expired or unreadable (an unreadable
    /// entry is removed, counted and logged).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, CacheError> {
        let full = self.full_key(key);
        let raw = self.read(&full).await?;
        let value = raw.and_then(|raw| self.decode_or_drop(&full, &raw));
        self.record_lookup(value.is_some());
        Ok(value)
    }

    /// Writes `key`; `.ttl(..)` and `.tags(..)` refine it before it is awaited.
    ///
    /// ```no_run
    /// # async fn demo(cache: cache_runtime::Cache) -> Result<(), cache_runtime::CacheError> {
    /// cache.set("missions:123", &"launch").ttl(60).tags(["missions", "queue"]).await?;
    /// # Ok(()) }
    /// ```
    pub fn set<'a, T: Serialize + ?Sized + Sync>(&'a self, key: &'a str, value: &'a T) -> Set<'a, T> {
        Set { cache: self, key, value, ttl: None, tags: Vec::new() }
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        Ok(self.invalidate(Op::Delete, Pending::Key(self.full_key(key))).await? > 0)
    }

    /// Whether `key` holds a live entry.
    pub async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        let full = self.full_key(key);
        match self.redis().await {
            Some((redis, permit)) => self.settle(permit, redis.exists(&full).await),
            None => Ok(self.inner.local.remaining(&full).is_some()),
        }
    }

    /// How long `key` has left.
    pub async fn ttl(&self, key: &str) -> Result<KeyTtl, CacheError> {
        let full = self.full_key(key);
        match self.redis().await {
            Some((redis, permit)) => Ok(match self.settle(permit, redis.pttl(&full).await)? {
                -2 => KeyTtl::Missing,
                ms if ms < 0 => KeyTtl::Persistent,
                ms => KeyTtl::Expires(Duration::from_millis(ms as u64)),
            }),
            None => Ok(self.inner.local.remaining(&full).map_or(KeyTtl::Missing, KeyTtl::Expires)),
        }
    }

    /// Deletes every key matching the Redis glob `pattern` (relative to the prefix);
    /// how many were deleted. Uses SCAN, never KEYS.
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
    pub async fn invalidate_tags<I, S>(&self, tags: I) -> Result<u64, CacheError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let tags = tags.into_iter().map(|t| t.as_ref().to_owned()).collect();
        self.invalidate(Op::InvalidateTags, Pending::Tags(tags)).await
    }

    /// Deletes every entry under this cache's prefix (and its tag index); never FLUSHDB.
    pub async fn clear(&self) -> Result<u64, CacheError> {
        self.invalidate(Op::Clear, Pending::Everything).await
    }

    /// Counts, sizes and server facts. Counting keys scans the prefix: not for hot
    /// paths. A Redis fault degrades the answer (`connected: false`) instead of failing it.
    pub async fn stats(&self) -> Result<CacheStats, CacheError> {
        let pattern = self.inner.schema.all_entries();
        let local = &self.inner.local;
        let mut stats =
            self.inner.counters.snapshot(&self.inner.metrics, self.mode(), local.len(), local.size_bytes());
        stats.breaker = self.inner.breaker.state();
        stats.breaker_opened = self.inner.breaker.opened_total();
        stats.pending_invalidations = self.inner.pending.len() as u64;
        let from_redis = match self.redis().await {
            Some((redis, permit)) => {
                let result = async { Ok((redis.count(&pattern).await?, redis.info().await?)) }.await;
                self.settle(permit, result).ok()
            }
            None => None,
        };
        match from_redis {
            Some((keys, info)) => {
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
    pub async fn health(&self) -> Health {
        let started = Instant::now();
        let result = match (&self.inner.redis, self.redis().await) {
            (None, _) => Ok(()),
            (Some(_), Some((redis, permit))) => self.settle(permit, redis.ping().await),
            (Some(_), None) => Err(CacheError::Unavailable("the circuit breaker is open".into())),
        };
        let took = started.elapsed();
        let misconfigured = self.inner.misconfig.current();
        Health::new(self.mode(), self.inner.breaker.state(), took, result.err(), misconfigured)
    }

    /// Pre-loads `entries` (key, value) with `ttl` (the default when `None`) and
    /// `tags`: `warmup_concurrency` tasks each write a batch of
    /// `warmup_batch_size` at a time. Returns how many were written; does nothing
    /// when `warmup_enabled` is off. The duration lands in `*_cache_warmup_duration_seconds`.
    pub async fn warm<K, V, I>(
        &self,
        entries: I,
        ttl: Option<Duration>,
        tags: &[&str],
    ) -> Result<u64, CacheError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Serialize,
    {
        let config = &self.inner.config;
        if !config.warmup_enabled {
            tracing::info!("cache warm-up is disabled (warmup_enabled: false)");
            return Ok(0);
        }
        let started = Instant::now();
        let ttl = ttl.unwrap_or(config.default_ttl);
        let tags: Arc<[String]> = tags.iter().map(|t| (*t).to_owned()).collect();
        let mut encoded = Vec::new();
        for (key, value) in entries {
            let bytes = codec::encode(config.serialization, &value)?;
            self.check_size(bytes.len())?;
            encoded.push((self.full_key(key.as_ref()), bytes));
        }
        let mut tasks = tokio::task::JoinSet::new();
        let mut written = 0;
        let mut batches = encoded.chunks(config.warmup_batch_size.max(1)).map(<[_]>::to_vec);
        loop {
            while tasks.len() < config.warmup_concurrency.max(1) {
                let Some(batch) = batches.next() else { break };
                let (cache, tags) = (self.clone(), tags.clone());
                tasks.spawn(async move {
                    for (full, bytes) in &batch {
                        cache.write(full, bytes, ttl, &tags, None, true).await?;
                    }
                    Ok::<u64, CacheError>(batch.len() as u64)
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
    pub async fn scan_keys(
        &self,
        pattern: &str,
        cursor: u64,
        count: usize,
    ) -> Result<(Vec<String>, u64), CacheError> {
        let full = self.inner.schema.entries_matching(pattern);
        let strip = self.inner.schema.prefix_len();
        match self.redis().await {
            Some((redis, permit)) => {
                let (next, keys) = self.settle(permit, redis.scan_page(&full, cursor, count).await)?;
                Ok((keys.iter().map(|k| display_key(&k[strip.min(k.len())..])).collect(), next))
            }
            None => {
                let mut keys = self.inner.local.keys(&full);
                keys.sort_unstable();
                let start = (cursor as usize).min(keys.len());
                let end = start.saturating_add(count).min(keys.len());
                let next = if end < keys.len() { end as u64 } else { 0 };
                Ok((keys[start..end].iter().map(|k| display_key(&k.as_bytes()[strip..])).collect(), next))
            }
        }
    }

    /// This cache's Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Sets the gauges that need Redis (keys, memory) and the local tier's size.
    /// Runs a SCAN over the prefix: call it from a background task, not per request.
    pub async fn refresh_gauges(&self) -> Result<(), CacheError> {
        let stats = self.stats().await?;
        let m = &self.inner.metrics;
        m.keys.set(stats.total_keys as i64);
        m.memory_bytes.set(stats.used_memory_bytes.unwrap_or(stats.local_cache_bytes) as i64);
        m.size_bytes.set(stats.local_cache_bytes as i64);
        m.breaker_state.set(stats.breaker.as_gauge());
        Ok(())
    }

    pub(crate) fn full_key(&self, key: &str) -> String {
        self.inner.schema.entry(key)
    }

    fn tag_key(&self, tag: &str) -> String {
        self.inner.schema.tag_index(tag)
    }

    /// Redis and the breaker's permit, or `None` when calls must use the local tier:
    /// no Redis configured, the breaker open, or invalidations pending that could
    /// not be replayed (Redis serves nothing while one is outstanding).
    #[inline]
    async fn redis(&self) -> Option<(&RedisStore, Permit<'_>)> {
        let redis = self.inner.redis.as_ref()?;
        let permit = self.inner.breaker.permit()?;
        if self.inner.pending.is_dirty() {
            if let Err(e) = self.replay(redis).await {
                let _ = self.settle(permit, Err::<(), _>(e));
                return None;
            }
        }
        Some((redis, permit))
    }

    /// Reports a Redis call's outcome to the breaker and passes it on.
    fn settle<T>(&self, permit: Permit<'_>, result: Result<T, CacheError>) -> Result<T, CacheError> {
        if let Err(e) = &result {
            self.inner.misconfig.report(e);
        }
        let healthy = result.as_ref().map_or_else(|e| !e.is_unavailable(), |_| true);
        let probe = permit.is_probe();
        permit.report(healthy);
        if probe || !healthy {
            self.inner.metrics.breaker_state.set(self.inner.breaker.state().as_gauge());
        }
        if probe && healthy {
            // Whatever the local tier learned during the outage is not Redis's truth.
            self.inner.local.clear();
        }
        result
    }

    async fn replay(&self, redis: &RedisStore) -> Result<(), CacheError> {
        let _one_at_a_time = self.inner.pending.replaying.lock().await;
        loop {
            let batch = self.inner.pending.take();
            if batch.is_empty() {
                return Ok(());
            }
            for (i, entry) in batch.iter().enumerate() {
                if let Err(e) = self.apply_redis(redis, entry).await {
                    self.inner.pending.restore(batch[i..].to_vec());
                    return Err(e);
                }
            }
            tracing::info!(
                replayed = batch.len(),
                "invalidations made during the outage replayed into Redis"
            );
        }
    }

    /// Runs an invalidation on both tiers. `Ok` means Redis applied it. When Redis
    /// can't take it now, it is applied to the local tier, queued, and replayed as
    /// soon as Redis answers (before Redis serves this process anything again), and
    /// the call returns [`CacheError::Deferred`].
    async fn invalidate(&self, op: Op, what: Pending) -> Result<u64, CacheError> {
        self.timed(op, async {
            let local = self.apply_local(&what);
            if self.inner.redis.is_none() {
                return Ok(local);
            }
            let cause = match self.redis().await {
                Some((redis, permit)) => {
                    let result = self.apply_redis(redis, &what).await;
                    match self.settle(permit, result) {
                        // Only an unreachable Redis defers the invalidation; an error Redis
                        // answered with would fail the replay forever, so it goes to the caller.
                        Err(e) if e.is_unavailable() => e.to_string(),
                        other => return other,
                    }
                }
                None => "the circuit breaker is open".to_owned(),
            };
            self.inner.pending.push(what);
            Err(CacheError::Deferred(cause))
        })
        .await
    }

    fn apply_local(&self, what: &Pending) -> u64 {
        let local = &self.inner.local;
        match what {
            Pending::Key(full) => u64::from(local.delete(full)),
            Pending::Tags(tags) => local.invalidate_tags(tags),
            Pending::Pattern(full) => local.delete_pattern(full),
            Pending::Everything => {
                let deleted = local.delete_pattern(&self.inner.schema.all_entries());
                local.drop_tag_index();
                deleted
            }
        }
    }

    /// Fences what `what` covers, then deletes it (see `fence.rs`).
    async fn apply_redis(&self, redis: &RedisStore, what: &Pending) -> Result<u64, CacheError> {
        let fence_key = &self.inner.fence_key;
        let observed = &self.inner.observed;
        let entries = self.inner.schema.all_entries();
        match what {
            Pending::Key(full) => {
                let (existed, fence) = redis.invalidate_key(fence_key, full).await?;
                observed.observe(fence);
                Ok(u64::from(existed))
            }
            Pending::Tags(tags) => {
                let tags: Vec<(String, String)> = tags.iter().map(|t| (t.clone(), self.tag_key(t))).collect();
                let mut deleted = 0;
                let mut lost = None;
                loop {
                    let fenced = redis.fence_tags(fence_key, &tags).await?;
                    observed.observe(fenced.fence);
                    if fenced.lost {
                        lost = Some((fenced.fence.id, fenced.token));
                    }
                    for dead in &fenced.dead {
                        deleted += redis.drain(dead).await?;
                    }
                    if !fenced.waiting {
                        break;
                    }
                }
                if let Some((id, token)) = lost {
                    // An index is gone while entries it listed may live: only a
                    // clear of every entry is sure to reach them.
                    tracing::warn!(
                        "a tag index was lost (evicted or flushed): clearing every entry under the prefix"
                    );
                    deleted += redis.delete_pattern(&entries).await?;
                    redis.settle(fence_key, id, &token).await?;
                }
                Ok(deleted)
            }
            Pending::Pattern(full) => {
                observed.observe(redis.fence_pattern(fence_key, &to_lua_pattern(full.as_bytes())).await?);
                redis.delete_pattern(full).await
            }
            Pending::Everything => {
                let fence = redis.fence_all(fence_key).await?;
                observed.observe(fence);
                let deleted = redis.delete_pattern(&entries).await?;
                let indexes = self.inner.schema.all_tag_indexes();
                redis.delete_pattern(&indexes).await?;
                redis.settle(fence_key, fence.id, "new").await?;
                Ok(deleted)
            }
        }
    }

    /// Learns the current fence; when entries of an earlier incarnation of it may
    /// remain unindexed (Redis restarted, was flushed, or evicted the fence), clears
    /// the prefix so that tag invalidations can find every entry again.
    async fn observe_fence(&self, redis: &RedisStore) {
        let fence_key = &self.inner.fence_key;
        let result = async {
            let (fence, orphans) = redis.observe(fence_key).await?;
            self.inner.observed.observe(fence);
            if let Some(token) = orphans {
                let entries = self.inner.schema.all_entries();
                let deleted = redis.delete_pattern(&entries).await?;
                redis.settle(fence_key, fence.id, &token).await?;
                if deleted > 0 {
                    tracing::info!(deleted, "entries of an earlier fence incarnation cleared");
                }
            }
            Ok::<_, CacheError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "could not observe the fence");
        }
    }

    /// Drops fences no fill can need any more, at most once per a quarter of the
    /// fence window.
    async fn prune_fences(&self, redis: &RedisStore) {
        {
            let mut at = self.inner.pruned_at.lock().unwrap_or_else(|e| e.into_inner());
            if at.is_some_and(|at| at.elapsed() < WINDOW / 4) {
                return;
            }
            *at = Some(Instant::now());
        }
        let mut cursor = 0;
        loop {
            match redis.prune(&self.inner.fence_key, cursor).await {
                Ok(0) => return,
                Ok(next) => cursor = next,
                Err(e) => {
                    tracing::debug!(error = %e, "fence pruning interrupted");
                    return;
                }
            }
        }
    }

    /// What a fill starting now is checked against: no round trip. Taken before
    /// the fill's read, so any invalidation after that read is newer.
    #[inline]
    pub(crate) fn fill_fence(&self) -> FillFence {
        match (&self.inner.redis, self.inner.breaker.state()) {
            (Some(_), BreakerState::Closed) => FillFence::Redis(self.inner.observed.get(), Instant::now()),
            _ => FillFence::Local(self.inner.local.epoch(), Instant::now()),
        }
    }

    pub(crate) async fn read(&self, full: &str) -> Result<Option<Raw>, CacheError> {
        self.timed(Op::Get, async {
            match self.redis().await {
                Some((redis, permit)) => Ok(self.settle(permit, redis.get(full).await)?.map(Raw::Owned)),
                None => Ok(self.inner.local.get(full).map(Raw::Shared)),
            }
        })
        .await
    }

    /// Stores encoded bytes. With `expected` (a fill), only in the tier it was
    /// read from and only if nothing covering `full` was invalidated since, so
    /// fills made from the local tier during an outage never reach Redis. Without
    /// it (`set`, warm-up), the write wins, and with `bump` it refuses the fills
    /// of `full` that read before it.
    pub(crate) async fn write(
        &self,
        full: &str,
        bytes: &[u8],
        ttl: Duration,
        tags: &[String],
        expected: Option<FillFence>,
        bump: bool,
    ) -> Result<bool, CacheError> {
        self.timed(Op::Set, async {
            match self.redis().await {
                Some(_) if matches!(expected, Some(FillFence::Local(..))) => Ok(false),
                Some((redis, permit)) => {
                    let expected = match expected {
                        Some(FillFence::Redis(_, taken)) if taken.elapsed() > WINDOW => return Ok(false),
                        Some(FillFence::Redis(fence, _)) => Some(fence),
                        _ => None,
                    };
                    let tags: Vec<(String, String)> =
                        tags.iter().map(|t| (t.clone(), self.tag_key(t))).collect();
                    let fill = Fill { entry: full, bytes, ttl, tags: &tags, expected, bump };
                    let (stored, fence) =
                        self.settle(permit, redis.fill(&self.inner.fence_key, fill).await)?;
                    self.inner.observed.observe(fence);
                    Ok(stored)
                }
                None if matches!(expected, Some(FillFence::Redis(..))) => Ok(false),
                None => {
                    let expected = match expected {
                        Some(FillFence::Local(_, taken)) if taken.elapsed() > WINDOW => return Ok(false),
                        Some(FillFence::Local(epoch, _)) => Some(epoch),
                        _ => None,
                    };
                    Ok(self.inner.local.set(full, bytes.to_vec(), ttl, tags, expected, bump))
                }
            }
        })
        .await
    }

    /// Decodes, or removes the unreadable entry and reports a miss. The removal
    /// fences nothing: the value that replaces it is not refused.
    pub(crate) fn decode_or_drop<T: DeserializeOwned>(&self, full: &str, raw: &[u8]) -> Option<T> {
        match codec::decode(raw) {
            Ok(v) => Some(v),
            Err(e) => {
                self.inner.counters.decode_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = full, error = %e, "unreadable cache entry dropped");
                let this = self.clone();
                let (full, raw) = (full.to_owned(), raw.to_vec());
                // Best effort and off the caller's path: the entry reads as a miss either way.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        match this.redis().await {
                            Some((redis, permit)) => {
                                let _ = this.settle(permit, redis.drop_if_same(&full, &raw).await);
                            }
                            None => this.inner.local.drop_if_same(&full, &raw),
                        }
                    });
                }
                None
            }
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
        tracing::warn!(op, key, error = %error, "cache fault: serving the function's own result");
    }
}

/// PINGs Redis every `health_check_interval`: counts failures while the breaker is
/// closed, and probes it (replaying pending invalidations first) once it may close.
/// It also keeps the fence hash pruned and its incarnation settled, and re-checks
/// a refused password or command. Holds only a weak reference, so it ends with
/// the last clone of the cache.
async fn health_loop(inner: std::sync::Weak<Inner>) {
    let interval = match inner.upgrade() {
        Some(inner) => inner.config.health_check_interval,
        None => return,
    };
    loop {
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else { return };
        let cache = Cache { inner };
        if let Some((redis, permit)) = cache.redis().await {
            let healthy = cache.settle(permit, redis.ping().await).is_ok();
            if healthy {
                cache.observe_fence(redis).await;
                cache.prune_fences(redis).await;
            }
        };
        // A refused password or command clears only when the whole check passes
        // again; a failed check adds nothing the refused calls did not report.
        if let (Some(redis), Some(_)) = (&cache.inner.redis, cache.inner.misconfig.current()) {
            if redis.check_access(&cache.inner.schema).await.is_ok() {
                cache.inner.misconfig.resolve();
            }
        }
    }
}

/// How often queued invalidations are retried while Redis can't take them.
const REPLAY_EVERY: Duration = Duration::from_millis(200);

/// Retries queued invalidations every [`REPLAY_EVERY`], whatever the breaker
/// says: the window in which other processes can read what they cover from Redis
/// is the outage plus one interval, not the breaker's timeout.
async fn replay_loop(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(REPLAY_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        if !inner.pending.is_dirty() {
            continue;
        }
        let cache = Cache { inner };
        if let Some(redis) = &cache.inner.redis {
            if let Err(e) = cache.replay(redis).await {
                tracing::debug!(error = %e, "queued invalidations not replayed yet");
            }
        }
    }
}

/// A pending write made by [`Cache::set`]; await it to store the value.
#[must_use = "a Set does nothing until awaited"]
pub struct Set<'a, T: ?Sized> {
    cache: &'a Cache,
    key: &'a str,
    value: &'a T,
    ttl: Option<Duration>,
    tags: Vec<String>,
}

impl<'a, T: Serialize + ?Sized + Sync> Set<'a, T> {
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
        let ttl = self.ttl.unwrap_or(self.cache.inner.config.default_ttl);
        if ttl.is_zero() {
            return Err(CacheError::InvalidArgument("ttl must be positive".into()));
        }
        let bytes = codec::encode(self.cache.inner.config.serialization, self.value)?;
        self.cache.check_size(bytes.len())?;
        let full = self.cache.full_key(self.key);
        self.cache.write(&full, &bytes, ttl, &self.tags, None, true).await?;
        Ok(())
    }
}

impl<'a, T: Serialize + ?Sized + Sync> IntoFuture for Set<'a, T> {
    type Output = Result<(), CacheError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

static GLOBAL: OnceLock<Cache> = OnceLock::new();

/// Builds the process-wide cache that `#[cached]` functions use by default.
///
/// Fails if it was already set (by an earlier `init` or a `get_cache` before it).
pub async fn init(config: CacheConfig) -> Result<&'static Cache, CacheError> {
    let cache = Cache::new(config).await?;
    GLOBAL
        .set(cache)
        .map_err(|_| CacheError::InvalidArgument("the global cache is already initialised".into()))?;
    Ok(get_cache())
}

/// The process-wide cache; before [`init`], a local-mode cache with default settings.
pub fn get_cache() -> &'static Cache {
    GLOBAL.get_or_init(|| {
        tracing::warn!("cache_runtime::init was not called: using a local-mode cache with default settings");
        Cache::local(CacheConfig::default())
    })
}
