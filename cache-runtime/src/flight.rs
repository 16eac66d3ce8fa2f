//! In-process single flight: one caller per key runs the body, the rest wait.
//!
//! The leader holds a [`Leader`] guard. Publishing sends the outcome to every
//! follower; dropping the guard unpublished (the leader's future was cancelled or
//! its body panicked) wakes the followers with nothing, and they race to become
//! the next leader. Either way the map entry goes with the guard, so no key is
//! ever left locked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// What a leader hands its followers.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// The encoded value: followers decode their own copy.
    Value(Arc<[u8]>),
    /// The result was not cacheable (an `Err`, a `None`, a refused condition or a
    /// failed encode): each follower runs the body itself.
    Uncacheable,
}

type Slot = watch::Receiver<Option<Outcome>>;

#[derive(Default)]
pub(crate) struct SingleFlight {
    flights: Mutex<HashMap<String, (u64, Slot)>>,
    ids: std::sync::atomic::AtomicU64,
}

pub(crate) enum Role<'a> {
    Leader(Leader<'a>),
    Follower(Slot),
}

pub(crate) struct Leader<'a> {
    owner: &'a SingleFlight,
    key: String,
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
}

impl SingleFlight {
    pub(crate) fn join(&self, key: &str) -> Role<'_> {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, rx)) = flights.get(key) {
            return Role::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        let id = self.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        flights.insert(key.to_owned(), (id, rx));
        Role::Leader(Leader { owner: self, key: key.to_owned(), id, tx })
    }
}

impl Leader<'_> {
    pub(crate) fn publish(self, outcome: Outcome) {
        // Followers joining after this see the entry gone and read the cache.
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut flights = self.owner.flights.lock().unwrap_or_else(|e| e.into_inner());
        if flights.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            flights.remove(&self.key);
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
