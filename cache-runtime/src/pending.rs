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

/// One invalidation, with full Redis keys; the bus carries it as it is (`bus.rs`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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

    /// Takes everything pending for a replay. Whatever the replay has not
    /// marked applied when it ends (an error, or its future dropped mid-way)
    /// goes back to the log, ahead of anything queued since.
    pub(crate) fn replay(&self) -> Replay<'_> {
        Replay { log: self, batch: self.take(), applied: 0 }
    }

    /// Takes everything pending; put back what could not be replayed with [`restore`](Self::restore).
    fn take(&self) -> Vec<Pending> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let taken = std::mem::take(&mut *entries);
        if taken.is_empty() {
            self.dirty.store(false, Ordering::Release);
        }
        taken
    }

    fn restore(&self, unreplayed: Vec<Pending>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let newer = std::mem::replace(&mut *entries, unreplayed);
        entries.extend(newer);
        self.dirty.store(!entries.is_empty(), Ordering::Release);
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A replay under way: the entries taken from the log, of which the first
/// `applied` reached the shared store. Invalidations are idempotent, so an
/// entry whose command was cut off is put back and applied again.
pub(crate) struct Replay<'a> {
    log: &'a PendingLog,
    batch: Vec<Pending>,
    applied: usize,
}

impl Replay<'_> {
    /// How many entries were taken.
    pub(crate) fn len(&self) -> usize {
        self.batch.len()
    }

    /// The next entry to apply, if any.
    pub(crate) fn next(&self) -> Option<&Pending> {
        self.batch.get(self.applied)
    }

    /// The entry [`next`](Self::next) gave reached the shared store.
    pub(crate) fn applied(&mut self) {
        self.applied += 1;
    }

    /// Replaces the next entry (with one that covers it) before it is put back.
    pub(crate) fn replace_next(&mut self, entry: Pending) {
        if let Some(next) = self.batch.get_mut(self.applied) {
            *next = entry;
        }
    }
}

impl Drop for Replay<'_> {
    fn drop(&mut self) {
        if self.applied < self.batch.len() {
            let rest = self.batch.split_off(self.applied);
            self.log.restore(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Pending {
        Pending::Key(k.to_owned())
    }

    #[test]
    fn a_replay_cut_off_puts_back_what_it_did_not_apply_ahead_of_newer_entries() {
        let log = PendingLog::new();
        for k in ["a", "b", "c"] {
            log.push(key(k));
        }
        {
            let mut replay = log.replay();
            assert_eq!(replay.next(), Some(&key("a")));
            replay.applied();
            // Queued while the replay runs.
            log.push(key("d"));
            // Dropped here, as a caller's future is when it is cancelled mid-replay.
        }
        assert!(log.is_dirty());
        assert_eq!(log.take(), vec![key("b"), key("c"), key("d")]);
    }

    #[test]
    fn a_finished_replay_puts_nothing_back_and_the_log_comes_clean() {
        let log = PendingLog::new();
        log.push(key("a"));
        {
            let mut replay = log.replay();
            while replay.next().is_some() {
                replay.applied();
            }
        }
        assert!(log.is_dirty(), "clean only once a take finds nothing");
        assert_eq!(log.replay().len(), 0);
        assert!(!log.is_dirty());
    }

    #[test]
    fn a_refused_entry_goes_back_as_the_entry_that_covers_it() {
        let log = PendingLog::new();
        log.push(key("a"));
        log.push(key("b"));
        {
            let mut replay = log.replay();
            replay.replace_next(Pending::Everything);
        }
        assert_eq!(log.take(), vec![Pending::Everything, key("b")]);
    }
}
