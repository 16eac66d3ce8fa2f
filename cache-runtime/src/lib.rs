#![doc = include_str!("../README.md")]

mod access;
mod background;
mod breaker;
mod bus;
mod cache;
#[cfg(feature = "cluster")]
mod cluster;
pub mod codec;
mod config;
mod conn;
mod detached;
mod engine;
mod error;
mod fail_safe;
mod failover;
mod fence;
mod flight;
mod get_with;
mod glob;
/// HTTP: the management API, `/metrics`, and response caching for axum.
#[cfg(feature = "http")]
pub mod http;
mod key;
mod lease;
mod local;
pub mod macro_options;
mod metrics;
mod misconfig;
mod near;
mod pending;
mod redis_store;
mod redis_tier;
mod schema;
mod seal;
#[cfg(feature = "sentinel")]
mod sentinel;
mod shard;
mod sign;
mod spec;
mod stats;
mod store;
#[cfg(feature = "tls")]
mod tls;
mod warmers;
mod write_behind;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use breaker::BreakerState;
pub use bus::Event;
pub use cache::{get_cache, init, init_with_warmers, Cache, KeyTtl, Mode, Set};
/// Rewrites an `async fn` into a cache-aside call: a hit returns the stored
/// value, a miss runs the body once per key in this process and stores its
/// result, a cache fault returns the body's own result. [`macro_options`] has
/// every option with an example that runs, and the companion functions
/// (`_invalidate`, `_invalidate_all`, `_key`, `_refresh`) it generates.
#[doc(inline)]
pub use cache_macros::cached;
pub use codec::Serialization;
pub use config::{CacheConfig, CacheConfigBuilder, Profile, RedisTarget};
pub use error::CacheError;
pub use get_with::{GetWith, TryGetWith};
pub use metrics::{Metrics, Op};
pub use stats::{CacheStats, Health};
pub use warmers::Warmers;
pub use write_behind::{CacheWrite, Flusher, FlusherHandle, Job, Queued, WriteBehind};

use std::time::Duration;

/// A time to live: whole seconds as an integer, or a `Duration`.
pub trait IntoTtl {
    /// The TTL as a `Duration`.
    fn into_ttl(self) -> Duration;
}

impl IntoTtl for Duration {
    fn into_ttl(self) -> Duration {
        self
    }
}

macro_rules! secs_ttl {
    ($($t:ty),*) => {$(
        impl IntoTtl for $t {
            fn into_ttl(self) -> Duration {
                // Negative seconds can't be meant: treat them as zero, which `set` rejects.
                Duration::from_secs(u64::try_from(self).unwrap_or(0))
            }
        }
    )*};
}

secs_ttl!(u64, u32, i32, i64, usize);
