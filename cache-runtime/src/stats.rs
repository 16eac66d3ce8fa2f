//! Counters kept on every call, and the shapes `stats()` and `health()` return.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::breaker::BreakerState;
use crate::cache::Mode;
use crate::metrics::Metrics;
use crate::CacheError;

/// Relaxed atomics: each is an independent count, read only for reporting.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) decode_failures: AtomicU64,
    pub(crate) type_mismatches: AtomicU64,
    pub(crate) fills_refused: AtomicU64,
    pub(crate) oversized: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) early_refreshes: AtomicU64,
    pub(crate) soft_timeouts: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(
        &self,
        metrics: &Metrics,
        mode: Mode,
        local_entries: u64,
        local_bytes: u64,
    ) -> CacheStats {
        let hits = metrics.hits.get();
        let misses = metrics.misses.get();
        CacheStats {
            connected: false,
            mode,
            total_keys: 0,
            redis_version: None,
            used_memory_bytes: None,
            used_memory_human: None,
            peak_memory_bytes: None,
            peak_memory_human: None,
            connected_clients: None,
            local_cache_size: local_entries,
            local_cache_bytes: local_bytes,
            hits,
            misses,
            hit_rate: hit_rate(hits, misses),
            errors: metrics.errors.get(),
            decode_failures: self.decode_failures.load(Ordering::Relaxed),
            type_mismatches: self.type_mismatches.load(Ordering::Relaxed),
            fills_refused: self.fills_refused.load(Ordering::Relaxed),
            oversized: self.oversized.load(Ordering::Relaxed),
            stale_served: self.stale_served.load(Ordering::Relaxed),
            early_refreshes: self.early_refreshes.load(Ordering::Relaxed),
            soft_timeouts: self.soft_timeouts.load(Ordering::Relaxed),
            breaker: BreakerState::Closed,
            breaker_opened: 0,
            pending_invalidations: 0,
            bad_signatures: 0,
            bad_encryption: 0,
            near_cache_size: 0,
            near_cache_hits: 0,
            bus_listening: false,
            write_behind_queue_length: 0,
            write_behind_oldest_job_age_seconds: 0.0,
            write_behind_applied: metrics.write_behind.applied.get(),
            write_behind_retries: metrics.write_behind.retries.get(),
            write_behind_dead_letters: metrics.write_behind.dead_letters.get(),
        }
    }
}

/// `hits / (hits + misses)`, 0 before any lookup.
pub(crate) fn hit_rate(hits: u64, misses: u64) -> f64 {
    if hits + misses == 0 {
        0.0
    } else {
        hits as f64 / (hits + misses) as f64
    }
}

/// What [`Cache::stats`](crate::Cache::stats) reports.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct CacheStats {
    /// Whether Redis answered.
    pub connected: bool,
    /// Which store serves the cache.
    pub mode: Mode,
    /// Keys under this cache's prefix.
    pub total_keys: u64,
    /// The Redis server's version.
    pub redis_version: Option<String>,
    /// Memory Redis uses, in bytes.
    pub used_memory_bytes: Option<u64>,
    /// Memory Redis uses, as Redis prints it (`1.23M`).
    pub used_memory_human: Option<String>,
    /// Peak memory Redis used, in bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Peak memory, as Redis prints it.
    pub peak_memory_human: Option<String>,
    /// Clients connected to Redis.
    pub connected_clients: Option<u64>,
    /// Entries in the local tier.
    pub local_cache_size: u64,
    /// Bytes held by the local tier (keys and encoded values; the decoded
    /// values that hit entries keep as well are not counted: their size is unknown).
    pub local_cache_bytes: u64,
    /// Lookups that found a value.
    pub hits: u64,
    /// Lookups that found none.
    pub misses: u64,
    /// `hits / (hits + misses)`, 0 before any lookup.
    pub hit_rate: f64,
    /// Cache faults absorbed by falling back to the function.
    pub errors: u64,
    /// Entries that could not be decoded and were dropped.
    pub decode_failures: u64,
    /// Entries written for another shape of the type read (another build's):
    /// misses, left in place for the next write to replace.
    pub type_mismatches: u64,
    /// Fills skipped because an invalidation ran while the value was computed.
    pub fills_refused: u64,
    /// Values not stored because they exceeded `max_value_bytes`.
    pub oversized: u64,
    /// Calls whose body failed and that got the function's last value instead (`fail_safe`).
    pub stale_served: u64,
    /// Entries refreshed in the background before they expired (`early_refresh`).
    pub early_refreshes: u64,
    /// Calls that got the last value once their body ran past its
    /// `soft_timeout`, the body going on in the background (counted in `stale_served` too).
    pub soft_timeouts: u64,
    /// The circuit breaker's state.
    pub breaker: BreakerState,
    /// How often the breaker has opened.
    pub breaker_opened: u64,
    /// Invalidations waiting to be replayed into Redis.
    pub pending_invalidations: u64,
    /// Redis reads refused for a missing or wrong signature (`signing_key`): misses.
    pub bad_signatures: u64,
    /// Redis reads refused for encryption (`encryption_keys`): an entry of a
    /// sensitive prefix not encrypted, or not opening (an unknown key name,
    /// changed bytes). Misses.
    pub bad_encryption: u64,
    /// Entries in the near tier (`near_cache`, `#[cached(near = true)]`).
    pub near_cache_size: u64,
    /// Hits the near tier served (counted in `hits` too).
    pub near_cache_hits: u64,
    /// Whether this instance hears the other instances' invalidations: the
    /// near tier serves only while it does.
    pub bus_listening: bool,
    /// Write-behind jobs queued in Redis and not yet acknowledged, by any instance.
    pub write_behind_queue_length: u64,
    /// How long the oldest of them has waited, in seconds (0 with none).
    pub write_behind_oldest_job_age_seconds: f64,
    /// Write-behind jobs this process's flusher applied and acknowledged.
    pub write_behind_applied: u64,
    /// Write-behind attempts that failed in this process and were retried.
    pub write_behind_retries: u64,
    /// Write-behind jobs this process moved to the dead-letter stream.
    pub write_behind_dead_letters: u64,
}

/// What [`Cache::health`](crate::Cache::health) reports.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Health {
    /// `healthy`; `degraded` when the store did not answer (calls are served from
    /// the local tier or the function); `unhealthy` when Redis refuses the cache's
    /// credentials or commands, which needs an operator.
    pub status: &'static str,
    /// Whether Redis answered a PING (false in local mode).
    pub connected: bool,
    /// Which store serves the cache.
    pub mode: Mode,
    /// The circuit breaker's state.
    pub breaker: BreakerState,
    /// How long the check took, in milliseconds.
    pub latency_ms: f64,
    /// Why the check failed, or what Redis refuses.
    pub error: Option<String>,
    /// `false` while start-up warmers run ([`Cache::new_with_warmers`](crate::Cache::new_with_warmers)):
    /// the cache serves, but colder than it will be.
    pub ready: bool,
}

impl Health {
    pub(crate) fn new(
        mode: Mode,
        breaker: BreakerState,
        took: Duration,
        error: Option<CacheError>,
        misconfigured: Option<String>,
    ) -> Health {
        let connected = mode == Mode::Redis && error.is_none();
        let (status, error) = match (misconfigured, error) {
            (Some(cause), _) => ("unhealthy", Some(cause)),
            (None, Some(e)) if e.is_misconfiguration() => ("unhealthy", Some(e.to_string())),
            (None, Some(e)) => ("degraded", Some(e.to_string())),
            (None, None) => ("healthy", None),
        };
        Health { status, connected, mode, breaker, latency_ms: took.as_secs_f64() * 1e3, error, ready: true }
    }
}
