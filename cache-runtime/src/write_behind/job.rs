//! What a flusher hands its handler, and the handler behind one type.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use serde::de::DeserializeOwned;

use super::stream::Entry;
use crate::store::BoxFuture;

/// One job, as the handler gets it.
#[derive(Debug)]
pub struct Job<J> {
    job: J,
    key: String,
    id: String,
    attempt: u32,
    redelivered: bool,
}

impl<J> Job<J> {
    /// The job, decoded.
    pub fn job(&self) -> &J {
        &self.job
    }

    /// The job, owned.
    pub fn into_job(self) -> J {
        self.job
    }

    /// The cache key it was queued with.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// A key unique to this job and the same at every delivery of it (made
    /// by `write_behind` before it queued the job, and what
    /// [`Queued::id`](crate::Queued::id) returned): apply the job under it (a
    /// unique key, a conditional write) and a job delivered twice, or queued
    /// twice by a client that sent its append again, takes effect once.
    pub fn idempotency_key(&self) -> &str {
        &self.id
    }

    /// This delivery's attempt, from 1; a job delivered again after a
    /// flusher died counts from 1 again.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the job was read back from the jobs in flight of an earlier
    /// active flusher (one that died or lost its lease): it may have been applied already.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }
}

/// What one attempt came to.
pub(super) enum Outcome {
    Applied,
    Failed(String),
    /// Not a job this handler reads: retrying can't help.
    Unreadable(String),
}

pub(super) type Apply = Arc<dyn Fn(&Entry, u32) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// `handler` behind one type, whatever its job's: decoding included.
pub(super) fn erase<J, F, Fut, E>(handler: F) -> Apply
where
    J: DeserializeOwned + Send + 'static,
    F: Fn(Job<J>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let apply: Apply = Arc::new(move |entry: &Entry, attempt: u32| -> BoxFuture<'static, Outcome> {
        let Some((key, bytes)) = &entry.job else {
            return Box::pin(std::future::ready(Outcome::Unreadable("the entry holds no job".into())));
        };
        let job = match serde_json::from_slice::<J>(bytes) {
            Ok(job) => job,
            Err(e) => {
                return Box::pin(std::future::ready(Outcome::Unreadable(format!("undecodable job: {e}"))))
            }
        };
        let id = entry.token.clone().unwrap_or_else(|| entry.id.clone());
        let job = Job { job, key: key.clone(), id, attempt, redelivered: entry.redelivered };
        // A handler that panics, building its future or running it, fails this attempt only.
        let Ok(fut) = std::panic::catch_unwind(AssertUnwindSafe(|| handler(job))) else {
            return Box::pin(std::future::ready(Outcome::Failed("the handler panicked".into())));
        };
        Box::pin(AssertUnwindSafe(fut).catch_unwind().map(|done| match done {
            Ok(Ok(())) => Outcome::Applied,
            Ok(Err(e)) => Outcome::Failed(e.to_string()),
            Err(_) => Outcome::Failed("the handler panicked".into()),
        }))
    });
    apply
}
