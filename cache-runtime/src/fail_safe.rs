//! Fail-safe: serving a function's last value when its body fails.
//!
//! A fail-safe function's entries are stamped (`codec.rs`) with their logical
//! expiry and live `fail_safe_max` past it. A read that finds one past its
//! logical expiry treats it as a miss but keeps it: if the body then fails
//! (an `Err`, a panic, running past `hard_timeout`), the kept value is served
//! instead, counted, and written back to expire again after
//! `fail_safe_throttle`, so the body is not retried by every call meanwhile.
//! It is served only if nothing covering the key was invalidated since the
//! read that found it (checked against that read's fence when the body
//! fails), and written back under the same fence, only over the bytes that
//! read found, so never over a newer fill; an invalidation deletes the entry
//! besides. So nothing invalidated is ever served, however stale.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;

use crate::codec::{self, now_ms};
use crate::store::FillFence;

/// Whether `bytes` are a stamped entry past its logical expiry.
#[inline]
pub(crate) fn expired(bytes: &[u8]) -> bool {
    codec::logical_expiry(bytes).is_some_and(|at| at <= now_ms())
}

/// Whether a stamped entry is still within its last-resort deadline.
pub(crate) fn servable(bytes: &[u8]) -> bool {
    codec::stamped(bytes).is_some_and(|stamp| stamp.stale_until_ms > now_ms())
}

/// A last value kept to serve if the body fails: decoded up front, so that
/// the body is guarded only when there is something to serve.
pub(crate) struct Stale<V> {
    pub(crate) value: V,
    pub(crate) bytes: Vec<u8>,
    /// The fence taken before the read that found it: it is served, and
    /// written back, only if nothing covering the key was invalidated since.
    pub(crate) fence: FillFence,
}

/// `body`, its panic caught as an `Err` (and raised again where no last value may be served).
pub(crate) fn caught<F: Future>(body: F) -> impl Future<Output = Result<F::Output, Box<dyn Any + Send>>> {
    AssertUnwindSafe(body).catch_unwind()
}

/// For the log: a panic's message, when it has one.
pub(crate) fn describe(panic: &(dyn Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message");
    format!("a panic: {message}")
}

/// A fresh value's bytes as a fail-safe or early-refreshed function stores
/// them, and their TTL in the store: `ttl` logically, `max` more in all (0
/// for a function that is not fail-safe). `took`, how long its body ran, is
/// recorded for early refresh only: without it the stamp keeps the layout
/// earlier fail-safe builds read, so a rolling upgrade keeps their entries.
pub(crate) fn stamp(
    encoded: &[u8],
    ttl: Duration,
    max: Duration,
    took: Option<Duration>,
) -> (Vec<u8>, Duration) {
    let now = now_ms();
    let expires_ms = now.saturating_add(ttl.as_millis().try_into().unwrap_or(u64::MAX));
    let stale_until_ms = expires_ms.saturating_add(max.as_millis().try_into().unwrap_or(u64::MAX));
    let took_ms = took.map_or(0, |took| u32::try_from(took.as_millis()).unwrap_or(u32::MAX).max(1));
    (codec::stamp(codec::Stamp { expires_ms, stale_until_ms, took_ms }, encoded), ttl.saturating_add(max))
}

/// A served last value written back to expire after `throttle`, for no
/// longer than its last-resort deadline; `None` once that has passed.
pub(crate) fn throttled(bytes: &[u8], throttle: Duration) -> Option<(Vec<u8>, Duration)> {
    let stamp = codec::stamped(bytes)?;
    let now = now_ms();
    let left = Duration::from_millis(stamp.stale_until_ms.checked_sub(now).filter(|&ms| ms > 0)?);
    let expires_ms = now + throttle.min(left).as_millis() as u64;
    Some((codec::stamp(codec::Stamp { expires_ms, ..stamp }, codec::unstamped(bytes)), left))
}
