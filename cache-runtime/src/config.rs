//! Configuration: a builder, the environment, and the `REDIS:` section of a settings file.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde_yaml::Value;

use crate::{CacheError, Serialization};

/// Where Redis lives. The password never appears in `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    url: String,
}

impl RedisTarget {
    /// A target from a `redis://` or `rediss://` URL.
    pub fn url(url: impl Into<String>) -> Self {
        RedisTarget { url: url.into() }
    }

    /// A target from host, port, database and optional password.
    pub fn host(host: &str, port: u16, db: i64, password: Option<&str>) -> Self {
        let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
        RedisTarget::url(format!("redis://{auth}{host}:{port}/{db}"))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.url
    }
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Everything between the scheme and the last `@` may hold credentials.
        match (self.url.find("://"), self.url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                write!(f, "{}://***@{}", &self.url[..scheme], &self.url[at + 1..])
            }
            _ => f.write_str(&self.url),
        }
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisTarget({self})")
    }
}

/// A secret setting: `Debug` and `Display` show `***`, so a logged or printed
/// configuration never carries it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A named bundle of TTL, prefix and tags that `#[cached(profile = "...")]` refers to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    /// Time to live of entries made under this profile.
    pub ttl: Option<Duration>,
    /// The key prefix of functions using this profile (their name when absent).
    pub prefix: Option<String>,
    /// Tags added to every entry made under this profile.
    pub tags: Vec<String>,
}

/// Everything a [`Cache`](crate::Cache) is built from.
///
/// Keys that are read but not acted on yet are marked so on their accessor.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub(crate) redis: Option<RedisTarget>,
    pub(crate) key_prefix: String,
    pub(crate) default_ttl: Duration,
    pub(crate) serialization: Serialization,
    pub(crate) track_stats: bool,
    pub(crate) metrics_namespace: String,
    pub(crate) connections: usize,
    pub(crate) max_connections: usize,
    pub(crate) socket_timeout: Duration,
    pub(crate) operation_timeout: Duration,
    pub(crate) socket_connect_timeout: Duration,
    pub(crate) retry_on_timeout: bool,
    pub(crate) health_check_interval: Duration,
    pub(crate) named_ttls: HashMap<String, Duration>,
    pub(crate) profiles: HashMap<String, Profile>,
    pub(crate) local_max_entries: u64,
    pub(crate) max_value_bytes: usize,
    pub(crate) big_value_bytes: usize,
    pub(crate) warmup_enabled: bool,
    pub(crate) warmup_batch_size: usize,
    pub(crate) warmup_concurrency: usize,
    pub(crate) circuit_breaker_enabled: bool,
    pub(crate) circuit_breaker_threshold: u32,
    pub(crate) circuit_breaker_timeout: Duration,
    pub(crate) admin_token: Option<Secret>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            redis: None,
            key_prefix: "cache".into(),
            default_ttl: Duration::from_secs(300),
            serialization: Serialization::Json,
            track_stats: true,
            metrics_namespace: "cache".into(),
            connections: 1,
            max_connections: 50,
            socket_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_millis(250),
            socket_connect_timeout: Duration::from_secs(5),
            retry_on_timeout: true,
            health_check_interval: Duration::from_secs(30),
            named_ttls: HashMap::new(),
            profiles: HashMap::new(),
            local_max_entries: 100_000,
            max_value_bytes: 8 << 20,
            big_value_bytes: 256 << 10,
            warmup_enabled: true,
            warmup_batch_size: 100,
            warmup_concurrency: 5,
            circuit_breaker_enabled: true,
            circuit_breaker_threshold: 5,
            circuit_breaker_timeout: Duration::from_secs(60),
            admin_token: None,
        }
    }
}

impl CacheConfig {
    /// Starts a builder from the defaults (local mode, prefix `cache`, JSON, TTL 300 s).
    pub fn builder() -> CacheConfigBuilder {
        CacheConfigBuilder { config: CacheConfig::default() }
    }

    /// Reads the environment over the defaults: `REDIS_URL` (or `REDIS_HOST`, `REDIS_PORT`,
    /// `REDIS_DB`, `REDIS_PASSWORD`), `CACHE_DEFAULT_TTL`, `CACHE_SERIALIZATION`,
    /// `CACHE_TRACK_STATS`, `CACHE_KEY_PREFIX`, `CACHE_METRICS_NAMESPACE` and
    /// `CACHE_ADMIN_TOKEN`. Without a Redis variable the cache runs locally.
    pub fn from_env() -> Result<Self, CacheError> {
        CacheConfig::default().with_env()
    }

    /// Applies the environment variables of [`from_env`](Self::from_env) on top of `self`.
    pub fn with_env(self) -> Result<Self, CacheError> {
        self.with_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    fn with_vars(mut self, var: impl Fn(&str) -> Option<String>) -> Result<Self, CacheError> {
        if let Some(url) = var("REDIS_URL") {
            self.redis = Some(RedisTarget::url(url));
        } else if let Some(host) = var("REDIS_HOST") {
            let port = var("REDIS_PORT").map(|v| parse_num::<u16>("REDIS_PORT", &v)).transpose()?;
            let db = var("REDIS_DB").map(|v| parse_num::<i64>("REDIS_DB", &v)).transpose()?;
            let password = var("REDIS_PASSWORD");
            self.redis =
                Some(RedisTarget::host(&host, port.unwrap_or(6379), db.unwrap_or(0), password.as_deref()));
        }
        if let Some(v) = var("CACHE_DEFAULT_TTL") {
            self.default_ttl = parse_ttl("CACHE_DEFAULT_TTL", &v)?;
        }
        if let Some(v) = var("CACHE_SERIALIZATION") {
            self.serialization = v.parse().map_err(|e| CacheError::config("CACHE_SERIALIZATION", &v, e))?;
        }
        if let Some(v) = var("CACHE_TRACK_STATS") {
            self.track_stats = parse_bool("CACHE_TRACK_STATS", &v)?;
        }
        if let Some(v) = var("CACHE_METRICS_NAMESPACE") {
            self.metrics_namespace = check_namespace("CACHE_METRICS_NAMESPACE", v)?;
        }
        if let Some(v) = var("CACHE_KEY_PREFIX") {
            self.key_prefix = check_prefix("CACHE_KEY_PREFIX", v)?;
        }
        if let Some(v) = var("CACHE_ADMIN_TOKEN") {
            self.admin_token = Some(Secret(v));
        }
        Ok(self)
    }

    /// Loads the `REDIS:` section of a settings file such as `config/settings.yaml`.
    pub fn from_settings_file(path: impl AsRef<Path>) -> Result<Self, CacheError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| CacheError::Settings { path: path.display().to_string(), message: e.to_string() })?;
        Self::from_settings_str(&text).map_err(|e| match e {
            CacheError::Settings { message, .. } => {
                CacheError::Settings { path: path.display().to_string(), message }
            }
            other => other,
        })
    }

    /// Parses the `REDIS:` section of settings YAML; every key is checked, none ignored.
    pub fn from_settings_str(yaml: &str) -> Result<Self, CacheError> {
        let settings = |message: String| CacheError::Settings { path: "<string>".into(), message };
        let doc: Value = serde_yaml::from_str(yaml).map_err(|e| settings(e.to_string()))?;
        let section = doc
            .get("REDIS")
            .or_else(|| doc.get("redis"))
            .ok_or_else(|| settings("no `REDIS:` section".into()))?;
        let map = section.as_mapping().ok_or_else(|| settings("`REDIS:` is not a mapping".into()))?;
        let mut config = CacheConfig::default();
        let (mut host, mut port, mut db, mut password) = (None, 6379u16, 0i64, None);
        for (k, v) in map {
            let key =
                k.as_str().ok_or_else(|| CacheError::config(&show(k), show(v), "keys must be strings"))?;
            let key_path = format!("REDIS.{key}");
            let key_path = key_path.as_str();
            match key {
                "url" => config.redis = Some(RedisTarget::url(yaml_str(key_path, v)?)),
                "host" => host = Some(yaml_str(key_path, v)?),
                "port" => port = yaml_num(key_path, v)?,
                "db" => db = yaml_num(key_path, v)?,
                "password" => password = (!v.is_null()).then(|| secret_str(key_path, v)).transpose()?,
                "key_prefix" | "prefix" => {
                    config.key_prefix = check_prefix(key_path, yaml_str(key_path, v)?)?
                }
                "serialization" => {
                    let s = yaml_str(key_path, v)?;
                    config.serialization = s.parse().map_err(|e| CacheError::config(key_path, &s, e))?;
                }
                "track_stats" => config.track_stats = yaml_bool(key_path, v)?,
                "metrics_namespace" => {
                    config.metrics_namespace = check_namespace(key_path, yaml_str(key_path, v)?)?
                }
                "connections" => config.connections = positive(key_path, v, yaml_num(key_path, v)?)?,
                "max_connections" => config.max_connections = positive(key_path, v, yaml_num(key_path, v)?)?,
                "max_value_bytes" => config.max_value_bytes = positive(key_path, v, yaml_num(key_path, v)?)?,
                "big_value_bytes" => config.big_value_bytes = positive(key_path, v, yaml_num(key_path, v)?)?,
                "local_max_entries" => {
                    config.local_max_entries = positive(key_path, v, yaml_num(key_path, v)?)?
                }
                "socket_timeout" => config.socket_timeout = yaml_secs(key_path, v)?,
                "operation_timeout" => config.operation_timeout = yaml_secs(key_path, v)?,
                "socket_connect_timeout" => config.socket_connect_timeout = yaml_secs(key_path, v)?,
                "retry_on_timeout" => config.retry_on_timeout = yaml_bool(key_path, v)?,
                "health_check_interval" => config.health_check_interval = yaml_secs(key_path, v)?,
                "default_ttl" => config.default_ttl = yaml_secs(key_path, v)?,
                "warmup_enabled" => config.warmup_enabled = yaml_bool(key_path, v)?,
                "warmup_batch_size" => {
                    config.warmup_batch_size = positive(key_path, v, yaml_num(key_path, v)?)?
                }
                "warmup_concurrency" => {
                    config.warmup_concurrency = positive(key_path, v, yaml_num(key_path, v)?)?
                }
                "circuit_breaker_enabled" => config.circuit_breaker_enabled = yaml_bool(key_path, v)?,
                "circuit_breaker_threshold" => {
                    config.circuit_breaker_threshold = positive(key_path, v, yaml_num(key_path, v)?)?
                }
                "circuit_breaker_timeout" => config.circuit_breaker_timeout = yaml_secs(key_path, v)?,
                "profiles" => config.profiles = yaml_profiles(v)?,
                "admin_token" => {
                    config.admin_token =
                        (!v.is_null()).then(|| secret_str(key_path, v).map(Secret)).transpose()?
                }
                named if named.ends_with("_ttl") && named.len() > 4 => {
                    config.named_ttls.insert(named[..named.len() - 4].to_owned(), yaml_secs(key_path, v)?);
                }
                _ => {
                    return Err(CacheError::config(
                        key_path,
                        show(v),
                        "unknown key (see CacheConfig's documentation for the keys read)",
                    ))
                }
            }
        }
        if let (None, Some(host)) = (&config.redis, host) {
            config.redis = Some(RedisTarget::host(&host, port, db, password.as_deref()));
        }
        Ok(config)
    }

    /// The management API's admin token (`admin_token`, `CACHE_ADMIN_TOKEN`).
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_ref().map(Secret::expose)
    }

    /// The Redis this cache talks to; `None` runs it in local mode.
    pub fn redis(&self) -> Option<&RedisTarget> {
        self.redis.as_ref()
    }
    /// The prefix every key lives under (`{prefix}:{key}`).
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }
    /// The TTL used when a call gives none.
    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }
    /// The format new entries are written in.
    pub fn serialization(&self) -> Serialization {
        self.serialization
    }
    /// Whether hits and misses are counted.
    pub fn track_stats(&self) -> bool {
        self.track_stats
    }
    /// Metric names are `{namespace}_cache_*` (`cache` gives `cache_*`).
    pub fn metrics_namespace(&self) -> &str {
        &self.metrics_namespace
    }
    /// How many multiplexed Redis connections share the load, in round robin.
    pub fn connections(&self) -> usize {
        self.connections
    }
    /// The seeds' pool size. Read but not acted on: commands are multiplexed over
    /// [`connections`](Self::connections) sockets, so no pool is kept.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }
    /// How long a Redis command may take before it fails.
    pub fn socket_timeout(&self) -> Duration {
        self.socket_timeout
    }
    /// The most one cache call may spend on Redis before the call falls back (default 250 ms).
    pub fn operation_timeout(&self) -> Duration {
        self.operation_timeout.min(self.socket_timeout)
    }
    /// How long connecting to Redis may take.
    pub fn socket_connect_timeout(&self) -> Duration {
        self.socket_connect_timeout
    }
    /// Read but not acted on yet: a timed-out cache call is never retried today.
    pub fn retry_on_timeout(&self) -> bool {
        self.retry_on_timeout
    }
    /// How often a background task PINGs Redis and probes an open breaker.
    pub fn health_check_interval(&self) -> Duration {
        self.health_check_interval
    }
    /// The TTL registered under `name` (`quantum_state_ttl: 300` registers `quantum_state`).
    pub fn named_ttl(&self, name: &str) -> Option<Duration> {
        self.named_ttls.get(name).copied()
    }
    /// All named TTLs.
    pub fn named_ttls(&self) -> &HashMap<String, Duration> {
        &self.named_ttls
    }
    /// The profile `name`: an explicit one, or one made from the named TTL of that name.
    pub fn profile(&self, name: &str) -> Option<Profile> {
        self.profiles.get(name).cloned().or_else(|| {
            self.named_ttl(name).map(|ttl| Profile {
                ttl: Some(ttl),
                prefix: Some(name.to_owned()),
                tags: Vec::new(),
            })
        })
    }
    /// The most entries the local tier holds before evicting.
    pub fn local_max_entries(&self) -> u64 {
        self.local_max_entries
    }
    /// Encoded values larger than this are not stored (default 8 MiB).
    pub fn max_value_bytes(&self) -> usize {
        self.max_value_bytes
    }
    /// Encoded values larger than this travel on a Redis connection of their
    /// own, under a timeout that grows with their size (default 256 KiB).
    pub fn big_value_bytes(&self) -> usize {
        self.big_value_bytes
    }
    /// Whether [`Cache::warm`](crate::Cache::warm) writes anything.
    pub fn warmup_enabled(&self) -> bool {
        self.warmup_enabled
    }
    /// Entries one warm-up task writes per batch.
    pub fn warmup_batch_size(&self) -> usize {
        self.warmup_batch_size
    }
    /// Warm-up tasks running at once.
    pub fn warmup_concurrency(&self) -> usize {
        self.warmup_concurrency
    }
    /// Whether failures open the circuit breaker (off: every call tries Redis).
    pub fn circuit_breaker_enabled(&self) -> bool {
        self.circuit_breaker_enabled
    }
    /// Consecutive failures that open the breaker.
    pub fn circuit_breaker_threshold(&self) -> u32 {
        self.circuit_breaker_threshold
    }
    /// How long the breaker stays open before one probe is let through.
    pub fn circuit_breaker_timeout(&self) -> Duration {
        self.circuit_breaker_timeout
    }
}

/// Builds a [`CacheConfig`]; [`build`](Self::build) checks the values.
#[derive(Debug, Clone)]
pub struct CacheConfigBuilder {
    config: CacheConfig,
}

impl CacheConfigBuilder {
    /// The bearer token the management API's admin routes require
    /// (the HTTP `ManagementApi` reads it from here).
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        self.config.admin_token = Some(Secret(token.into()));
        self
    }

    /// Talks to Redis at `url` (`redis://[:password@]host:port/db`).
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.config.redis = Some(RedisTarget::url(url));
        self
    }
    /// Runs without Redis: the local tier is the store.
    pub fn local_only(mut self) -> Self {
        self.config.redis = None;
        self
    }
    /// Sets the prefix every key lives under.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.key_prefix = prefix.into();
        self
    }
    /// Sets the TTL used when a call gives none.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.config.default_ttl = ttl;
        self
    }
    /// Sets the format new entries are written in.
    pub fn serialization(mut self, format: Serialization) -> Self {
        self.config.serialization = format;
        self
    }
    /// Turns hit and miss counting on or off.
    pub fn track_stats(mut self, on: bool) -> Self {
        self.config.track_stats = on;
        self
    }
    /// Sets the metrics namespace: `brain` gives `brain_cache_hits_total`.
    pub fn metrics_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config.metrics_namespace = namespace.into();
        self
    }
    /// Sets how many multiplexed connections share the load.
    pub fn connections(mut self, n: usize) -> Self {
        self.config.connections = n;
        self
    }
    /// Sets how long a Redis command may take.
    pub fn socket_timeout(mut self, timeout: Duration) -> Self {
        self.config.socket_timeout = timeout;
        self
    }
    /// Sets the most one cache call may spend on Redis.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.config.operation_timeout = timeout;
        self
    }
    /// Turns [`Cache::warm`](crate::Cache::warm) on or off.
    pub fn warmup_enabled(mut self, on: bool) -> Self {
        self.config.warmup_enabled = on;
        self
    }
    /// Sets the warm-up batch size and how many batches run at once.
    pub fn warmup(mut self, batch_size: usize, concurrency: usize) -> Self {
        self.config.warmup_batch_size = batch_size;
        self.config.warmup_concurrency = concurrency;
        self
    }
    /// Sets how often the background health check runs.
    pub fn health_check_interval(mut self, every: Duration) -> Self {
        self.config.health_check_interval = every;
        self
    }
    /// Turns the circuit breaker on or off.
    pub fn circuit_breaker_enabled(mut self, on: bool) -> Self {
        self.config.circuit_breaker_enabled = on;
        self
    }
    /// Sets the consecutive failures that open the breaker.
    pub fn circuit_breaker_threshold(mut self, failures: u32) -> Self {
        self.config.circuit_breaker_threshold = failures;
        self
    }
    /// Sets how long the breaker stays open before probing.
    pub fn circuit_breaker_timeout(mut self, timeout: Duration) -> Self {
        self.config.circuit_breaker_timeout = timeout;
        self
    }
    /// Sets how long connecting may take.
    pub fn socket_connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.socket_connect_timeout = timeout;
        self
    }
    /// Registers a named TTL for `ttl = "name"` and `profile = "name"`.
    pub fn named_ttl(mut self, name: impl Into<String>, ttl: Duration) -> Self {
        self.config.named_ttls.insert(name.into(), ttl);
        self
    }
    /// Registers a profile for `#[cached(profile = "name")]`.
    pub fn profile(mut self, name: impl Into<String>, profile: Profile) -> Self {
        self.config.profiles.insert(name.into(), profile);
        self
    }
    /// Bounds the local tier.
    pub fn local_max_entries(mut self, n: u64) -> Self {
        self.config.local_max_entries = n;
        self
    }
    /// Sets the largest encoded value that is stored.
    pub fn max_value_bytes(mut self, n: usize) -> Self {
        self.config.max_value_bytes = n;
        self
    }
    /// Sets the size above which a value travels on a connection of its own.
    pub fn big_value_bytes(mut self, n: usize) -> Self {
        self.config.big_value_bytes = n;
        self
    }
    /// Checks the values and returns the config.
    pub fn build(self) -> Result<CacheConfig, CacheError> {
        let c = self.config;
        check_prefix("key_prefix", c.key_prefix.clone())?;
        check_namespace("metrics_namespace", c.metrics_namespace.clone())?;
        for (key, d) in [
            ("default_ttl", c.default_ttl),
            ("socket_timeout", c.socket_timeout),
            ("operation_timeout", c.operation_timeout),
            ("health_check_interval", c.health_check_interval),
            ("socket_connect_timeout", c.socket_connect_timeout),
        ] {
            if d.is_zero() {
                return Err(CacheError::config(key, "0", "must be positive"));
            }
        }
        if c.connections == 0 {
            return Err(CacheError::config("connections", 0, "must be at least 1"));
        }
        Ok(c)
    }
}

fn show(v: &Value) -> String {
    serde_yaml::to_string(v).map(|s| s.trim_end().to_owned()).unwrap_or_else(|_| format!("{v:?}"))
}

fn check_prefix(key: &str, prefix: String) -> Result<String, CacheError> {
    if prefix.is_empty() || prefix.contains(['*', '?', '[', ']', '\\', ':', ' ', '#']) {
        return Err(CacheError::config(
            key,
            &prefix,
            "must be non-empty, without `:`, `#`, spaces or glob characters",
        ));
    }
    Ok(prefix)
}

fn check_namespace(key: &str, ns: String) -> Result<String, CacheError> {
    let valid = ns
        .chars()
        .enumerate()
        .all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()));
    if ns.is_empty() || !valid {
        return Err(CacheError::config(key, &ns, "must be a Prometheus name: letters, digits and `_`"));
    }
    Ok(ns)
}

fn parse_num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, CacheError> {
    v.trim().parse().map_err(|_| CacheError::config(key, v, "expected a whole number"))
}

fn parse_bool(key: &str, v: &str) -> Result<bool, CacheError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(CacheError::config(key, v, "expected true or false")),
    }
}

fn parse_ttl(key: &str, v: &str) -> Result<Duration, CacheError> {
    let secs: f64 = v.trim().parse().map_err(|_| CacheError::config(key, v, "expected seconds"))?;
    secs_to_duration(key, v, secs)
}

fn secs_to_duration(key: &str, shown: impl fmt::Display, secs: f64) -> Result<Duration, CacheError> {
    if secs.is_finite() && secs > 0.0 && secs < 1e12 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(CacheError::config(key, shown, "expected a positive number of seconds"))
    }
}

/// A secret's value is never part of the error: a password YAML read as a
/// number would otherwise end up in a log.
fn secret_str(key: &str, v: &Value) -> Result<String, CacheError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| CacheError::config(key, "***", "expected a string (quote it in the settings file)"))
}

fn yaml_str(key: &str, v: &Value) -> Result<String, CacheError> {
    v.as_str().map(str::to_owned).ok_or_else(|| CacheError::config(key, show(v), "expected a string"))
}

fn yaml_bool(key: &str, v: &Value) -> Result<bool, CacheError> {
    v.as_bool().ok_or_else(|| CacheError::config(key, show(v), "expected true or false"))
}

fn yaml_num<T: TryFrom<u64>>(key: &str, v: &Value) -> Result<T, CacheError> {
    v.as_u64()
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| CacheError::config(key, show(v), "expected a whole number in range"))
}

fn positive<T: Default + PartialEq>(key: &str, v: &Value, n: T) -> Result<T, CacheError> {
    if n == T::default() {
        return Err(CacheError::config(key, show(v), "must be at least 1"));
    }
    Ok(n)
}

fn yaml_secs(key: &str, v: &Value) -> Result<Duration, CacheError> {
    let secs = v.as_f64().ok_or_else(|| CacheError::config(key, show(v), "expected seconds"))?;
    secs_to_duration(key, show(v), secs)
}

fn yaml_profiles(v: &Value) -> Result<HashMap<String, Profile>, CacheError> {
    let map =
        v.as_mapping().ok_or_else(|| CacheError::config("REDIS.profiles", show(v), "expected a mapping"))?;
    let mut profiles = HashMap::new();
    for (name, body) in map {
        let name = yaml_str("REDIS.profiles", name)?;
        let fields = body.as_mapping().ok_or_else(|| {
            CacheError::config(&format!("REDIS.profiles.{name}"), show(body), "expected a mapping")
        })?;
        let mut profile = Profile::default();
        for (k, v) in fields {
            let key = format!("REDIS.profiles.{name}.{}", show(k));
            match k.as_str() {
                Some("ttl") => profile.ttl = Some(yaml_secs(&key, v)?),
                Some("prefix") => profile.prefix = Some(check_prefix(&key, yaml_str(&key, v)?)?),
                Some("tags") => {
                    let seq = v
                        .as_sequence()
                        .ok_or_else(|| CacheError::config(&key, show(v), "expected a list"))?;
                    profile.tags = seq.iter().map(|t| yaml_str(&key, t)).collect::<Result<_, _>>()?;
                }
                _ => {
                    return Err(CacheError::config(
                        &key,
                        show(v),
                        "unknown key (expected ttl, prefix or tags)",
                    ))
                }
            }
        }
        profiles.insert(name, profile);
    }
    Ok(profiles)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
APP:
  name: neuralblitz
REDIS:
  host: "redis"
  port: 6379
  db: 0
  password: null
  max_connections: 50
  socket_timeout: 5.0
  socket_connect_timeout: 5.0
  retry_on_timeout: true
  health_check_interval: 30
  default_ttl: 3600
  quantum_state_ttl: 300
  multi_reality_ttl: 600
  consciousness_ttl: 180
  api_response_ttl: 900
  warmup_enabled: true
  warmup_batch_size: 100
  warmup_concurrency: 5
  circuit_breaker_enabled: true
  circuit_breaker_threshold: 5
  circuit_breaker_timeout: 60
"#;

    #[test]
    fn reads_every_key_of_the_seed_settings() {
        let c = CacheConfig::from_settings_str(SEED).unwrap();
        assert_eq!(c.redis().unwrap().as_str(), "redis://redis:6379/0");
        assert_eq!(c.default_ttl(), Duration::from_secs(3600));
        assert_eq!(c.named_ttl("quantum_state"), Some(Duration::from_secs(300)));
        assert_eq!(c.named_ttl("api_response"), Some(Duration::from_secs(900)));
        assert_eq!(c.named_ttls().len(), 4);
        assert_eq!(c.socket_timeout(), Duration::from_secs(5));
        assert_eq!(c.health_check_interval(), Duration::from_secs(30));
        assert_eq!((c.warmup_batch_size(), c.warmup_concurrency()), (100, 5));
        assert_eq!(c.circuit_breaker_threshold(), 5);
        assert_eq!(c.circuit_breaker_timeout(), Duration::from_secs(60));
        let p = c.profile("consciousness").unwrap();
        assert_eq!((p.ttl, p.prefix.as_deref()), (Some(Duration::from_secs(180)), Some("consciousness")));
    }

    #[test]
    fn the_admin_token_is_read_from_the_settings_file_and_never_printed() {
        let c = CacheConfig::from_settings_str("REDIS:\n  admin_token: \"hunter2-admin\"\n").unwrap();
        assert_eq!(c.admin_token(), Some("hunter2-admin"));
        assert!(!format!("{c:?}").contains("hunter2-admin"));
        let c = CacheConfig::from_settings_str("REDIS:\n  admin_token: null\n").unwrap();
        assert_eq!(c.admin_token(), None);
        for key in ["password", "admin_token"] {
            let err = CacheConfig::from_settings_str(&format!("REDIS:\n  {key}: 918273645\n")).unwrap_err();
            assert!(!err.to_string().contains("918273645"), "{err}");
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn errors_name_the_key_and_the_value() {
        let err = CacheConfig::from_settings_str("REDIS:\n  hots: redis\n").unwrap_err().to_string();
        assert!(err.contains("REDIS.hots") && err.contains("redis"), "{err}");
        let err = CacheConfig::from_settings_str("REDIS:\n  port: lots\n").unwrap_err().to_string();
        assert!(err.contains("REDIS.port") && err.contains("lots"), "{err}");
        let err = CacheConfig::from_settings_str("REDIS:\n  default_ttl: -1\n").unwrap_err().to_string();
        assert!(err.contains("REDIS.default_ttl") && err.contains("-1"), "{err}");
        let err = CacheConfig::from_settings_str("OTHER: {}\n").unwrap_err().to_string();
        assert!(err.contains("REDIS"), "{err}");
    }

    #[test]
    fn environment_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let c = CacheConfig::default()
            .with_vars(env(&[
                ("REDIS_HOST", "db.internal"),
                ("REDIS_PORT", "6380"),
                ("REDIS_DB", "2"),
                ("REDIS_PASSWORD", "s3cret"),
                ("CACHE_DEFAULT_TTL", "60"),
                ("CACHE_SERIALIZATION", "msgpack"),
                ("CACHE_TRACK_STATS", "false"),
                ("CACHE_KEY_PREFIX", "nb"),
                ("CACHE_ADMIN_TOKEN", "t0ken-in-env"),
            ]))
            .unwrap();
        assert_eq!(c.admin_token(), Some("t0ken-in-env"));
        assert!(!format!("{c:?}").contains("t0ken-in-env"), "the admin token is never printed");
        let target = c.redis().unwrap();
        assert_eq!(target.as_str(), "redis://:s3cret@db.internal:6380/2");
        assert!(!target.to_string().contains("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.default_ttl(), Duration::from_secs(60));
        assert_eq!(c.serialization(), Serialization::MsgPack);
        assert!(!c.track_stats());
        assert_eq!(c.key_prefix(), "nb");
        let err = CacheConfig::default().with_vars(env(&[("CACHE_SERIALIZATION", "xml")])).unwrap_err();
        assert!(err.to_string().contains("CACHE_SERIALIZATION") && err.to_string().contains("xml"));
        assert!(CacheConfig::default().with_vars(env(&[])).unwrap().redis().is_none());
    }

    #[test]
    fn builder_checks_values() {
        assert!(CacheConfig::builder().key_prefix("a:b").build().is_err());
        assert!(CacheConfig::builder().default_ttl(Duration::ZERO).build().is_err());
        let c = CacheConfig::builder().key_prefix("app").redis_url("redis://127.0.0.1:1/0").build().unwrap();
        assert_eq!(c.key_prefix(), "app");
    }
}
