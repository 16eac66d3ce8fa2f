//! In-process single flight: one caller per key runs the body, the rest wait.
//!
//! The leader holds a [`Leader`] guard. Publishing sends the outcome to every
//! follower and leaves it in the map as a finished flight; dropping the guard
//! unpublished (the leader's future was cancelled or its body panicked) wakes the
//! followers with nothing and removes the entry, and they race to become the next
//! leader. No key is ever left locked.
//!
//! A value is handed only to callers that started before the leader began writing
//! it: their cache read may have missed just before the fill landed, and taking
//! the value is the same as reading right after that fill. A caller that started
//! later leads or waits for a newer flight, so a shared value never hides an
//! invalidation made after the fill; and a fill refused because an invalidation
//! ran during the body is shared with nobody.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long a finished flight is kept for callers that started before it ended;
/// far longer than any cache read takes (the operation timeout bounds those).
const KEEP_FINISHED: Duration = Duration::from_secs(5);

/// What a leader hands its followers.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// The encoded value, and when the leader began writing it: followers decode
    /// their own copy if they started before that.
    Value(Arc<[u8]>, Instant),
    /// The result was not cacheable (an `Err`, a `None` or a failed encode): each
    /// follower runs the body itself.
    Uncacheable,
    /// An invalidation ran while the value was computed: followers start over.
    Stale,
}

type Slot = watch::Receiver<Option<Outcome>>;

enum Flight {
    Running { id: u64, slot: Slot },
    Finished { outcome: Outcome, at: Instant },
}

#[derive(Default)]
pub(crate) struct SingleFlight {
    flights: Mutex<Flights>,
    ids: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Flights {
    map: HashMap<String, Flight>,
    sweep_at: usize,
}

pub(crate) enum Role<'a> {
    Leader(Leader<'a>),
    Follower(Slot),
    Finished(Outcome),
    /// A flight wrote its value after this caller started: read the cache again
    /// before leading, since the caller's miss may predate that write.
    Reread,
}

pub(crate) struct Leader<'a> {
    owner: &'a SingleFlight,
    key: String,
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
}

impl SingleFlight {
    /// Joins the flight for `key` of a caller that started at `started`;
    /// `reread` says it already read the cache again after a finished flight.
    pub(crate) fn join(&self, key: &str, started: Instant, reread: bool) -> Role<'_> {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        match flights.map.get(key) {
            Some(Flight::Running { slot, .. }) => return Role::Follower(slot.clone()),
            Some(Flight::Finished { outcome, at }) if started < *at => {
                return Role::Finished(outcome.clone())
            }
            Some(Flight::Finished { .. }) if !reread => return Role::Reread,
            // Finished before this caller started and re-read: it leads a new flight.
            Some(Flight::Finished { .. }) | None => {}
        }
        flights.sweep();
        let (tx, slot) = watch::channel(None);
        let id = self.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        flights.map.insert(key.to_owned(), Flight::Running { id, slot });
        Role::Leader(Leader { owner: self, key: key.to_owned(), id, tx })
    }
}

impl Flights {
    /// Drops old finished flights, amortised: only when the map has doubled.
    fn sweep(&mut self) {
        if self.map.len() < self.sweep_at.max(256) {
            return;
        }
        let now = Instant::now();
        self.map.retain(|_, f| match f {
            Flight::Running { .. } => true,
            Flight::Finished { at, .. } => now.duration_since(*at) < KEEP_FINISHED,
        });
        self.sweep_at = self.map.len() * 2;
    }
}

impl Leader<'_> {
    pub(crate) fn publish(self, outcome: Outcome) {
        let mut flights = self.owner.flights.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(flights.map.get(&self.key), Some(Flight::Running { id, .. }) if *id == self.id) {
            match &outcome {
                // Kept with the same instant the followers compare against, so a
                // caller turned away by one is turned away by the other.
                Outcome::Value(_, at) => {
                    let finished = Flight::Finished { outcome: outcome.clone(), at: *at };
                    flights.map.insert(self.key.clone(), finished);
                }
                Outcome::Uncacheable | Outcome::Stale => {
                    flights.map.remove(&self.key);
                }
            }
        }
        drop(flights);
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut flights = self.owner.flights.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(flights.map.get(&self.key), Some(Flight::Running { id, .. }) if *id == self.id) {
            flights.map.remove(&self.key);
        }
    }
}

/// Waits for the leader; `None` when it went away without publishing.
pub(crate) async fn follow(mut slot: Slot) -> Option<Outcome> {
    loop {
        if let Some(outcome) = slot.borrow_and_update().clone() {
            return Some(outcome);
        }
        if slot.changed().await.is_err() {
            return slot.borrow().clone();
        }
    }
}
