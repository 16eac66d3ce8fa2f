use std::time::Duration;

/// Everything a cache call can fail with; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// Redis could not be reached or answered with an error.
    #[error("redis error: {0}{hint}", hint = connection_hint(.0))]
    Redis(redis::RedisError),

    /// Redis refused the credentials (WRONGPASS) or wants some (NOAUTH).
    #[error("redis refused authentication: {0} (set the user and password in REDIS_URL as redis://user:password@host, in REDIS_PASSWORD, or as `password` in the settings file)")]
    Auth(String),

    /// The Redis user lacks a permission the cache needs (NOPERM).
    #[error("the redis user may not {action}: {message} (grant it with ACL SETUSER; the README lists the commands and key patterns the cache needs)")]
    Permission {
        /// What was refused: a command, or access to a key pattern.
        action: String,
        /// What Redis said.
        message: String,
    },

    /// A TLS session with Redis was refused: its certificate failed the checks
    /// (another CA, another name, expired), Redis refused the cache's client
    /// certificate or its lack of one, or the server does not speak TLS there.
    #[error("TLS with redis failed: {0} (check `tls_ca_cert` (REDIS_CA_CERT), that the URL's host is one Redis's certificate names, the client certificate, and that the port is Redis's TLS port)")]
    Tls(String),

    /// Called outside a Tokio runtime: the cache's Redis commands run under
    /// Tokio timers. A `#[cached]` function or `get_with` runs its body instead.
    #[error("called outside a Tokio runtime: the cache needs one for its Redis commands (call it from within a Tokio runtime; cached functions run their body meanwhile)")]
    NoRuntime,

    /// A Redis call did not finish within its timeout.
    #[error("redis did not answer within {0:?} (raise `socket_timeout` or check the server's load)")]
    Timeout(Duration),

    /// Redis is not being used right now (the circuit breaker is open).
    #[error("redis is unavailable: {0} (the cache serves from the local tier until Redis recovers)")]
    Unavailable(String),

    /// An invalidation could not reach Redis: it was applied to this process's
    /// local tier and queued, and is replayed as soon as Redis answers. Until
    /// then other processes may still read what it covers from Redis.
    #[error("the invalidation is queued, not applied: redis could not take it ({0}); it is replayed as soon as redis answers, and this process serves nothing it covers meanwhile")]
    Deferred(String),

    /// A value could not be encoded into the configured format.
    #[error(
        "could not encode the value as {format}: {message} (choose another serialization or change the type)"
    )]
    Encode {
        /// The configured format.
        format: &'static str,
        /// What the encoder said.
        message: String,
    },

    /// Stored bytes could not be decoded into the requested type.
    #[error("could not decode the stored entry as {format}: {message} (the entry is dropped; bump `version` when a cached type changes)")]
    Decode {
        /// The format named by the entry's header.
        format: &'static str,
        /// What the decoder said.
        message: String,
    },

    /// The stored entry was written for another shape of the requested type: a
    /// field or variant renamed, reordered, added, removed or retyped (another
    /// build during a deploy, or a changed type without a `version` bump). It
    /// reads as a miss and is left in place for the next write to replace.
    #[error("the stored entry was written for another shape of the type (fingerprint {found:016x}, this build reads {expected:016x}); it reads as a miss until it is rewritten")]
    TypeMismatch {
        /// The fingerprint of the type this build reads.
        expected: u64,
        /// The fingerprint in the entry's header.
        found: u64,
    },

    /// An encoded value exceeded `max_value_bytes` and was not stored.
    #[error("value of {size} bytes exceeds max_value_bytes ({limit}); it was not stored (raise the limit or cache less)")]
    TooLarge {
        /// The encoded size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// A configuration key was unknown or its value was invalid.
    #[error("invalid configuration: `{key}` = `{value}`: {reason}")]
    Config {
        /// The offending key.
        key: String,
        /// The offending value as written.
        value: String,
        /// What was expected instead.
        reason: String,
    },

    /// A settings file could not be read or parsed.
    #[error("could not read settings {path}: {message}")]
    Settings {
        /// The file that was read.
        path: String,
        /// What went wrong.
        message: String,
    },

    /// An argument to a cache call was rejected before anything was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl CacheError {
    /// Whether this says Redis can't be reached (I/O, timeouts, a server still
    /// loading), as opposed to an error Redis answered with.
    pub fn is_unavailable(&self) -> bool {
        match self {
            CacheError::Timeout(_) | CacheError::Unavailable(_) | CacheError::Deferred(_) => true,
            CacheError::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
            }
            _ => false,
        }
    }

    /// Whether this is a mistake in how the cache reaches Redis (credentials,
    /// permissions, TLS certificates) that retrying will not fix.
    pub fn is_misconfiguration(&self) -> bool {
        matches!(self, CacheError::Auth(_) | CacheError::Permission { .. } | CacheError::Tls(_))
    }

    pub(crate) fn config(key: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        CacheError::Config { key: key.to_owned(), value: value.to_string(), reason: reason.into() }
    }
}

impl From<redis::RedisError> for CacheError {
    fn from(e: redis::RedisError) -> Self {
        match e.code() {
            Some("WRONGPASS" | "NOAUTH") => return CacheError::Auth(server_message(&e)),
            Some("NOPERM") => {
                return CacheError::Permission { action: refused_action(&e), message: server_message(&e) }
            }
            // ACL refusals inside a Lua script come back as plain ERR.
            Some("ERR") if e.detail().is_some_and(|d| d.contains("can't run this command or subcommand")) => {
                return CacheError::Permission {
                    action: "run a command inside the cache's Lua scripts".into(),
                    message: server_message(&e),
                };
            }
            _ => {}
        }
        if e.kind() == redis::ErrorKind::AuthenticationFailed {
            return CacheError::Auth(e.to_string());
        }
        CacheError::Redis(e)
    }
}

/// The hint about reaching Redis, only where the failure was reaching it.
fn connection_hint(e: &redis::RedisError) -> &'static str {
    if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() || e.is_timeout() {
        " (check that Redis is running and REDIS_URL points at it)"
    } else {
        ""
    }
}

fn server_message(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    }
}

/// `run the 'get' command` or `access a key`, from Redis's NOPERM text.
fn refused_action(e: &redis::RedisError) -> String {
    let detail = e.detail().unwrap_or_default();
    if let Some(rest) = detail.split("to run the '").nth(1) {
        if let Some(command) = rest.split('\'').next() {
            return format!("run {}", command.to_uppercase());
        }
    }
    if detail.contains("access one of the keys") || detail.contains("access a key") {
        return "access one of the cache's keys".into();
    }
    if detail.contains("channel") {
        return "use a pub/sub channel".into();
    }
    "run a command the cache needs".into()
}
