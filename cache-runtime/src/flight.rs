//! In-process single flight: one caller per key runs the body, the rest wait.
//!
//! The leader holds a [`Leader`] guard. Publishing sends the outcome to every
//! follower; dropping the guard unpublished (the leader's future was cancelled
//! or its body panicked) wakes the followers with nothing, and they race to
//! become the next leader. No key is ever left locked.
//!
//! A value is handed only to callers that started before the leader began writing
//! it: their cache read may have missed just before the fill landed, and taking
//! the value is the same as reading right after that fill. A caller that started
//! later leads or waits for a newer flight, so a shared value never hides an
//! invalidation made after the fill; and a fill refused because an invalidation
//! ran during the body is shared with nobody.
//!
//! A flight that stored a value leaves only a marker behind, never the value: a
//! caller whose read missed but who arrives after the flight ended reads the
//! cache again instead of running the body a second time. Markers go after [`Flights::keep`], which
//! outlasts any cache read. The map is split in shards, so misses of different
//! keys rarely meet on one lock.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use xxhash_rust::xxh3::xxh3_64;

use crate::key::KeyHashing;

const SHARDS: usize = 64;

/// A result the leader could not store, handed to the callers that waited.
pub(crate) type Shared = Arc<dyn Any + Send + Sync>;

/// What a leader hands its followers.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// The encoded value, and when the leader began writing it: followers decode
    /// their own copy if they started before that.
    Value(Arc<[u8]>, Instant),
    /// A result that was not stored (an `Err`, a `None`, a failed encode), as a
    /// copy the followers clone theirs from, and when the fence was checked for
    /// it: like a value, it goes only to callers that started before that.
    Shared(Shared, Instant),
    /// A result that was not stored and can't be copied: the followers form a
    /// new flight, so the body still runs once at a time, never as a herd.
    Unshared,
    /// An invalidation ran while the value was computed: followers start over.
    Stale,
}

type Slot = watch::Receiver<Option<Outcome>>;

enum Flight {
    Running {
        id: u64,
        slot: Slot,
    },
    /// Stored a value.
    Ended {
        id: u64,
    },
}

#[derive(Default)]
struct Shard {
    map: HashMap<Arc<str>, Flight, KeyHashing>,
    /// Ended flights, oldest first, so markers are dropped without a scan.
    ended: VecDeque<(Instant, Arc<str>, u64)>,
}

/// Single flights of one cache.
pub(crate) struct Flights {
    shards: Box<[Mutex<Shard>]>,
    ids: AtomicU64,
    keep: Duration,
}

pub(crate) enum Role<'a> {
    Leader(Leader<'a>),
    Follower(Slot),
    /// A flight stored its value since this caller's read: read the cache again
    /// before leading, since the caller's miss may predate that write.
    Reread,
}

pub(crate) struct Leader<'a> {
    owner: &'a Flights,
    key: Arc<str>,
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
}

impl Flights {
    /// `keep`: how long the marker of an ended flight lasts; longer than a cache
    /// read can take, so a caller still reading when the flight ended finds it.
    pub(crate) fn new(keep: Duration) -> Self {
        Flights { shards: (0..SHARDS).map(|_| Mutex::default()).collect(), ids: AtomicU64::new(0), keep }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Shard> {
        let i = (xxh3_64(key.as_bytes()) % SHARDS as u64) as usize;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the flight for `key`; `reread` says the caller already read the
    /// cache again after an ended flight.
    pub(crate) fn join(&self, key: &str, reread: bool) -> Role<'_> {
        let mut shard = self.shard(key);
        let now = Instant::now();
        shard.expire(now, self.keep);
        match shard.map.get(key) {
            Some(Flight::Running { slot, .. }) => return Role::Follower(slot.clone()),
            // Its fill has landed: a read now sees it (or what replaced it). The
            // caller's own read may have been answered before the fill landed,
            // even if sent after it began, over another connection.
            Some(Flight::Ended { .. }) if !reread => return Role::Reread,
            Some(Flight::Ended { .. }) | None => {}
        }
        let (tx, slot) = watch::channel(None);
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let key: Arc<str> = Arc::from(key);
        shard.map.insert(key.clone(), Flight::Running { id, slot });
        Role::Leader(Leader { owner: self, key, id, tx })
    }

    /// Whether a flight for `key` is running.
    pub(crate) fn running(&self, key: &str) -> bool {
        matches!(self.shard(key).map.get(key), Some(Flight::Running { .. }))
    }

    /// Flights running or remembered, for tests.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap().map.len()).sum()
    }
}

impl Shard {
    fn expire(&mut self, now: Instant, keep: Duration) {
        while let Some((at, _, _)) = self.ended.front() {
            if now.duration_since(*at) < keep {
                break;
            }
            let (_, key, id) = self.ended.pop_front().expect("front exists");
            if matches!(self.map.get(&key), Some(Flight::Ended { id: ended, .. }) if *ended == id) {
                self.map.remove(&key);
            }
        }
    }

    fn running(&self, key: &str, id: u64) -> bool {
        matches!(self.map.get(key), Some(Flight::Running { id: running, .. }) if *running == id)
    }
}

impl Leader<'_> {
    /// Whether anyone waits for this flight (the map holds one receiver).
    pub(crate) fn has_followers(&self) -> bool {
        self.tx.receiver_count() > 1
    }

    pub(crate) fn publish(self, outcome: Outcome) {
        let mut shard = self.owner.shard(&self.key);
        if shard.running(&self.key, self.id) {
            match &outcome {
                Outcome::Value(..) => {
                    shard.map.insert(self.key.clone(), Flight::Ended { id: self.id });
                    shard.ended.push_back((Instant::now(), self.key.clone(), self.id));
                }
                Outcome::Shared(..) | Outcome::Unshared | Outcome::Stale => {
                    shard.map.remove(&self.key);
                }
            }
        }
        drop(shard);
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut shard = self.owner.shard(&self.key);
        if shard.running(&self.key, self.id) {
            shard.map.remove(&self.key);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_flights_keep_a_marker_not_the_value_and_only_for_a_while() {
        let flights = Flights::new(Duration::from_millis(20));
        for i in 0..1_000 {
            let Role::Leader(leader) = flights.join(&format!("k{i}"), false) else {
                panic!("the first caller leads");
            };
            leader.publish(Outcome::Value(vec![0; 1024].into(), Instant::now()));
        }
        assert_eq!(flights.len(), 1_000);
        // A caller that missed re-reads instead of leading.
        assert!(matches!(flights.join("k7", false), Role::Reread));
        std::thread::sleep(Duration::from_millis(30));
        // Any join expires its shard's old markers; one per shard empties the map.
        for i in 0..1_000 {
            if let Role::Leader(leader) = flights.join(&format!("k{i}"), true) {
                leader.publish(Outcome::Stale);
            }
        }
        assert_eq!(flights.len(), 0);
    }

    #[test]
    fn failures_and_abandoned_flights_leave_nothing() {
        let flights = Flights::new(Duration::from_secs(5));
        let Role::Leader(leader) = flights.join("k", false) else { panic!() };
        leader.publish(Outcome::Unshared);
        let Role::Leader(leader) = flights.join("k", false) else { panic!() };
        drop(leader);
        assert_eq!(flights.len(), 0);
    }

    #[test]
    fn later_callers_follow_a_running_flight() {
        let flights = Flights::new(Duration::from_secs(5));
        let Role::Leader(leader) = flights.join("k", false) else { panic!() };
        let Role::Follower(slot) = flights.join("k", false) else { panic!() };
        leader.publish(Outcome::Unshared);
        assert!(matches!(slot.borrow().as_ref(), Some(Outcome::Unshared)));
    }
}
