//! The [`Cache`] handle and the process-wide default.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::config::CacheConfig;
use crate::flight::SingleFlight;
use crate::key::escape_glob;
use crate::local::LocalTier;
use crate::metrics::{Metrics, Op};
use crate::redis_store::RedisStore;
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
    pub(crate) local: LocalTier,
    pub(crate) counters: Counters,
    pub(crate) metrics: Metrics,
    pub(crate) flights: SingleFlight,
    epoch_key: String,
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
    /// `redis`; with none configured, or none reachable now, it is `local`, said once in the log.
    pub async fn new(config: CacheConfig) -> Result<Cache, CacheError> {
        let redis = match config.redis() {
            None => {
                tracing::info!(prefix = %config.key_prefix, "no Redis configured: cache runs in local mode");
                None
            }
            Some(target) => match RedisStore::connect(&config, target.as_str()).await {
                Ok(store) => {
                    tracing::info!(redis = %target, prefix = %config.key_prefix, "cache runs in redis mode");
                    Some(store)
                }
                Err(CacheError::Redis(e)) if e.kind() == redis::ErrorKind::InvalidClientConfig => {
                    return Err(CacheError::config("REDIS_URL", target, e.to_string()));
                }
                Err(e) => {
                    tracing::warn!(redis = %target, error = %e, "Redis unreachable at start: cache runs in local mode");
                    None
                }
            },
        };
        Ok(Cache::assemble(config, redis))
    }

    /// A cache in local mode, whatever `config` says about Redis.
    pub fn local(config: CacheConfig) -> Cache {
        Cache::assemble(config, None)
    }

    fn assemble(config: CacheConfig, redis: Option<RedisStore>) -> Cache {
        let epoch_key = format!("{}#epoch", config.key_prefix);
        // Checked when the config was built; a hand-assembled bad namespace degrades to the default.
        let metrics = Metrics::new(&config.metrics_namespace).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "bad metrics namespace: using `cache`");
            Metrics::new("cache").expect("the default namespace is valid")
        });
        for (name, ttl) in &config.named_ttls {
            metrics
                .ttl_seconds
                .with_label_values(&[name])
                .set(ttl.as_secs() as i64);
        }
        Cache {
            inner: Arc::new(Inner {
                local: LocalTier::new(config.local_max_entries),
                counters: Counters::default(),
                metrics,
                flights: SingleFlight::default(),
                redis,
                epoch_key,
                config,
            }),
        }
    }

    /// The configuration this cache was built from.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Which store serves the cache.
    pub fn mode(&self) -> Mode {
        if self.inner.redis.is_some() {
            Mode::Redis
        } else {
            Mode::Local
        }
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
    pub fn set<'a, T: Serialize + ?Sized + Sync>(
        &'a self,
        key: &'a str,
        value: &'a T,
    ) -> Set<'a, T> {
        Set {
            cache: self,
            key,
            value,
            ttl: None,
            tags: Vec::new(),
        }
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        let full = self.full_key(key);
        self.timed(Op::Delete, async {
            match &self.inner.redis {
                Some(redis) => redis.delete(&full, &self.inner.epoch_key).await,
                None => Ok(self.inner.local.delete(&full)),
            }
        })
        .await
    }

    /// Whether `key` holds a live entry.
    pub async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        let full = self.full_key(key);
        match &self.inner.redis {
            Some(redis) => redis.exists(&full).await,
            None => Ok(self.inner.local.remaining(&full).is_some()),
        }
    }

    /// How long `key` has left.
    pub async fn ttl(&self, key: &str) -> Result<KeyTtl, CacheError> {
        let full = self.full_key(key);
        match &self.inner.redis {
            Some(redis) => Ok(match redis.pttl(&full).await? {
                -2 => KeyTtl::Missing,
                ms if ms < 0 => KeyTtl::Persistent,
                ms => KeyTtl::Expires(Duration::from_millis(ms as u64)),
            }),
            None => Ok(self
                .inner
                .local
                .remaining(&full)
                .map_or(KeyTtl::Missing, KeyTtl::Expires)),
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
        let full = format!("{}:{pattern}", escape_glob(&self.inner.config.key_prefix));
        self.timed(Op::DeletePattern, async {
            match &self.inner.redis {
                Some(redis) => {
                    redis
                        .delete_pattern(&full, Some(&self.inner.epoch_key))
                        .await
                }
                None => Ok(self.inner.local.delete_pattern(&full)),
            }
        })
        .await
    }

    /// Deletes every entry carrying any of `tags`; how many were deleted. Once it
    /// returns, no entry written before it with one of these tags is alive.
    pub async fn invalidate_tags<I, S>(&self, tags: I) -> Result<u64, CacheError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let tags: Vec<String> = tags.into_iter().map(|t| t.as_ref().to_owned()).collect();
        self.timed(Op::InvalidateTags, async {
            match &self.inner.redis {
                Some(redis) => {
                    let keys: Vec<String> = tags.iter().map(|t| self.tag_key(t)).collect();
                    redis.invalidate_tags(&self.inner.epoch_key, &keys).await
                }
                None => Ok(self.inner.local.invalidate_tags(&tags)),
            }
        })
        .await
    }

    /// Deletes every entry under this cache's prefix (and its tag index); never FLUSHDB.
    pub async fn clear(&self) -> Result<u64, CacheError> {
        let prefix = escape_glob(&self.inner.config.key_prefix);
        self.timed(Op::Clear, async {
            match &self.inner.redis {
                Some(redis) => {
                    let deleted = redis
                        .delete_pattern(&format!("{prefix}:*"), Some(&self.inner.epoch_key))
                        .await?;
                    redis
                        .delete_pattern(&format!("{prefix}#tag:*"), None)
                        .await?;
                    Ok(deleted)
                }
                None => {
                    let deleted = self.inner.local.delete_pattern(&format!("{prefix}:*"));
                    self.inner.local.drop_tag_index();
                    Ok(deleted)
                }
            }
        })
        .await
    }

    /// Counts, sizes and server facts. Counting keys scans the prefix: not for hot paths.
    pub async fn stats(&self) -> Result<CacheStats, CacheError> {
        let pattern = format!("{}:*", escape_glob(&self.inner.config.key_prefix));
        let local = &self.inner.local;
        let mut stats = self
            .inner
            .counters
            .snapshot(&self.inner.metrics, self.mode(), local.len(), local.size_bytes());
        match &self.inner.redis {
            Some(redis) => {
                stats.total_keys = redis.count(&pattern).await?;
                let info = redis.info().await?;
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
        Ok(stats)
    }

    /// Whether the store answers, and how fast. Never fails: a failure is the answer.
    pub async fn health(&self) -> Health {
        let started = Instant::now();
        let result = match &self.inner.redis {
            Some(redis) => redis.ping().await,
            None => Ok(()),
        };
        Health::new(self.mode(), started.elapsed(), result.err())
    }

    pub(crate) fn full_key(&self, key: &str) -> String {
        let prefix = &self.inner.config.key_prefix;
        let mut full = String::with_capacity(prefix.len() + 1 + key.len());
        full.push_str(prefix);
        full.push(':');
        full.push_str(key);
        full
    }

    fn tag_key(&self, tag: &str) -> String {
        format!("{}#tag:{tag}", self.inner.config.key_prefix)
    }

    pub(crate) async fn read(&self, full: &str) -> Result<Option<Raw>, CacheError> {
        self.timed(Op::Get, async {
            match &self.inner.redis {
                Some(redis) => Ok(redis.get(full).await?.map(Raw::Owned)),
                None => Ok(self.inner.local.get(full).map(Raw::Shared)),
            }
        })
        .await
    }

    pub(crate) async fn epoch(&self) -> Result<u64, CacheError> {
        match &self.inner.redis {
            Some(redis) => redis.epoch(&self.inner.epoch_key).await,
            None => Ok(self.inner.local.epoch()),
        }
    }

    /// Reads `full` and the invalidation epoch together.
    pub(crate) async fn read_with_epoch(
        &self,
        full: &str,
    ) -> Result<(Option<Raw>, u64), CacheError> {
        match &self.inner.redis {
            Some(redis) => {
                let (value, epoch) = redis.get_with_epoch(full, &self.inner.epoch_key).await?;
                Ok((value.map(Raw::Owned), epoch))
            }
            // Epoch first: a value read after it is at least as new.
            None => {
                let epoch = self.inner.local.epoch();
                Ok((self.inner.local.get(full).map(Raw::Shared), epoch))
            }
        }
    }

    /// Stores encoded bytes; with `expected_epoch`, only if no invalidation happened since.
    pub(crate) async fn write(
        &self,
        full: &str,
        bytes: &[u8],
        ttl: Duration,
        tags: &[String],
        expected_epoch: Option<u64>,
    ) -> Result<bool, CacheError> {
        self.timed(Op::Set, async {
            match &self.inner.redis {
                Some(redis) => {
                    let tag_keys: Vec<String> = tags.iter().map(|t| self.tag_key(t)).collect();
                    redis
                        .set(
                            full,
                            bytes,
                            ttl,
                            &self.inner.epoch_key,
                            &tag_keys,
                            expected_epoch,
                        )
                        .await
                }
                None => Ok(self
                    .inner
                    .local
                    .set(full, bytes.to_vec(), ttl, tags, expected_epoch)),
            }
        })
        .await
    }

    /// Decodes, or removes the unreadable entry and reports a miss.
    pub(crate) fn decode_or_drop<T: DeserializeOwned>(&self, full: &str, raw: &[u8]) -> Option<T> {
        match codec::decode(raw) {
            Ok(v) => Some(v),
            Err(e) => {
                self.inner
                    .counters
                    .decode_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = full, error = %e, "unreadable cache entry dropped");
                let this = self.clone();
                let full = full.to_owned();
                // Best effort and off the caller's path: the entry reads as a miss either way.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        if let Some(redis) = &this.inner.redis {
                            let _ = redis.delete(&full, &this.inner.epoch_key).await;
                        } else {
                            this.inner.local.delete(&full);
                        }
                    });
                }
                None
            }
        }
    }

    pub(crate) fn record_lookup(&self, hit: bool) {
        if self.inner.config.track_stats {
            if hit {
                &self.inner.metrics.hits
            } else {
                &self.inner.metrics.misses
            }
            .inc();
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
        m.memory_bytes
            .set(stats.used_memory_bytes.unwrap_or(stats.local_cache_bytes) as i64);
        m.size_bytes.set(stats.local_cache_bytes as i64);
        Ok(())
    }

    pub(crate) async fn timed<T>(
        &self,
        op: Op,
        fut: impl std::future::Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        let started = Instant::now();
        let result = fut.await;
        self.inner
            .metrics
            .record(op, result.is_ok(), started.elapsed());
        result
    }

    pub(crate) fn record_fault(&self, op: &'static str, key: &str, error: &CacheError) {
        self.inner.metrics.errors.inc();
        tracing::warn!(op, key, error = %error, "cache fault: serving the function's own result");
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
        let full = self.cache.full_key(self.key);
        self.cache
            .write(&full, &bytes, ttl, &self.tags, None)
            .await?;
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
    GLOBAL.set(cache).map_err(|_| {
        CacheError::InvalidArgument("the global cache is already initialised".into())
    })?;
    Ok(get_cache())
}

/// The process-wide cache; before [`init`], a local-mode cache with default settings.
pub fn get_cache() -> &'static Cache {
    GLOBAL.get_or_init(|| {
        tracing::warn!(
            "cache_runtime::init was not called: using a local-mode cache with default settings"
        );
        Cache::local(CacheConfig::default())
    })
}
