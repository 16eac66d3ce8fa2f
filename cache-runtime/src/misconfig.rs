//! Credentials and permissions that stop working while the cache runs.
//!
//! A rotated password or a changed ACL fails every call the same way. Each call
//! still falls back to the function, but logging each would bury the cause, so
//! a cause is logged once at error level, counted every time, and held for
//! `health` until a check of the cache's access to Redis passes again.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::IntCounter;

use crate::CacheError;

pub(crate) struct Misconfig {
    state: Mutex<State>,
    counter: IntCounter,
}

#[derive(Default)]
struct State {
    current: Option<String>,
    logged: HashSet<String>,
}

impl Misconfig {
    pub(crate) fn new(counter: IntCounter) -> Self {
        Misconfig { state: Mutex::new(State::default()), counter }
    }

    /// Records `error` if it is a misconfiguration; logs each distinct cause once.
    pub(crate) fn report(&self, error: &CacheError) {
        if !error.is_misconfiguration() {
            return;
        }
        self.counter.inc();
        let cause = error.to_string();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.logged.insert(cause.clone()) {
            tracing::error!(error = %cause, "redis refuses the cache's credentials or commands: calls run their function uncached until this is fixed");
        }
        state.current = Some(cause);
    }

    /// The cause `health` reports, if one is outstanding.
    pub(crate) fn current(&self) -> Option<String> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).current.clone()
    }

    /// A check passed: the cause is gone, and a recurrence is logged again.
    pub(crate) fn resolve(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cause) = state.current.take() {
            tracing::info!(was = %cause, "redis accepts the cache's credentials and commands again");
        }
        state.logged.clear();
    }
}
