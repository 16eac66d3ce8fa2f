//! The circuit breaker in front of Redis.
//!
//! Closed: calls go through; `threshold` consecutive failures open it. Open: calls
//! skip Redis until `timeout` has passed. Half-open: exactly one probe goes
//! through while every other call keeps skipping; its success closes the
//! breaker, its failure (a hung probe fails at the operation timeout) reopens it
//! for the full timeout, and a probe that is dropped unreported frees the slot
//! for the next caller. Time is tokio's, so tests drive it with paused time.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go to Redis.
    Closed,
    /// Calls skip Redis until the timeout passes.
    Open,
    /// One probe is allowed through to test Redis.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// 0 closed, 1 open, 2 half-open: the gauge value.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

pub(crate) struct Breaker {
    enabled: bool,
    threshold: u32,
    timeout: Duration,
    state: AtomicU8,
    failures: AtomicU32,
    /// Nanoseconds after `origin` when an open breaker may probe.
    reopen_at: AtomicU64,
    origin: Instant,
    opened_total: AtomicU64,
    transition: Mutex<()>,
}

/// Leave to call Redis. A probe left unreported when dropped frees the probe slot.
#[must_use]
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

impl Breaker {
    pub(crate) fn new(enabled: bool, threshold: u32, timeout: Duration) -> Self {
        Breaker {
            enabled,
            threshold: threshold.max(1),
            timeout,
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            reopen_at: AtomicU64::new(0),
            origin: Instant::now(),
            opened_total: AtomicU64::new(0),
            transition: Mutex::new(()),
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    /// Opens the breaker now, as at a start with Redis unreachable.
    pub(crate) fn trip(&self) {
        if self.enabled {
            self.open(CLOSED);
        }
    }

    pub(crate) fn opened_total(&self) -> u64 {
        self.opened_total.load(Ordering::Relaxed)
    }

    /// `None` while calls must skip Redis.
    pub(crate) fn permit(&self) -> Option<Permit<'_>> {
        if !self.enabled {
            return Some(Permit { breaker: self, probe: false, reported: false });
        }
        match self.state.load(Ordering::Acquire) {
            CLOSED => Some(Permit { breaker: self, probe: false, reported: false }),
            OPEN if self.now() >= self.reopen_at.load(Ordering::Acquire) => {
                // Only the caller that wins this exchange probes.
                self.state.compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire).ok().map(
                    |_| {
                        tracing::info!("circuit breaker half-open: probing Redis");
                        Permit { breaker: self, probe: true, reported: false }
                    },
                )
            }
            _ => None,
        }
    }

    fn now(&self) -> u64 {
        Instant::now().saturating_duration_since(self.origin).as_nanos() as u64
    }

    fn succeeded(&self, probe: bool) {
        // Read first: a store on every success would bounce this line between cores.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Release);
        }
        if probe
            && self.state.compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            tracing::info!("circuit breaker closed: Redis answers again");
        }
    }

    fn failed(&self, probe: bool) {
        if probe {
            self.open(HALF_OPEN);
            return;
        }
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= self.threshold {
            self.open(CLOSED);
        }
    }

    fn open(&self, from: u8) {
        // Serialised so a late failure can't push an open breaker's deadline out;
        // the deadline is stored before the state, so whoever sees OPEN sees it.
        let _transition = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        if self.state.load(Ordering::Acquire) != from {
            return;
        }
        self.reopen_at.store(self.now() + self.timeout.as_nanos() as u64, Ordering::Release);
        self.state.store(OPEN, Ordering::Release);
        self.opened_total.fetch_add(1, Ordering::Relaxed);
        self.failures.store(0, Ordering::Release);
        tracing::warn!(timeout = ?self.timeout, "circuit breaker open: serving from the local tier");
    }
}

impl Permit<'_> {
    pub(crate) fn is_probe(&self) -> bool {
        self.probe
    }

    /// Reports how the call went. `healthy` is false only for failures that say
    /// Redis itself is unreachable (I/O, timeouts), not for errors it answered with.
    pub(crate) fn report(mut self, healthy: bool) {
        self.reported = true;
        if healthy {
            self.breaker.succeeded(self.probe);
        } else {
            self.breaker.failed(self.probe);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            let _ = self.breaker.state.compare_exchange(HALF_OPEN, OPEN, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(true, 5, Duration::from_secs(60))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_exactly_the_threshold() {
        let b = breaker();
        for i in 0..4 {
            b.permit().unwrap().report(false);
            assert_eq!(b.state(), BreakerState::Closed, "after {} failures", i + 1);
        }
        b.permit().unwrap().report(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.permit().is_none());
        assert_eq!(b.opened_total(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let b = breaker();
        for _ in 0..4 {
            b.permit().unwrap().report(false);
        }
        b.permit().unwrap().report(true);
        for _ in 0..4 {
            b.permit().unwrap().report(false);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_exactly_one_probe_through() {
        let b = breaker();
        for _ in 0..5 {
            b.permit().unwrap().report(false);
        }
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(b.permit().is_none());
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = b.permit().expect("the probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.permit().is_none(), "a second probe went through");
        probe.report(true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.permit().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_the_full_timeout() {
        let b = breaker();
        for _ in 0..5 {
            b.permit().unwrap().report(false);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        b.permit().unwrap().report(false);
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(b.permit().is_none());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.permit().is_some());
        assert_eq!(b.opened_total(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_frees_the_slot() {
        let b = breaker();
        for _ in 0..5 {
            b.permit().unwrap().report(false);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        drop(b.permit().unwrap());
        assert_eq!(b.state(), BreakerState::Open);
        let probe = b.permit().expect("the slot was freed");
        probe.report(true);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_never_opens() {
        let b = Breaker::new(false, 1, Duration::from_secs(1));
        for _ in 0..10 {
            b.permit().unwrap().report(false);
        }
        assert!(b.permit().is_some());
    }
}
