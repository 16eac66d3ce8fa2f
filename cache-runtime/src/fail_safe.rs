//! Fail-safe: serving a function's last value when its body fails.
//!
//! A fail-safe function's entries are stamped (`codec.rs`) with their logical
//! expiry and live `fail_safe_max` past it. A read that finds one past its
//! logical expiry treats it as a miss but keeps it: if the body then fails
//! (an `Err`, a panic, running past `hard_timeout`), the kept value is served
//! instead, counted, and written back to expire again after
//! `fail_safe_throttle`, so the body is not retried by every call meanwhile.
//! That write is a fill like any other, checked against the fence taken
//! before the read: an invalidation since wins. And an invalidation deletes
//! the entry, so nothing invalidated is ever served, however stale.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;

use crate::codec::{self, now_ms};

/// Whether `bytes` are a stamped entry past its logical expiry.
#[inline]
pub(crate) fn expired(bytes: &[u8]) -> bool {
    codec::logical_expiry(bytes).is_some_and(|at| at <= now_ms())
}

/// A last value kept to serve if the body fails: decoded up front, so that
/// the body is guarded only when there is something to serve.
pub(crate) struct Stale<V> {
    pub(crate) value: V,
    pub(crate) bytes: Vec<u8>,
}

/// Why a guarded body gave no result.
pub(crate) enum Failure {
    Panicked(Box<dyn Any + Send>),
    TimedOut,
}

impl Failure {
    /// For the log: the panic's message, when it has one.
    pub(crate) fn describe(&self) -> String {
        match self {
            Failure::Panicked(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("a panic");
                format!("a panic: {message}")
            }
            Failure::TimedOut => "the hard timeout".to_owned(),
        }
    }
}

/// Runs `body`, catching a panic and cutting it off after `hard_timeout`.
pub(crate) async fn guarded<F: Future>(
    body: F,
    hard_timeout: Option<Duration>,
) -> Result<F::Output, Failure> {
    let caught = AssertUnwindSafe(body).catch_unwind();
    let done = match hard_timeout {
        Some(limit) => tokio::time::timeout(limit, caught).await.map_err(|_| Failure::TimedOut)?,
        None => caught.await,
    };
    done.map_err(Failure::Panicked)
}

/// A fresh value's bytes as a fail-safe function stores them, and their TTL
/// in the store: `ttl` logically, `max` more in all.
pub(crate) fn stamp(encoded: &[u8], ttl: Duration, max: Duration) -> (Vec<u8>, Duration) {
    let now = now_ms();
    let expires = now + ttl.as_millis() as u64;
    let stale_until = expires + max.as_millis() as u64;
    (codec::stamp(expires, stale_until, encoded), ttl + max)
}

/// A served last value written back to expire after `throttle`, for no
/// longer than its last-resort deadline; `None` once that has passed.
pub(crate) fn throttled(bytes: &[u8], throttle: Duration) -> Option<(Vec<u8>, Duration)> {
    let (_, stale_until) = codec::stamped(bytes)?;
    let now = now_ms();
    let left = Duration::from_millis(stale_until.checked_sub(now).filter(|&ms| ms > 0)?);
    let expires = now + throttle.min(left).as_millis() as u64;
    Some((codec::stamp(expires, stale_until, codec::unstamped(bytes)), left))
}
