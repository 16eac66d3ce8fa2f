use std::time::Duration;

/// Everything a cache call can fail with; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// Redis could not be reached or answered with an error.
    #[error("redis error: {0} (check that Redis is running and REDIS_URL points at it)")]
    Redis(#[from] redis::RedisError),

    /// A Redis call did not finish within its timeout.
    #[error("redis did not answer within {0:?} (raise `socket_timeout` or check the server's load)")]
    Timeout(Duration),

    /// Redis is not being used right now (the circuit breaker is open).
    #[error("redis is unavailable: {0} (the cache serves from the local tier until Redis recovers)")]
    Unavailable(String),

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
            CacheError::Timeout(_) | CacheError::Unavailable(_) => true,
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

    pub(crate) fn config(key: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        CacheError::Config { key: key.to_owned(), value: value.to_string(), reason: reason.into() }
    }
}
