//! Configuration: one table of settings, from which the defaults, the keys of a
//! settings section (read through serde, from any format) and the environment
//! variables all come.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

use crate::{CacheError, Serialization};

/// Where Redis lives: one server, or the seed nodes of a Redis Cluster. The
/// password never appears in `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    url: String,
    /// Seed nodes (`redis://` URLs) of a cluster; empty for one server at `url`.
    cluster: Vec<String>,
}

impl RedisTarget {
    /// A target from a URL: `redis://[user:password@]host:port/db`,
    /// `rediss://…` for TLS (the `tls` feature), or
    /// `redis+sentinel://[user:password@]host:port[,host:port…]/master_name[/db]`
    /// (the `sentinel` feature), whose credentials and database are the master's.
    pub fn url(url: impl Into<String>) -> Self {
        RedisTarget { url: url.into(), cluster: Vec::new() }
    }

    /// A Redis Cluster reached through `nodes`, any of its nodes: `host:port`
    /// or `redis://` URLs (which may carry a user and password). The rest of
    /// the cluster is discovered from them.
    pub fn cluster<I, S>(nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let cluster: Vec<String> = nodes
            .into_iter()
            .map(|n| n.as_ref().trim().to_owned())
            .filter(|n| !n.is_empty())
            .map(|n| if n.contains("://") { n } else { format!("redis://{n}") })
            .collect();
        RedisTarget { url: cluster.first().cloned().unwrap_or_default(), cluster }
    }

    /// The seed nodes of a cluster; empty for one server.
    pub(crate) fn cluster_nodes(&self) -> &[String] {
        &self.cluster
    }

    /// Gives every node that names no credentials of its own these.
    fn with_credentials(mut self, username: Option<&str>, password: Option<&str>) -> Self {
        let auth = match (username, password) {
            (None, None) => return self,
            (user, password) => format!(
                "{}{}@",
                user.map(encode_userinfo).unwrap_or_default(),
                password.map(|p| format!(":{}", encode_userinfo(p))).unwrap_or_default()
            ),
        };
        for node in &mut self.cluster {
            if let (Some(scheme), false) = (node.find("://"), node.contains('@')) {
                node.insert_str(scheme + 3, &auth);
            }
        }
        self.url = self.cluster.first().cloned().unwrap_or(self.url);
        self
    }

    /// A target from host, port, database and optional password.
    pub fn host(host: &str, port: u16, db: i64, password: Option<&str>) -> Self {
        RedisTarget::assemble("redis", &format!("{host}:{port}"), None, password, &db.to_string())
    }

    /// `{scheme}://[user:password@]{hosts}/{path}`, the credentials
    /// percent-encoded as the URL parser decodes them.
    fn assemble(
        scheme: &str,
        hosts: &str,
        username: Option<&str>,
        password: Option<&str>,
        path: &str,
    ) -> Self {
        let auth = match (username, password) {
            (None, None) => String::new(),
            (user, password) => format!(
                "{}{}@",
                user.map(encode_userinfo).unwrap_or_default(),
                password.map(|p| format!(":{}", encode_userinfo(p))).unwrap_or_default()
            ),
        };
        RedisTarget::url(format!("{scheme}://{auth}{hosts}/{path}"))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.url
    }
}

/// A URL with whatever lies between the scheme and the last `@` (credentials) hidden.
fn redacted(f: &mut fmt::Formatter<'_>, url: &str) -> fmt::Result {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => write!(f, "{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => f.write_str(url),
    }
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.cluster.is_empty() {
            return redacted(f, &self.url);
        }
        f.write_str("cluster ")?;
        for (i, node) in self.cluster.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            redacted(f, node)?;
        }
        Ok(())
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisTarget({self})")
    }
}

/// `text` with every byte but RFC 3986's unreserved ones percent-encoded, for
/// a URL's user or password: a `@`, `:` or `/` in it would end it early.
fn encode_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
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
///
/// In a settings section it is an entry of `profiles`: `{ttl, prefix, tags}`, each
/// optional, any other key refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Time to live of entries made under this profile.
    #[serde(default, deserialize_with = "wire::optional::<wire::Secs, _>")]
    pub ttl: Option<Duration>,
    /// The key prefix of functions using this profile (their name when absent).
    #[serde(default, deserialize_with = "wire::optional::<wire::Prefix, _>")]
    pub prefix: Option<String>,
    /// Tags added to every entry made under this profile.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Declares every plain setting once: its field, default, key in a settings
/// section (plus an alias), the type that reads and checks it, and its
/// environment variable. The Redis target (`url`, or `host`/`port` or
/// `sentinels`/`master_name`, with `db`/`username`/`password`),
/// the `<name>_ttl` keys and `profiles` are read beside them, in [`CacheConfig::read`].
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $ty:ty = $default:expr, read as $wire:ty
            $(, alias $alias:literal)? $(, env $env:literal)?;
    )*) => {
        /// Everything a [`Cache`](crate::Cache) is built from.
        ///
        /// Built with [`builder`](Self::builder), read from the environment with
        /// [`from_env`](Self::from_env), or deserialized from the `REDIS:` section
        /// of the app's settings, whatever loads them (figment, config, TOML, JSON,
        /// YAML): the keys are those of the README's Configuration table, any other
        /// key is refused, durations are seconds (`5`, `0.25`, `"30"`). Through
        /// [`from_value`](Self::from_value) or
        /// [`from_settings_file`](Self::from_settings_file) an error names the key and
        /// the value as [`CacheError::Config`].
        #[derive(Debug, Clone)]
        pub struct CacheConfig {
            pub(crate) redis: Option<RedisTarget>,
            pub(crate) named_ttls: HashMap<String, Duration>,
            pub(crate) profiles: HashMap<String, Profile>,
            $( $(#[doc = $doc])* pub(crate) $field: $ty, )*
        }

        impl Default for CacheConfig {
            fn default() -> Self {
                CacheConfig {
                    redis: None,
                    named_ttls: HashMap::new(),
                    profiles: HashMap::new(),
                    $( $field: $default, )*
                }
            }
        }

        /// A key of the settings section, told apart as it is read so that an
        /// unknown one fails where it stands (the error then carries its path).
        #[allow(non_camel_case_types)]
        enum Key {
            $( $field, )*
            url,
            host,
            port,
            db,
            username,
            password,
            cluster_nodes,
            sentinels,
            master_name,
            profiles,
            NamedTtl(String),
        }

        const KEYS: &[&str] = &[
            $( stringify!($field), )*
            "url", "host", "port", "db", "username", "password", "sentinels", "master_name", "cluster_nodes",
            "profiles", "<name>_ttl",
        ];

        impl Key {
            fn parse(key: &str) -> Option<Key> {
                Some(match key {
                    $( stringify!($field) $(| $alias)? => Key::$field, )*
                    "url" => Key::url,
                    "host" => Key::host,
                    "port" => Key::port,
                    "db" => Key::db,
                    "username" => Key::username,
                    "password" => Key::password,
                    "cluster_nodes" => Key::cluster_nodes,
                    "sentinels" => Key::sentinels,
                    "master_name" => Key::master_name,
                    "profiles" => Key::profiles,
                    _ => Key::NamedTtl(key.strip_suffix("_ttl").filter(|name| !name.is_empty())?.to_owned()),
                })
            }
        }

        impl CacheConfig {
            /// Reads the value of `key` from `map` into `self` (or into `redis`, which
            /// is only complete once every key is read).
            fn read<'de, A: MapAccess<'de>>(
                &mut self,
                key: Key,
                map: &mut A,
                redis: &mut RedisParts,
            ) -> Result<(), A::Error> {
                match key {
                    $( Key::$field => self.$field = wire::Wire::value(map.next_value::<$wire>()?), )*
                    Key::url => redis.url = Some(map.next_value()?),
                    Key::host => redis.host = Some(map.next_value()?),
                    Key::port => redis.port = Some(map.next_value()?),
                    Key::db => redis.db = Some(map.next_value()?),
                    Key::username => redis.username = Some(map.next_value()?),
                    Key::password => redis.password = map.next_value::<wire::MaybeSecret>()?.0,
                    Key::sentinels => redis.sentinels = Some(map.next_value::<wire::HostList>()?.0),
                    Key::master_name => redis.master_name = Some(map.next_value()?),
                    Key::cluster_nodes => redis.cluster_nodes = Some(map.next_value::<wire::HostList>()?.0),
                    Key::profiles => self.profiles = map.next_value()?,
                    Key::NamedTtl(name) => {
                        self.named_ttls.insert(name, wire::Wire::value(map.next_value::<wire::Secs>()?));
                    }
                }
                Ok(())
            }

            /// The environment variables of the plain settings.
            fn read_env(&mut self, var: &impl Fn(&str) -> Option<String>) -> Result<(), CacheError> {
                $($(
                    if let Some(text) = var($env) {
                        self.$field = wire::Wire::value(wire::from_env::<$wire>($env, &text)?);
                    }
                )?)*
                Ok(())
            }
        }
    };
}

settings! {
    /// Every key lives under `{key_prefix}:`.
    key_prefix: String = "cache".into(), read as wire::Prefix, alias "prefix", env "CACHE_KEY_PREFIX";
    /// The TTL of a call that gives none.
    default_ttl: Duration = Duration::from_secs(300), read as wire::Secs, env "CACHE_DEFAULT_TTL";
    /// The format new entries are written in.
    serialization: Serialization = Serialization::Json, read as Serialization, env "CACHE_SERIALIZATION";
    /// Whether hits and misses are counted.
    track_stats: bool = true, read as wire::Flag, env "CACHE_TRACK_STATS";
    /// Metric names are `{metrics_namespace}_cache_*`.
    metrics_namespace: String = "cache".into(), read as wire::Namespace, env "CACHE_METRICS_NAMESPACE";
    /// The bearer token of the management API's admin routes.
    admin_token: Option<Secret> = None, read as wire::MaybeSecret, env "CACHE_ADMIN_TOKEN";
    /// Multiplexed Redis connections, used in round robin.
    connections: usize = 1, read as wire::Positive<usize>;
    /// Accepted for settings files written for a connection pool; no pool is kept.
    max_connections: usize = 50, read as wire::Positive<usize>;
    /// Caps `operation_timeout`.
    socket_timeout: Duration = Duration::from_secs(5), read as wire::Secs;
    /// The most one cache call spends on Redis before it falls back.
    operation_timeout: Duration = Duration::from_millis(250), read as wire::Secs;
    /// How long connecting to Redis may take.
    socket_connect_timeout: Duration = Duration::from_secs(5), read as wire::Secs;
    /// Accepted for settings files written for a retrying client; nothing is retried.
    retry_on_timeout: bool = true, read as wire::Flag;
    /// How often Redis is PINGed and an open breaker probed.
    health_check_interval: Duration = Duration::from_secs(30), read as wire::Secs;
    /// How often the cache sets its gauges (keys, memory, size): each refresh SCANs the prefix.
    metrics_refresh_interval: Duration = Duration::from_secs(15), read as wire::Secs;
    /// The most entries the local tier holds.
    local_max_entries: u64 = 100_000, read as wire::Positive<u64>;
    /// Larger encoded values are not stored.
    max_value_bytes: usize = 8 << 20, read as wire::Positive<usize>;
    /// Larger encoded values travel on a connection of their own.
    big_value_bytes: usize = 256 << 10, read as wire::Positive<usize>;
    /// On a Redis Cluster, how many shards (hash slots) each prefix's entries
    /// spread over: the same on every instance.
    cluster_shards: u16 = 32, read as wire::Positive<u16>, env "CACHE_CLUSTER_SHARDS";
    /// Whether every cached function serves its last value, for up to
    /// `fail_safe_max` after it expired, when its body fails.
    fail_safe: bool = false, read as wire::Flag, env "CACHE_FAIL_SAFE";
    /// How long after its expiry a fail-safe entry may still be served.
    fail_safe_max: Duration = Duration::from_secs(3600), read as wire::Secs;
    /// After a fail-safe entry was served, how long before its body is tried again.
    fail_safe_throttle: Duration = Duration::from_secs(30), read as wire::Secs;
    /// How long a fail-safe function's body may run while a last value waits
    /// to be served instead (none: as long as it takes).
    hard_timeout: Option<Duration> = None, read as wire::MaybeSecs;
    /// A secret every entry written to Redis is signed with (a keyed BLAKE3
    /// MAC over the key and the value); entries without a valid MAC read as misses.
    signing_key: Option<Secret> = None, read as wire::MaybeSecret, env "CACHE_SIGNING_KEY";
    /// Keys that encrypt the entries of sensitive prefixes, as
    /// `name:secret,name:secret`: the first encrypts, every one decrypts.
    encryption_keys: Option<Secret> = None, read as wire::MaybeSecret, env "CACHE_ENCRYPTION_KEYS";
    /// Prefixes whose entries are encrypted in Redis (with `encryption_keys`).
    sensitive_prefixes: Vec<String> = Vec::new(), read as wire::PrefixList, env "CACHE_SENSITIVE_PREFIXES";
    /// Up to this percentage is taken off each entry's TTL, at random, so
    /// that entries written together don't expire together.
    ttl_jitter_percent: u8 = 0, read as wire::Percent, env "CACHE_TTL_JITTER_PERCENT";
    /// How eagerly an `early_refresh` function refreshes a hot entry before
    /// it expires: XFetch's β (1 is the paper's optimum; larger starts sooner).
    early_refresh_beta: f64 = 1.0, read as wire::Factor, env "CACHE_EARLY_REFRESH_BETA";
    /// Whether `Cache::warm` writes anything.
    warmup_enabled: bool = true, read as wire::Flag;
    /// Entries one warm-up task writes per batch.
    warmup_batch_size: usize = 100, read as wire::Positive<usize>;
    /// Warm-up tasks running at once.
    warmup_concurrency: usize = 5, read as wire::Positive<usize>;
    /// While the breaker is open, whether calls are served from this process's
    /// local tier (`None`: on for one server, off for a cluster or with `near_cache`).
    local_fallback: Option<bool> = None, read as wire::AutoFlag, env "CACHE_LOCAL_FALLBACK";
    /// Whether every cached function keeps decoded values in this process in
    /// front of Redis, kept coherent across instances by the bus.
    near_cache: bool = false, read as wire::Flag, env "CACHE_NEAR_CACHE";
    /// The most entries the near tier holds.
    near_cache_max_entries: u64 = 10_000, read as wire::Positive<u64>;
    /// The longest an entry stays in the near tier.
    near_cache_ttl: Duration = Duration::from_secs(30), read as wire::Secs;
    /// Whether a cold key's body runs once across every instance sharing Redis.
    fleet_lease: bool = true, read as wire::Flag, env "CACHE_FLEET_LEASE";
    /// How long a fleet lease lasts unless its holder renews it: how soon a
    /// dead holder is replaced (a caller waits on one holder at most twice this).
    fleet_lease_ttl: Duration = Duration::from_secs(5), read as wire::Secs;
    /// Handler calls a write-behind flusher runs at once; one key's jobs never run at once.
    write_behind_concurrency: usize = 16, read as wire::Positive<usize>, env "CACHE_WRITE_BEHIND_CONCURRENCY";
    /// Attempts a write-behind job gets before it goes to the dead-letter stream.
    write_behind_max_attempts: u32 = 5, read as wire::Positive<u32>, env "CACHE_WRITE_BEHIND_MAX_ATTEMPTS";
    /// The wait after a write-behind job's first failed attempt; it doubles after each further one.
    write_behind_backoff: Duration = Duration::from_millis(200), read as wire::Secs, env "CACHE_WRITE_BEHIND_BACKOFF";
    /// The longest wait between two attempts of a write-behind job.
    write_behind_backoff_max: Duration = Duration::from_secs(30), read as wire::Secs;
    /// How long the active write-behind flusher's lease lasts unless renewed:
    /// how soon a standby takes over from one that died.
    write_behind_lease_ttl: Duration = Duration::from_secs(10), read as wire::Secs, env "CACHE_WRITE_BEHIND_LEASE_TTL";
    /// Whether failures open the circuit breaker.
    circuit_breaker_enabled: bool = true, read as wire::Flag;
    /// Consecutive failures that open the breaker.
    circuit_breaker_threshold: u32 = 5, read as wire::Positive<u32>;
    /// How long the breaker stays open before one probe is let through.
    circuit_breaker_timeout: Duration = Duration::from_secs(60), read as wire::Secs;
    /// A PEM file of the CA(s) that signed Redis's certificate; unset, the platform's roots.
    tls_ca_cert: Option<PathBuf> = None, read as wire::MaybePath, env "REDIS_CA_CERT";
    /// The PEM certificate (chain) of the cache, for mutual TLS.
    tls_client_cert: Option<PathBuf> = None, read as wire::MaybePath, env "REDIS_CLIENT_CERT";
    /// The PEM private key of `tls_client_cert`.
    tls_client_key: Option<PathBuf> = None, read as wire::MaybePath, env "REDIS_CLIENT_KEY";
    /// Accepts any server certificate: for development only.
    tls_insecure_skip_verify: bool = false, read as wire::Flag, env "REDIS_TLS_INSECURE_SKIP_VERIFY";
}

/// The Redis keys of a settings section: `url` wins over `sentinels`, which
/// wins over `host`; `port`, `db`, `username` and `password` default to 6379,
/// 0 and none. With `sentinels`, `db`, `username` and `password` are the master's.
#[derive(Default)]
struct RedisParts {
    url: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    db: Option<i64>,
    username: Option<String>,
    password: Option<Secret>,
    /// A cluster's seed nodes: they win over `url` and `host`.
    cluster_nodes: Option<Vec<String>>,
    sentinels: Option<Vec<String>>,
    master_name: Option<String>,
}

impl RedisParts {
    fn target(self) -> Option<RedisTarget> {
        let db = self.db.unwrap_or(0);
        let (user, password) = (self.username.as_deref(), self.password.as_ref().map(Secret::expose));
        if let Some(nodes) = self.cluster_nodes.filter(|n| !n.is_empty()) {
            return Some(RedisTarget::cluster(nodes).with_credentials(user, password));
        }
        if let Some(url) = self.url {
            return Some(RedisTarget::url(url));
        }
        if let Some(sentinels) = self.sentinels {
            // Without a master name the path is empty: `Cache::new` names the missing key.
            let path = self.master_name.map(|name| format!("{name}/{db}")).unwrap_or_default();
            return Some(RedisTarget::assemble(
                "redis+sentinel",
                &sentinels.join(","),
                user,
                password,
                &path,
            ));
        }
        let host = self.host?;
        let hosts = format!("{host}:{}", self.port.unwrap_or(6379));
        Some(RedisTarget::assemble("redis", &hosts, user, password, &db.to_string()))
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a setting's name")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Key::parse(key).ok_or_else(|| E::unknown_field(key, KEYS))
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// The contents of the `REDIS:` section (not the whole settings document): what
/// is absent keeps its default, an unknown key is an error.
impl<'de> Deserialize<'de> for CacheConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SectionVisitor;
        impl<'de> Visitor<'de> for SectionVisitor {
            type Value = CacheConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the cache's settings section (a map of settings)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CacheConfig, A::Error> {
                let mut config = CacheConfig::default();
                let mut redis = RedisParts::default();
                while let Some(key) = map.next_key::<Key>()? {
                    config.read(key, &mut map, &mut redis)?;
                }
                config.redis = redis.target();
                Ok(config)
            }
        }
        deserializer.deserialize_map(SectionVisitor)
    }
}

impl CacheConfig {
    /// Starts a builder from the defaults (local mode, prefix `cache`, JSON, TTL 300 s).
    pub fn builder() -> CacheConfigBuilder {
        CacheConfigBuilder { config: CacheConfig::default() }
    }

    /// Reads the environment over the defaults: `REDIS_CLUSTER_NODES`, or
    /// `REDIS_URL`, or `REDIS_SENTINELS` and `REDIS_MASTER_NAME`, or `REDIS_HOST`
    /// and `REDIS_PORT` (each with `REDIS_DB`, `REDIS_USERNAME` and
    /// `REDIS_PASSWORD`), `REDIS_CA_CERT`, `REDIS_CLIENT_CERT`,
    /// `REDIS_CLIENT_KEY`, `REDIS_TLS_INSECURE_SKIP_VERIFY`, `CACHE_DEFAULT_TTL`,
    /// `CACHE_SERIALIZATION`, `CACHE_TRACK_STATS`, `CACHE_KEY_PREFIX`,
    /// `CACHE_METRICS_NAMESPACE`, `CACHE_ADMIN_TOKEN`, `CACHE_CLUSTER_SHARDS` and
    /// `CACHE_LOCAL_FALLBACK`. Without a Redis variable the cache runs locally.
    pub fn from_env() -> Result<Self, CacheError> {
        CacheConfig::default().with_env()
    }

    /// Applies the environment variables of [`from_env`](Self::from_env) on top of `self`,
    /// so a deployment can override what a settings file says; an empty variable counts
    /// as unset.
    pub fn with_env(self) -> Result<Self, CacheError> {
        self.with_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    fn with_vars(mut self, var: impl Fn(&str) -> Option<String>) -> Result<Self, CacheError> {
        // A whole target replaces the settings file's: mixing its host with another port is never meant.
        if let Some(nodes) = var("REDIS_CLUSTER_NODES") {
            let (user, password) = (var("REDIS_USERNAME"), var("REDIS_PASSWORD"));
            self.redis = Some(
                RedisTarget::cluster(nodes.split(',')).with_credentials(user.as_deref(), password.as_deref()),
            );
        } else if let Some(url) = var("REDIS_URL") {
            self.redis = Some(RedisTarget::url(url));
        } else if var("REDIS_SENTINELS").is_some() || var("REDIS_HOST").is_some() {
            let parts = RedisParts {
                url: None,
                host: var("REDIS_HOST"),
                port: var("REDIS_PORT").map(|v| parse_num::<u16>("REDIS_PORT", &v)).transpose()?,
                db: var("REDIS_DB").map(|v| parse_num::<i64>("REDIS_DB", &v)).transpose()?,
                username: var("REDIS_USERNAME"),
                password: var("REDIS_PASSWORD").map(Secret),
                sentinels: var("REDIS_SENTINELS")
                    .map(|v| wire::from_env::<wire::HostList>("REDIS_SENTINELS", &v).map(wire::Wire::value))
                    .transpose()?,
                master_name: var("REDIS_MASTER_NAME"),
                cluster_nodes: None,
            };
            self.redis = parts.target();
        }
        self.read_env(&var)?;
        Ok(self)
    }

    /// Reads the cache's settings section from a tree the app already loaded (with
    /// figment, config, a TOML or JSON file, ...). Unlike deserializing directly, an
    /// error is a [`CacheError::Config`] naming the key's path in the section and the
    /// value found there (a password's or token's value is shown as `***`).
    pub fn from_value(section: serde_json::Value) -> Result<Self, CacheError> {
        Self::from_section(section, None)
    }

    fn from_section(section: serde_json::Value, name: Option<&str>) -> Result<Self, CacheError> {
        serde_path_to_error::deserialize(&section).map_err(|e| {
            let path: Vec<String> = e
                .path()
                .iter()
                .map(|segment| match segment {
                    serde_path_to_error::Segment::Map { key } => key.clone(),
                    _ => "?".to_owned(),
                })
                .collect();
            let key = name.map(str::to_owned).into_iter().chain(path.iter().cloned()).collect::<Vec<_>>();
            let key = if key.is_empty() { "<section>".to_owned() } else { key.join(".") };
            if path.is_empty() {
                // The section itself is not a map: serde's message would quote
                // it whole, and it may be a URL with a password in it.
                let reason = "expected a map of settings (`url: ...`, `default_ttl: ...`)".to_owned();
                return CacheError::Config { key, value: String::new(), reason };
            }
            // Only a known, non-secret setting's value is shown: a misspelt key
            // (`redis_password: ...`) may hold a secret as well as a known one.
            let shown = match path.as_slice() {
                // Seed URLs may carry a password.
                [.., last]
                    if ["password", "admin_token", "signing_key", "encryption_keys", "cluster_nodes"]
                        .contains(&last.as_str()) =>
                {
                    None
                }
                [profiles, _, field] if profiles == "profiles" => {
                    ["ttl", "prefix", "tags"].contains(&field.as_str()).then_some(())
                }
                [.., last] => Key::parse(last).map(|_| ()),
                [] => None,
            };
            let value = match shown {
                Some(()) => {
                    path.iter().try_fold(&section, |v, k| v.get(k.as_str())).map(show).unwrap_or_default()
                }
                None if path.last().is_some_and(|k| {
                    ["password", "admin_token", "signing_key", "encryption_keys"].contains(&k.as_str())
                }) =>
                {
                    "***".to_owned()
                }
                None => String::new(),
            };
            let mut reason = e.into_inner().to_string();
            // serde quotes a scalar it could not take ("invalid type: string
            // \"redis://:pw@h\""): where the value is not shown, neither is that.
            if value.is_empty() && !reason.starts_with("unknown field") {
                reason = "not a valid value here (not shown: it may hold a secret)".to_owned();
            }
            CacheError::Config { key, value, reason }
        })
    }

    /// The checks that span settings, or that no setting's own type makes:
    /// run by the builder and again by `Cache::new`, whichever of the file,
    /// the environment or the builder the values came from.
    pub(crate) fn check_bounds(&self) -> Result<(), CacheError> {
        // A renewal has the middle third of the lease to land in: shorter
        // than an operation, and the flusher loses its lease to a slow answer.
        if self.write_behind_lease_ttl < self.operation_timeout() * 3 {
            let ttl = format!("{:?}", self.write_behind_lease_ttl);
            let reason = "must be at least three times operation_timeout, or its renewals can't land in time";
            return Err(CacheError::config("write_behind_lease_ttl", ttl, reason));
        }
        if self.fail_safe_max > MAX_FAIL_SAFE {
            let max = format!("{:?}", self.fail_safe_max);
            return Err(CacheError::config("fail_safe_max", max, "must be at most 365 days"));
        }
        Ok(())
    }

    /// Loads the `REDIS:` (or `redis:`) section of a YAML settings file such as
    /// `config/settings.yaml`; other sections are the app's and are left alone.
    #[cfg(feature = "yaml")]
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

    /// Parses the `REDIS:` section of settings YAML, as
    /// [`from_settings_file`](Self::from_settings_file) does.
    #[cfg(feature = "yaml")]
    pub fn from_settings_str(yaml: &str) -> Result<Self, CacheError> {
        let settings = |message: String| CacheError::Settings { path: "<string>".into(), message };
        let mut doc: serde_json::Value = yaml_serde::from_str(yaml).map_err(|e| settings(e.to_string()))?;
        let (name, section) = ["REDIS", "redis"]
            .into_iter()
            .find_map(|name| Some((name, doc.get_mut(name)?.take())))
            .ok_or_else(|| settings("no `REDIS:` section".into()))?;
        Self::from_section(section, Some(name))
    }

    /// The management API's admin token (`admin_token`, `CACHE_ADMIN_TOKEN`).
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_ref().map(Secret::expose)
    }

    /// The Redis this cache talks to; `None` runs it in local mode.
    pub fn redis(&self) -> Option<&RedisTarget> {
        self.redis.as_ref()
    }
    /// The PEM file of the CA(s) a `rediss://` server's certificate is checked
    /// against (`tls_ca_cert`, `REDIS_CA_CERT`); `None` trusts the platform's roots.
    pub fn tls_ca_cert(&self) -> Option<&Path> {
        self.tls_ca_cert.as_deref()
    }
    /// The PEM certificate the cache presents for mutual TLS (`tls_client_cert`, `REDIS_CLIENT_CERT`).
    pub fn tls_client_cert(&self) -> Option<&Path> {
        self.tls_client_cert.as_deref()
    }
    /// The PEM private key of [`tls_client_cert`](Self::tls_client_cert)
    /// (`tls_client_key`, `REDIS_CLIENT_KEY`): its path only, the file is read at `Cache::new`.
    pub fn tls_client_key(&self) -> Option<&Path> {
        self.tls_client_key.as_deref()
    }
    /// Whether a `rediss://` server's certificate is accepted unchecked
    /// (`tls_insecure_skip_verify`): for development only, warned about in the log.
    pub fn tls_insecure_skip_verify(&self) -> bool {
        self.tls_insecure_skip_verify
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
    /// The pool size a settings file written for a pooled client gives (`max_connections`).
    ///
    /// Accepted and ignored: commands are pipelined over
    /// [`connections`](Self::connections) multiplexed sockets, so there is no pool to
    /// bound, and refusing the key would break the settings files that carry it.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }
    /// The ceiling of [`operation_timeout`](Self::operation_timeout): a settings file
    /// that lowers `socket_timeout` below it shortens every cache call's wait on Redis.
    pub fn socket_timeout(&self) -> Duration {
        self.socket_timeout
    }
    /// The most one cache call may spend on Redis before the call falls back (default 250 ms,
    /// never more than [`socket_timeout`](Self::socket_timeout)).
    pub fn operation_timeout(&self) -> Duration {
        self.operation_timeout.min(self.socket_timeout)
    }
    /// How long connecting to Redis may take.
    pub fn socket_connect_timeout(&self) -> Duration {
        self.socket_connect_timeout
    }
    /// Whether a settings file asked for timed-out commands to be retried (`retry_on_timeout`).
    ///
    /// Accepted and ignored: a call that times out falls back at once (the local tier,
    /// or the function's body) and its connection is rebuilt; a retry would make the
    /// caller wait past [`operation_timeout`](Self::operation_timeout), the bound the
    /// cache promises.
    pub fn retry_on_timeout(&self) -> bool {
        self.retry_on_timeout
    }
    /// How often a background task PINGs Redis and probes an open breaker.
    pub fn health_check_interval(&self) -> Duration {
        self.health_check_interval
    }
    /// How often the cache's own thread sets the gauges that need a scan
    /// (keys, memory, local size): a scrape between two refreshes sees the last one.
    pub fn metrics_refresh_interval(&self) -> Duration {
        self.metrics_refresh_interval
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
    /// On a Redis Cluster, how many shards each prefix's entries spread over
    /// (default 32).
    pub fn cluster_shards(&self) -> u16 {
        self.cluster_shards
    }
    /// Whether, while the breaker is open, calls are served from this process's
    /// local tier. Unset (`auto`), it is on for one Redis server and off for a
    /// cluster or with `near_cache` on (see the README's "When Redis fails").
    pub fn local_fallback(&self) -> bool {
        // Either deployment promises instances that hear each other: the local
        // tier, which hears only this one, would break that promise in an outage.
        self.local_fallback.unwrap_or_else(|| {
            !self.near_cache && self.redis.as_ref().is_none_or(|r| r.cluster_nodes().is_empty())
        })
    }
    /// Whether every cached function keeps decoded values in this process in
    /// front of Redis (`#[cached(near)]` opts one function in).
    pub fn near_cache(&self) -> bool {
        self.near_cache
    }
    /// The most entries the near tier holds (default 10,000).
    pub fn near_cache_max_entries(&self) -> u64 {
        self.near_cache_max_entries
    }
    /// The longest an entry stays in the near tier (default 30 s).
    pub fn near_cache_ttl(&self) -> Duration {
        self.near_cache_ttl
    }
    /// Whether a cold key's body runs once across every instance sharing Redis (default on).
    pub fn fleet_lease(&self) -> bool {
        self.fleet_lease
    }
    /// How long a fleet lease lasts unless renewed (default 5 s).
    pub fn fleet_lease_ttl(&self) -> Duration {
        self.fleet_lease_ttl
    }
    /// Handler calls a write-behind flusher runs at once (default 16).
    pub fn write_behind_concurrency(&self) -> usize {
        self.write_behind_concurrency
    }
    /// Attempts a write-behind job gets before it is dead-lettered (default 5).
    pub fn write_behind_max_attempts(&self) -> u32 {
        self.write_behind_max_attempts
    }
    /// The wait after a write-behind job's first failed attempt, doubled after each further one (default 200 ms).
    pub fn write_behind_backoff(&self) -> Duration {
        self.write_behind_backoff
    }
    /// The longest wait between two attempts of a write-behind job (default 30 s).
    pub fn write_behind_backoff_max(&self) -> Duration {
        self.write_behind_backoff_max
    }
    /// How long the active write-behind flusher's lease lasts unless renewed (default 10 s).
    pub fn write_behind_lease_ttl(&self) -> Duration {
        self.write_behind_lease_ttl
    }
    /// Whether every cached function is fail-safe (`fail_safe`, `CACHE_FAIL_SAFE`).
    pub fn fail_safe(&self) -> bool {
        self.fail_safe
    }
    /// How long after its expiry a fail-safe entry may still be served (default 1 h).
    pub fn fail_safe_max(&self) -> Duration {
        self.fail_safe_max
    }
    /// After a fail-safe entry was served, how long before its body is tried again (default 30 s).
    pub fn fail_safe_throttle(&self) -> Duration {
        self.fail_safe_throttle
    }
    /// How long a fail-safe body may run while a last value could be served instead (default: no limit).
    pub fn hard_timeout(&self) -> Option<Duration> {
        self.hard_timeout
    }
    /// Whether entries written to Redis are signed (`signing_key`, `CACHE_SIGNING_KEY`).
    pub fn signs_entries(&self) -> bool {
        self.signing_key.is_some()
    }
    pub(crate) fn signing_key(&self) -> Option<&str> {
        self.signing_key.as_ref().map(Secret::expose)
    }
    /// Whether some entries are encrypted (`encryption_keys`, `CACHE_ENCRYPTION_KEYS`).
    pub fn encrypts_entries(&self) -> bool {
        self.encryption_keys.is_some()
    }
    pub(crate) fn encryption_keys(&self) -> Option<&str> {
        self.encryption_keys.as_ref().map(Secret::expose)
    }
    /// The prefixes whose entries are encrypted in Redis (`sensitive_prefixes`).
    pub fn sensitive_prefixes(&self) -> &[String] {
        &self.sensitive_prefixes
    }
    /// Up to this percentage is taken off each entry's TTL, at random (default 0).
    pub fn ttl_jitter_percent(&self) -> u8 {
        self.ttl_jitter_percent
    }
    /// XFetch's β for `early_refresh` functions (default 1).
    pub fn early_refresh_beta(&self) -> f64 {
        self.early_refresh_beta
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

    /// Talks to Redis at `url` (`redis://[user:password@]host:port/db`, or any
    /// form [`RedisTarget::url`] takes).
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.config.redis = Some(RedisTarget::url(url));
        self
    }
    /// Talks to the Redis Cluster that `nodes` belong to (`host:port` or
    /// `redis://` URLs; a few are enough, the rest is discovered).
    pub fn redis_cluster<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.config.redis = Some(RedisTarget::cluster(nodes));
        self
    }
    /// Talks to the master that the sentinels at `sentinels` (`host:port` each)
    /// name `master_name`, asking them again at every reconnect (the `sentinel`
    /// feature). Credentials and a database go in [`redis_url`](Self::redis_url)'s
    /// form instead: `redis+sentinel://user:password@host:port,host:port/master_name/db`.
    pub fn redis_sentinels<S: AsRef<str>>(
        mut self,
        sentinels: impl IntoIterator<Item = S>,
        master_name: &str,
    ) -> Self {
        let hosts: Vec<String> = sentinels.into_iter().map(|s| s.as_ref().to_owned()).collect();
        let path = format!("{master_name}/0");
        self.config.redis =
            Some(RedisTarget::assemble("redis+sentinel", &hosts.join(","), None, None, &path));
        self
    }
    /// Checks a `rediss://` server's certificate against the CA(s) in the PEM
    /// file at `path` instead of the platform's roots.
    pub fn tls_ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.tls_ca_cert = Some(path.into());
        self
    }
    /// Presents the PEM certificate at `cert` with the PEM private key at
    /// `key` to a server that asks for one (mutual TLS).
    pub fn tls_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.config.tls_client_cert = Some(cert.into());
        self.config.tls_client_key = Some(key.into());
        self
    }
    /// Accepts any server certificate, for any name. For development only:
    /// anyone between the cache and Redis can then pose as Redis.
    pub fn tls_insecure_skip_verify(mut self, skip: bool) -> Self {
        self.config.tls_insecure_skip_verify = skip;
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
    /// Sets how often the gauges are refreshed; shorter costs a SCAN of the prefix more often.
    pub fn metrics_refresh_interval(mut self, every: Duration) -> Self {
        self.config.metrics_refresh_interval = every;
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
    /// Sets whether, while the breaker is open, calls are served from this
    /// process's local tier: it hears only this process's invalidations, so
    /// with several instances and a partial outage (one cluster master down, a
    /// partition of this process) it may serve what another instance
    /// invalidated. Off, calls run their function (still one per key at a time).
    pub fn local_fallback(mut self, on: bool) -> Self {
        self.config.local_fallback = Some(on);
        self
    }
    /// Makes every cached function fail-safe (`#[cached(fail_safe = true)]`
    /// does it for one): its entries stay in the cache `fail_safe_max`
    /// after they expire, and when the body then fails (an `Err`, a panic, or
    /// running past `hard_timeout`), the last value is served instead and
    /// the body is tried again after `fail_safe_throttle`. An invalidation
    /// removes the entry: nothing invalidated is ever served.
    pub fn fail_safe(mut self, on: bool) -> Self {
        self.config.fail_safe = on;
        self
    }
    /// Sets how long after its expiry a fail-safe entry may still be served.
    pub fn fail_safe_max(mut self, max: Duration) -> Self {
        self.config.fail_safe_max = max;
        self
    }
    /// Sets how long after a fail-safe entry was served its body is tried again.
    pub fn fail_safe_throttle(mut self, throttle: Duration) -> Self {
        self.config.fail_safe_throttle = throttle.max(Duration::from_millis(1));
        self
    }
    /// Sets how long a fail-safe body may run while a last value could be
    /// served instead; past it, the body is dropped and the last value served.
    pub fn hard_timeout(mut self, timeout: Duration) -> Self {
        self.config.hard_timeout = Some(timeout);
        self
    }
    /// Signs every entry written to Redis with a MAC keyed by `secret` (over
    /// the key and the value, so an entry can't be moved to another key
    /// either): an entry written by anyone without the secret reads as a miss
    /// and is counted, instead of being decoded. Every instance sharing the
    /// prefix needs the same secret. It is never printed.
    pub fn signing_key(mut self, secret: impl Into<String>) -> Self {
        self.config.signing_key = Some(Secret(secret.into()));
        self
    }
    /// Sets the keys that encrypt sensitive entries (`sensitive_prefixes`,
    /// `#[cached(sensitive = true)]`), each `(name, secret)`, the secret at
    /// least 16 characters. The first encrypts; every one decrypts, so a key is
    /// rotated by putting a new one first and dropping the old one once its
    /// entries have expired. The name is written in each entry's header. As
    /// in `CACHE_ENCRYPTION_KEYS`, a secret holds no comma and is trimmed.
    pub fn encryption_keys<I, N, S>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = (N, S)>,
        N: AsRef<str>,
        S: AsRef<str>,
    {
        let ring: Vec<String> =
            keys.into_iter().map(|(name, secret)| format!("{}:{}", name.as_ref(), secret.as_ref())).collect();
        self.config.encryption_keys = (!ring.is_empty()).then(|| Secret(ring.join(",")));
        self
    }
    /// Sets the prefixes (a function's `prefix`, or the first segment of a
    /// key given to [`Cache::set`](crate::Cache::set)) whose entries are
    /// encrypted in Redis, with [`encryption_keys`](Self::encryption_keys).
    pub fn sensitive_prefixes<I, S>(mut self, prefixes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.sensitive_prefixes = prefixes.into_iter().map(Into::into).collect();
        self
    }
    /// Takes up to `percent` (at most 100) off each entry's TTL, at random, so
    /// that entries written together (a warm-up, a burst of misses) don't all
    /// expire, and miss, in the same instant. TTLs only get shorter: an entry
    /// never lives longer than asked.
    pub fn ttl_jitter_percent(mut self, percent: u8) -> Self {
        self.config.ttl_jitter_percent = percent.min(100);
        self
    }
    /// Sets XFetch's β for `early_refresh` functions: a hit refreshes its
    /// entry in the background with a probability that rises as expiry nears,
    /// scaled by how long the body took and by `beta` (1 by default; 2 starts
    /// about twice as early). At most 100; a value that is not positive and
    /// finite leaves the setting as it was.
    pub fn early_refresh_beta(mut self, beta: f64) -> Self {
        if beta.is_finite() && beta > 0.0 {
            self.config.early_refresh_beta = beta.min(100.0);
        }
        self
    }
    /// Sets whether every cached function keeps decoded values in this
    /// process in front of Redis. Every invalidation any instance makes reaches
    /// them over Redis pub/sub; while this instance can't hear it, they serve nothing.
    pub fn near_cache(mut self, on: bool) -> Self {
        self.config.near_cache = on;
        self
    }
    /// Bounds the near tier.
    pub fn near_cache_max_entries(mut self, n: u64) -> Self {
        self.config.near_cache_max_entries = n.max(1);
        self
    }
    /// Sets the longest an entry stays in the near tier.
    pub fn near_cache_ttl(mut self, ttl: Duration) -> Self {
        self.config.near_cache_ttl = ttl;
        self
    }
    /// Sets whether a cold key's body runs once across every instance sharing
    /// Redis (a lease in Redis), or once per instance.
    pub fn fleet_lease(mut self, on: bool) -> Self {
        self.config.fleet_lease = on;
        self
    }
    /// Sets how long a fleet lease lasts unless its holder renews it: how soon
    /// a dead holder is replaced; another instance waits on one holder at most twice this.
    pub fn fleet_lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.fleet_lease_ttl = ttl.max(Duration::from_millis(10));
        self
    }
    /// Sets how many write-behind handler calls run at once (one key's jobs
    /// always run one after the other).
    pub fn write_behind_concurrency(mut self, n: usize) -> Self {
        self.config.write_behind_concurrency = n.max(1);
        self
    }
    /// Sets how many attempts a write-behind job gets before it goes to the dead-letter stream.
    pub fn write_behind_max_attempts(mut self, n: u32) -> Self {
        self.config.write_behind_max_attempts = n.max(1);
        self
    }
    /// Sets the wait after a write-behind job's first failed attempt (doubled
    /// after each further one, up to `max`).
    pub fn write_behind_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.config.write_behind_backoff = base.max(Duration::from_millis(1));
        self.config.write_behind_backoff_max = max.max(self.config.write_behind_backoff);
        self
    }
    /// Sets how long the active write-behind flusher's lease lasts unless
    /// renewed: how soon a standby takes over from a flusher that died.
    pub fn write_behind_lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.write_behind_lease_ttl = ttl.max(Duration::from_millis(100));
        self
    }
    /// Sets how many shards each prefix's entries spread over on a Redis
    /// Cluster: every instance sharing the prefix must use the same number.
    /// Tag, pattern and whole-cache invalidations run once per shard.
    pub fn cluster_shards(mut self, n: u16) -> Self {
        self.config.cluster_shards = n.max(1);
        self
    }
    /// Checks the values and returns the config.
    pub fn build(self) -> Result<CacheConfig, CacheError> {
        let c = self.config;
        PREFIX.check("key_prefix", c.key_prefix.clone())?;
        NAMESPACE.check("metrics_namespace", c.metrics_namespace.clone())?;
        for (key, d) in [
            ("default_ttl", c.default_ttl),
            ("socket_timeout", c.socket_timeout),
            ("operation_timeout", c.operation_timeout),
            ("health_check_interval", c.health_check_interval),
            ("metrics_refresh_interval", c.metrics_refresh_interval),
            ("socket_connect_timeout", c.socket_connect_timeout),
        ] {
            if d.is_zero() {
                return Err(CacheError::config(key, "0", "must be positive"));
            }
        }
        if c.connections == 0 {
            return Err(CacheError::config("connections", 0, "must be at least 1"));
        }
        c.check_bounds()?;
        if c.hard_timeout.is_some_and(|d| d.is_zero()) {
            return Err(CacheError::config("hard_timeout", "0", "must be positive"));
        }
        Ok(c)
    }
}

/// A value as the error shows it: scalars as JSON (`"abc"`, `-1`), containers
/// elided, since they may hold a secret further down.
fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(_) => "{…}".into(),
        serde_json::Value::Array(_) => "[…]".into(),
        scalar => scalar.to_string(),
    }
}

/// A rule a text setting must follow, checked alike from the builder and
/// from serde (`wire::Text`).
pub(super) struct TextRule {
    ok: fn(&str) -> bool,
    rule: &'static str,
}

impl TextRule {
    fn check(&self, key: &str, text: String) -> Result<String, CacheError> {
        if !(self.ok)(&text) {
            return Err(CacheError::config(key, &text, self.rule));
        }
        Ok(text)
    }
}

/// The longest `fail_safe_max`: a year past its TTL is as long as a last
/// value is worth keeping, and keeps every stamp and Redis TTL in range.
const MAX_FAIL_SAFE: Duration = Duration::from_secs(365 * 24 * 3600);

const PREFIX: TextRule = TextRule {
    ok: |prefix| !prefix.is_empty() && !prefix.contains(['*', '?', '[', ']', '\\', ':', ' ', '#']),
    rule: "must be non-empty, without `:`, `#`, spaces or glob characters",
};

const NAMESPACE: TextRule = TextRule {
    ok: |ns| {
        !ns.is_empty()
            && ns
                .chars()
                .enumerate()
                .all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()))
    },
    rule: "must be a Prometheus name: letters, digits and `_`",
};

fn parse_num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, CacheError> {
    v.trim().parse().map_err(|_| CacheError::config(key, v, "expected a whole number"))
}

mod wire;

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "yaml")]
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
    #[cfg(feature = "yaml")]
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
    #[cfg(feature = "yaml")]
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
    #[cfg(feature = "yaml")]
    fn errors_name_the_key_and_the_value() {
        // An unknown key is named, its value is not: a misspelt key may hold a secret.
        let err =
            CacheConfig::from_settings_str("REDIS:\n  redis_pasword: hunter2\n").unwrap_err().to_string();
        assert!(err.contains("REDIS.redis_pasword") && !err.contains("hunter2"), "{err}");
        // Nor is a value under a key that can't hold it.
        let err = CacheConfig::from_settings_str("REDIS:\n  profiles:\n    p: \"redis://:hunter2@h\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("REDIS.profiles.p") && !err.contains("hunter2"), "{err}");
        // A section that is not a map is not quoted back either.
        let err =
            CacheConfig::from_settings_str("REDIS: redis://:hunter2@cache:6379\n").unwrap_err().to_string();
        assert!(err.contains("REDIS") && !err.contains("hunter2"), "{err}");
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
        let c = CacheConfig::default()
            .with_vars(env(&[
                ("CACHE_TTL_JITTER_PERCENT", "15%"),
                ("CACHE_NEAR_CACHE", "true"),
                ("CACHE_FLEET_LEASE", "false"),
            ]))
            .unwrap();
        assert_eq!((c.ttl_jitter_percent(), c.near_cache(), c.fleet_lease()), (15, true, false));
        let err = CacheConfig::default().with_vars(env(&[("CACHE_TTL_JITTER_PERCENT", "150")])).unwrap_err();
        assert!(
            err.to_string().contains("CACHE_TTL_JITTER_PERCENT") && err.to_string().contains("150"),
            "{err}"
        );
    }

    #[test]
    fn username_sentinels_and_tls_settings_from_the_environment_and_the_section() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let c = CacheConfig::default()
            .with_vars(env(&[
                ("REDIS_HOST", "db.internal"),
                ("REDIS_USERNAME", "app"),
                ("REDIS_PASSWORD", "p@ss:w/rd"),
                ("REDIS_CA_CERT", "/etc/redis/ca.pem"),
                ("REDIS_CLIENT_CERT", "/etc/redis/client.pem"),
                ("REDIS_CLIENT_KEY", "/etc/redis/client.key"),
                ("REDIS_TLS_INSECURE_SKIP_VERIFY", "yes"),
            ]))
            .unwrap();
        // The password is percent-encoded: its `@`, `:` and `/` would end the URL's parts early.
        assert_eq!(c.redis().unwrap().as_str(), "redis://app:p%40ss%3Aw%2Frd@db.internal:6379/0");
        assert_eq!(c.tls_ca_cert(), Some(Path::new("/etc/redis/ca.pem")));
        assert_eq!(c.tls_client_cert(), Some(Path::new("/etc/redis/client.pem")));
        assert_eq!(c.tls_client_key(), Some(Path::new("/etc/redis/client.key")));
        assert!(c.tls_insecure_skip_verify());
        assert!(!format!("{c:?}").contains("p@ss"));

        // Sentinels win over a host; their credentials and db are the master's.
        let c = CacheConfig::default()
            .with_vars(env(&[
                ("REDIS_HOST", "ignored"),
                ("REDIS_SENTINELS", "s1:26379, s2:26379"),
                ("REDIS_MASTER_NAME", "cache"),
                ("REDIS_DB", "2"),
                ("REDIS_PASSWORD", "pw"),
            ]))
            .unwrap();
        assert_eq!(c.redis().unwrap().as_str(), "redis+sentinel://:pw@s1:26379,s2:26379/cache/2");
        let err = CacheConfig::default().with_vars(env(&[("REDIS_SENTINELS", "s1")])).unwrap_err();
        assert!(err.to_string().contains("REDIS_SENTINELS"), "{err}");

        let section = serde_json::json!({
            "sentinels": ["10.0.0.1:26379", "10.0.0.2:26379"],
            "master_name": "m",
            "username": "app",
            "password": "pw",
            "tls_ca_cert": "ca.pem",
            "tls_insecure_skip_verify": false,
        });
        let c = CacheConfig::from_value(section).unwrap();
        assert_eq!(c.redis().unwrap().as_str(), "redis+sentinel://app:pw@10.0.0.1:26379,10.0.0.2:26379/m/0");
        assert_eq!(c.tls_ca_cert(), Some(Path::new("ca.pem")));
        let c = CacheConfig::from_value(serde_json::json!({"host": "h", "username": "u", "password": "p"}))
            .unwrap();
        assert_eq!(c.redis().unwrap().as_str(), "redis://u:p@h:6379/0");
        let err = CacheConfig::from_value(serde_json::json!({"tls_ca_cert": ""})).unwrap_err();
        assert!(err.to_string().contains("tls_ca_cert"), "{err}");
    }

    #[test]
    fn builder_checks_values() {
        assert!(CacheConfig::builder().key_prefix("a:b").build().is_err());
        let err = CacheConfig::builder().fail_safe_max(Duration::MAX).build().unwrap_err();
        assert!(err.to_string().contains("fail_safe_max"), "{err}");
        let short = Duration::from_millis(600);
        let err = CacheConfig::builder().write_behind_lease_ttl(short).build().unwrap_err();
        assert!(err.to_string().contains("write_behind_lease_ttl"), "{err}");
        let fast = CacheConfig::builder().operation_timeout(Duration::from_millis(200));
        assert!(fast.write_behind_lease_ttl(short).build().is_ok());
        // However it was set: the environment too.
        let c =
            CacheConfig::default().with_vars(|k| (k == "CACHE_WRITE_BEHIND_LEASE_TTL").then(|| "0.5".into()));
        assert!(c.unwrap().check_bounds().is_err());
        assert!(CacheConfig::builder().default_ttl(Duration::ZERO).build().is_err());
        let c = CacheConfig::builder().key_prefix("app").redis_url("redis://127.0.0.1:1/0").build().unwrap();
        assert_eq!(c.key_prefix(), "app");
    }

    #[test]
    fn cluster_nodes_from_the_environment_and_the_settings() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let c = CacheConfig::default()
            .with_vars(env(&[
                ("REDIS_CLUSTER_NODES", "10.0.0.1:7000, rediss://10.0.0.2:7000,redis://own:pw@10.0.0.3:7000"),
                ("REDIS_URL", "redis://ignored:6379"),
                ("REDIS_USERNAME", "app"),
                ("REDIS_PASSWORD", "p@ss"),
                ("CACHE_CLUSTER_SHARDS", "64"),
                ("CACHE_LOCAL_FALLBACK", "true"),
            ]))
            .unwrap();
        let target = c.redis().unwrap();
        assert_eq!(
            target.cluster_nodes(),
            [
                "redis://app:p%40ss@10.0.0.1:7000",
                "rediss://app:p%40ss@10.0.0.2:7000",
                "redis://own:pw@10.0.0.3:7000"
            ]
        );
        // No credentials in what is printed.
        let shown = format!("{target} {target:?}");
        assert!(!shown.contains("p%40ss") && !shown.contains("pw@"), "{shown}");
        assert!(shown.contains("10.0.0.2:7000"), "{shown}");
        assert_eq!((c.cluster_shards(), c.local_fallback()), (64, true));

        // A username without a password is kept too.
        let c = CacheConfig::default()
            .with_vars(env(&[("REDIS_CLUSTER_NODES", "h:1"), ("REDIS_USERNAME", "app")]))
            .unwrap();
        assert_eq!(c.redis().unwrap().cluster_nodes(), ["redis://app@h:1"]);

        let section =
            serde_json::json!({"cluster_nodes": ["h1:7000", "h2:7000"], "password": "s", "url": "redis://x"});
        let c = CacheConfig::from_value(section).unwrap();
        assert_eq!(c.redis().unwrap().cluster_nodes(), ["redis://:s@h1:7000", "redis://:s@h2:7000"]);
        // Off by default on a cluster, on for one server and in local mode.
        assert!(!c.local_fallback());
        assert!(CacheConfig::builder().redis_url("redis://h:1").build().unwrap().local_fallback());
        assert!(CacheConfig::default().local_fallback());
        let err = CacheConfig::from_value(serde_json::json!({"cluster_nodes": ["redis://u:hunter2@h:1"]}))
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
