//! One worker per key with jobs in memory: its jobs in order, one at a
//! time, each tried until applied or dead-lettered and then settled in Redis.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::task::JoinSet;

use super::flusher::{Shared, MAX_BACKOFF, MIN_BACKOFF};
use super::job::Outcome;
use super::redis_of;
use super::stream::Entry;
use crate::bus::jittered;

/// Hands `entry` to its key's worker, starting one if the key has none. A
/// job read again from the pending list that is held here already is skipped.
pub(super) fn dispatch(shared: &Arc<Shared>, workers: &mut JoinSet<()>, entry: Entry) {
    let key = entry.job.as_ref().map(|(key, _)| key.clone()).unwrap_or_default();
    let mut queues = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
    if entry.redelivered && queues.get(&key).is_some_and(|queue| queue.iter().any(|held| held.id == entry.id))
    {
        return;
    }
    shared.held.fetch_add(1, Ordering::AcqRel);
    if let Some(queue) = queues.get_mut(&key) {
        queue.push_back(entry);
        return;
    }
    queues.insert(key.clone(), VecDeque::from([entry]));
    drop(queues);
    workers.spawn(work(shared.clone(), key));
}

/// Runs one key's jobs in order, one at a time, until none is left.
async fn work(shared: Arc<Shared>, key: String) {
    loop {
        let entry = {
            let queues = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            match queues.get(&key).and_then(VecDeque::front) {
                Some(entry) => entry.clone(),
                None => return,
            }
        };
        let settled = deliver(&shared, &entry).await;
        let mut queues = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
        let Some(queue) = queues.get_mut(&key) else { return };
        let done = if settled { queue.pop_front().map_or(0, |_| 1) } else { queue.len() };
        // Stopping: this key's other jobs stay pending in Redis, in order, for the next active flusher.
        if !settled || queue.is_empty() {
            queues.remove(&key);
        }
        let more = queues.contains_key(&key);
        drop(queues);
        shared.held.fetch_sub(done, Ordering::AcqRel);
        shared.room.notify_one();
        if !more {
            return;
        }
    }
}

/// Tries `entry` until it is applied or dead-lettered, and settles it in
/// Redis; `false` if a shutdown or the lease's deadline came first.
async fn deliver(shared: &Shared, entry: &Entry) -> bool {
    let mut stop = shared.stop.subscribe();
    let metrics = &shared.cache.inner.metrics.write_behind;
    let mut attempt = 0;
    loop {
        attempt += 1;
        if shared.stopping() {
            return false;
        }
        let Ok(permit) = shared.permits.acquire().await else { return false };
        // Past the lease's deadline another flusher may take over: this job
        // and its key's later ones stay pending for it (or for this one's next session).
        if shared.stopping() || !shared.holds_lease() {
            return false;
        }
        let outcome = (shared.apply)(entry, attempt).await;
        drop(permit);
        let error = match outcome {
            Outcome::Applied => {
                settle(shared, entry, None).await;
                metrics.applied.inc();
                return true;
            }
            Outcome::Unreadable(error) => {
                tracing::warn!(id = %entry.id, "write-behind: a job the handler can't read; dead-lettered");
                error
            }
            Outcome::Failed(error) if attempt >= shared.max_attempts => {
                tracing::warn!(id = %entry.id, attempts = attempt, "write-behind: a job failed every attempt; dead-lettered");
                error
            }
            Outcome::Failed(_) => {
                metrics.retries.inc();
                // Not the handler's error text: it may carry the job's values.
                tracing::debug!(id = %entry.id, attempt, "write-behind: a job failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(shared.backoff(attempt)) => {}
                    _ = stop.changed() => return false,
                }
                continue;
            }
        };
        settle(shared, entry, Some((&error, attempt))).await;
        metrics.dead_letters.inc();
        return true;
    }
}

/// Acknowledges `entry`, or dead-letters it with `error` after so many
/// attempts, retrying while Redis can't take it. A shutdown gives up after
/// one failure: the job is then delivered again by the next active flusher.
async fn settle(shared: &Shared, entry: &Entry, dead: Option<(&str, u32)>) {
    let mut wait = MIN_BACKOFF;
    loop {
        let Ok(redis) = redis_of(&shared.cache) else { return };
        let done = match dead {
            None => redis.ack(&shared.scripts, &shared.keys, &entry.id).await,
            Some((error, attempts)) => {
                redis.dead_letter(&shared.scripts, &shared.keys, entry, error, attempts).await
            }
        };
        match done {
            Ok(()) => {
                if shared.acks_failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("write-behind: acknowledgements reach Redis again");
                }
                return;
            }
            Err(e) => {
                if !shared.acks_failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(error = %e, "write-behind: acknowledgements fail; retrying until Redis takes them");
                }
                if shared.stopping() {
                    return;
                }
                tokio::time::sleep(jittered(wait)).await;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
        }
    }
}
