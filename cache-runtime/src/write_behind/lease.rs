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
    pub(super) lost: watch::Receiver<bool>,
    renewal: AbortHandle,
    released: bool,
}

impl Lease {
    pub(super) fn hold(shared: &Arc<Shared>, taken: Instant) -> Lease {
        let (tell, lost) = watch::channel(false);
        let renewal = tokio::spawn(renew(shared.clone(), tell, taken)).abort_handle();
        Lease { shared: shared.clone(), lost, renewal, released: false }
    }

    pub(super) async fn release(&mut self) {
        self.renewal.abort();
        self.released = true;
        if let Ok(redis) = redis_of(&self.shared.cache) {
            let shared = &self.shared;
            if let Err(e) = redis.release_flusher_lease(&shared.scripts, &shared.keys, &shared.token).await {
                tracing::debug!(error = %e, "write-behind flusher: lease not released; it expires");
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
        self.shared.active.store(false, Ordering::Release);
        if self.released {
            return;
        }
        // Dropped with the flusher: let a standby take over now, not when the lease expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            runtime.spawn(async move {
                if let Ok(redis) = redis_of(&shared.cache) {
                    let _ = redis.release_flusher_lease(&shared.scripts, &shared.keys, &shared.token).await;
                }
            });
        }
    }
}

/// Renews every third of the lease. A renewal refused means another flusher
/// holds it; renewals that fail for two thirds of the lease mean this one can
/// no longer be sure it holds it, and must stop before it could have expired.
async fn renew(shared: Arc<Shared>, lost: watch::Sender<bool>, taken: Instant) {
    let ttl = shared.lease_ttl;
    // From before the SET that took it: the lease can't have been set any earlier.
    let mut renewed = taken;
    loop {
        tokio::time::sleep(ttl / 3).await;
        loop {
            let attempt = Instant::now();
            let result = match redis_of(&shared.cache) {
                Ok(redis) => {
                    redis.renew_flusher_lease(&shared.scripts, &shared.keys, &shared.token, ttl).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(true) => {
                    renewed = attempt;
                    break;
                }
                Ok(false) => {
                    tracing::warn!(
                        "write-behind flusher: the lease expired and another flusher took it; standing by"
                    );
                    lost.send_replace(true);
                    return;
                }
                Err(e) if renewed.elapsed() >= ttl * 2 / 3 => {
                    tracing::warn!(error = %e, "write-behind flusher: the lease could not be renewed in time; standing by");
                    lost.send_replace(true);
                    return;
                }
                Err(_) => tokio::time::sleep(ttl / 12).await,
            }
        }
    }
}

/// A token no other flusher's lease has.
pub(super) fn token(me: u64) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{me:x}:{}:{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
