//! The active flusher's lease: one flusher of a Redis and prefix delivers at
//! a time, and it stops before its lease can have expired.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::flusher::Shared;
use super::redis_of;

/// The lease while this flusher holds it: renewed by a task of its own, which
/// says when it can no longer prove it holds it.
pub(super) struct Lease {
    shared: Arc<Shared>,
    /// This lease's own token: taken, renewed, read under and released with.
    pub(super) token: Arc<str>,
    pub(super) lost: watch::Receiver<bool>,
    renewal: AbortHandle,
    released: bool,
}

impl Lease {
    pub(super) fn hold(shared: &Arc<Shared>, taken: Instant, token: Arc<str>) -> Lease {
        shared.hold_lease(&token, deadline(shared, taken));
        let (tell, lost) = watch::channel(false);
        let renewal = tokio::spawn(renew(shared.clone(), token.clone(), tell, taken)).abort_handle();
        Lease { shared: shared.clone(), token, lost, renewal, released: false }
    }

    pub(super) async fn release(&mut self) {
        self.renewal.abort();
        self.shared.let_go(&self.token);
        self.released = true;
        if let Ok(redis) = redis_of(&self.shared.cache) {
            let shared = &self.shared;
            if let Err(e) = redis.release_flusher_lease(&shared.scripts, &shared.keys, &self.token).await {
                tracing::debug!(error = %e, "write-behind flusher: lease not released; it expires");
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
        self.shared.let_go(&self.token);
        self.shared.active.store(false, Ordering::Release);
        if self.released {
            return;
        }
        // Dropped with the flusher: let a standby take over now, not when the lease expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (shared, token) = (self.shared.clone(), self.token.clone());
            runtime.spawn(async move {
                if let Ok(redis) = redis_of(&shared.cache) {
                    let _ = redis.release_flusher_lease(&shared.scripts, &shared.keys, &token).await;
                }
            });
        }
    }
}

/// Until when a lease last set at `set` is this flusher's for sure: two
/// thirds of it, so that it stops before the lease could have expired even
/// with Redis's clock and this one's drifting apart.
fn deadline(shared: &Shared, set: Instant) -> Instant {
    set + shared.lease_ttl * 2 / 3
}

/// Renews the lease until it can't, then lets it go and says so: the
/// session, woken by `lost`, finds that it no longer holds it.
async fn renew(shared: Arc<Shared>, token: Arc<str>, lost: watch::Sender<bool>, taken: Instant) {
    let cause = keep(&shared, &token, taken).await;
    tracing::warn!(cause, "write-behind flusher: the lease is lost; standing by");
    shared.let_go(&token);
    lost.send_replace(true);
}

/// Renews every third of the lease; returns why it stopped. A renewal
/// refused means another flusher holds it; no renewal by the deadline (Redis
/// unreachable or slow, this process stalled) means this one can no longer be
/// sure it holds it, and must stop before it could have expired. Each renewal
/// that lands moves the deadline that handler calls check before they start
/// (`Shared::holds_lease`).
async fn keep(shared: &Shared, token: &str, taken: Instant) -> String {
    let ttl = shared.lease_ttl;
    // From before the SET that took it: the lease can't have been set any earlier.
    let mut renewed = taken;
    loop {
        tokio::time::sleep(ttl / 3).await;
        let until = tokio::time::Instant::from_std(deadline(shared, renewed));
        let mut failed = None;
        loop {
            let attempt = Instant::now();
            let renewal = async {
                let redis = redis_of(&shared.cache)?;
                redis.renew_flusher_lease(&shared.scripts, &shared.keys, token, ttl).await
            };
            match tokio::time::timeout_at(until, renewal).await {
                // Answered, but only once the deadline had passed: this
                // flusher may have stopped acting on the lease already.
                Ok(Ok(true)) if !shared.extend_lease(token, deadline(shared, attempt)) => {
                    return "renewed only past its deadline".into();
                }
                Ok(Ok(true)) => {
                    renewed = attempt;
                    break;
                }
                Ok(Ok(false)) => return "it expired and another flusher took it".into(),
                Ok(Err(e)) => {
                    failed = Some(e);
                    tokio::time::sleep(ttl / 12).await;
                }
                Err(_) => {
                    let error = failed.map_or_else(|| "no answer".to_owned(), |e| e.to_string());
                    return format!("not renewed by its deadline ({error})");
                }
            }
        }
    }
}

/// A token no other flusher's lease has.
pub(super) fn token(me: u64) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{me:x}:{}:{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
