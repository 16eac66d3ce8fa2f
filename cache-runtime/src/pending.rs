//! Invalidations that Redis has not seen yet.
//!
//! An invalidation issued while Redis is unreachable is applied to the local
//! tier and recorded here; the log is replayed into Redis before any read is
//! served from Redis again. A log (rather than bumping a key generation) keeps
//! every unaffected entry warm across a short outage. Past `MAX` entries it
//! collapses into one "everything under the prefix" entry: correct, if blunt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

const MAX: usize = 10_000;

/// One invalidation, with full Redis keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pending {
    Key(String),
    Tags(Vec<String>),
    Pattern(String),
    /// Everything under the prefix, tag index included.
    Everything,
}

pub(crate) struct PendingLog {
    dirty: AtomicBool,
    entries: Mutex<Vec<Pending>>,
    /// Serialises replays, so two callers never replay the same entries at once.
    pub(crate) replaying: tokio::sync::Mutex<()>,
}

impl PendingLog {
    pub(crate) fn new() -> Self {
        PendingLog {
            dirty: AtomicBool::new(false),
            entries: Mutex::new(Vec::new()),
            replaying: tokio::sync::Mutex::new(()),
        }
    }

    /// One atomic load: the hot path's whole cost when nothing is pending.
    #[inline]
    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    pub(crate) fn push(&self, entry: Pending) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX {
            entries.clear();
            entries.push(Pending::Everything);
        } else if !entries.contains(&entry) {
            entries.push(entry);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Takes everything pending; put back what could not be replayed with [`restore`](Self::restore).
    pub(crate) fn take(&self) -> Vec<Pending> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let taken = std::mem::take(&mut *entries);
        if taken.is_empty() {
            self.dirty.store(false, Ordering::Release);
        }
        taken
    }

    pub(crate) fn restore(&self, unreplayed: Vec<Pending>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let newer = std::mem::replace(&mut *entries, unreplayed);
        entries.extend(newer);
        self.dirty.store(!entries.is_empty(), Ordering::Release);
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
