//! A shared store with the local tier behind it: the breaker decides which one
//! serves, invalidations the shared store missed are logged and replayed
//! before it serves again, and fills are stored only in the tier they read.
//!
//! Invalidations reach both tiers. While the shared store can't take one (the
//! breaker is open, a timeout), the call returns [`CacheError::Deferred`]: this
//! process serves nothing the invalidation covers (its local tier applied it,
//! and the shared store serves it nothing until the log is replayed), and a
//! retry every [`REPLAY_EVERY`], independent of the breaker's timeout, bounds
//! the window in which other processes can still read the old value: the time
//! the store is unreachable, plus one interval.
//!
//! An invalidation the shared store applied is published on the bus
//! (`bus.rs`) for the other instances' near tiers before it returns `Ok`; one
//! that could not be published (or whose call was dropped first) is queued
//! like one that could not be applied, and its replay publishes it.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use tracing::instrument::WithSubscriber;

use crate::breaker::{Breaker, BreakerState, Permit};
use crate::bus::{Bus, Event};
use crate::cache::{KeyTtl, Mode};
use crate::lease::{Claim, Purpose};
use crate::local::LocalTier;
use crate::misconfig::Misconfig;
use crate::near::Near;
use crate::pending::{Pending, PendingLog};
use crate::stats::Health;
use crate::store::{FillFence, KeyPage, Raw, ServerInfo, Store, Write};
use crate::CacheError;

/// How often queued invalidations are retried while the shared store can't take them.
pub(crate) const REPLAY_EVERY: Duration = Duration::from_millis(200);

pub(crate) struct Failover {
    shared: Option<Box<dyn Store>>,
    pub(crate) local: LocalTier,
    breaker: Breaker,
    pending: PendingLog,
    /// Whether the local tier serves while the breaker is open.
    local_fallback: bool,
    /// A credentials or permission problem the shared store reported, until a check passes.
    pub(crate) misconfig: Arc<Misconfig>,
    breaker_gauge: IntGauge,
    /// Decoded values in front of the shared store, while the bus is heard (`near.rs`).
    pub(crate) near: Near,
    pub(crate) bus: Bus,
    /// How long the bus listener's PING may take before its connection counts as lost.
    heartbeat_timeout: Duration,
}

/// What the tiers need for the bus: the near tier, the bus, and the listener's PING timeout.
pub(crate) struct Coherence {
    pub(crate) near: Near,
    pub(crate) bus: Bus,
    pub(crate) heartbeat_timeout: Duration,
}

impl Failover {
    pub(crate) fn new(
        shared: Option<Box<dyn Store>>,
        local: LocalTier,
        breaker: Breaker,
        misconfig: Arc<Misconfig>,
        breaker_gauge: IntGauge,
        local_fallback: bool,
        coherence: Coherence,
    ) -> Self {
        Failover {
            shared,
            local,
            breaker,
            pending: PendingLog::new(),
            local_fallback,
            misconfig,
            breaker_gauge,
            near: coherence.near,
            bus: coherence.bus,
            heartbeat_timeout: coherence.heartbeat_timeout,
        }
    }

    /// The shared store, whatever the breaker says: for the bus listener.
    pub(crate) fn shared_store(&self) -> Option<&dyn Store> {
        self.shared.as_deref()
    }

    pub(crate) fn heartbeat_timeout(&self) -> Duration {
        self.heartbeat_timeout
    }

    /// Connects the shared store. Unreachable: local mode until it answers.
    /// Refusing the cache's credentials or commands is an error.
    pub(crate) async fn start(&self) -> Result<Mode, CacheError> {
        let Some(shared) = &self.shared else { return Ok(Mode::Local) };
        match shared.start().await {
            Ok(()) => {
                if let Err(e) = self.bus.check(shared.as_ref()).await {
                    tracing::debug!(error = %e, "cache bus: PUBLISH not checked at start");
                }
                Ok(Mode::Redis)
            }
            // A setting Redis shows to be wrong (`cluster_shards`) is no outage either.
            Err(e) if e.is_misconfiguration() || matches!(e, CacheError::Config { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "Redis unreachable at start: cache runs in local mode until it answers");
                self.breaker.trip();
                shared.revive();
                self.breaker_gauge.set(self.breaker.state().as_gauge());
                Ok(Mode::Local)
            }
        }
    }

    /// Which store serves now: the shared one only while the breaker is closed.
    pub(crate) fn mode(&self) -> Mode {
        match (&self.shared, self.breaker.state()) {
            (Some(_), BreakerState::Closed) => Mode::Redis,
            _ => Mode::Local,
        }
    }

    pub(crate) fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The shared store and the breaker's permit, or `None` when calls must use
    /// the local tier: none configured, the breaker open, or invalidations pending
    /// that could not be replayed (the shared store serves nothing while one is).
    #[inline]
    async fn shared(&self) -> Option<(&dyn Store, Permit<'_>)> {
        let shared = self.shared.as_deref()?;
        let permit = self.breaker.permit()?;
        if self.pending.is_dirty() {
            // Boxed: the future of every call holds this rare one's state otherwise.
            if let Err(e) = Box::pin(self.replay(shared)).await {
                let _ = self.settle(permit, Err::<(), _>(e));
                return None;
            }
        }
        Some((shared, permit))
    }

    /// Reports a call's outcome to the breaker and passes it on.
    fn settle<T>(&self, permit: Permit<'_>, result: Result<T, CacheError>) -> Result<T, CacheError> {
        if let Err(e) = &result {
            // Redis was never asked: this says nothing of its health either way.
            if matches!(e, CacheError::NoRuntime) {
                return result;
            }
            self.misconfig.report(e);
        }
        let healthy = result.as_ref().map_or_else(|e| !e.is_unavailable(), |_| true);
        let probe = permit.is_probe();
        permit.report(healthy);
        if probe || !healthy {
            self.breaker_gauge.set(self.breaker.state().as_gauge());
        }
        if probe && healthy {
            // Whatever the local tier learned during the outage is not the shared store's truth.
            self.local.clear();
        }
        result
    }

    async fn replay(&self, shared: &dyn Store) -> Result<(), CacheError> {
        let _one_at_a_time = self.pending.replaying.lock().await;
        loop {
            // Whatever is not applied when this ends, by an error or because the
            // caller's future was dropped here, goes back to the log.
            let mut replay = self.pending.replay();
            if replay.len() == 0 {
                return Ok(());
            }
            while let Some(entry) = replay.next() {
                let applied = async {
                    shared.invalidate(entry).await?;
                    self.near.apply(entry);
                    self.announce(shared, entry).await
                };
                if let Err(e) = applied.await {
                    // An error the store answered with would fail this entry forever and
                    // hold back every one after it: a clear of the prefix covers it instead.
                    if !e.is_unavailable() && *entry != Pending::Everything {
                        tracing::error!(error = %e, "a queued invalidation was refused: replaying a clear of the prefix instead");
                        replay.replace_next(Pending::Everything);
                    }
                    return Err(e);
                }
                replay.applied();
            }
            tracing::info!(
                replayed = replay.len(),
                "invalidations made during the outage replayed into Redis"
            );
        }
    }

    /// Runs an invalidation on both tiers; `Ok` means the shared store applied
    /// it, [`CacheError::Deferred`] that it is queued.
    pub(crate) async fn invalidate(&self, what: Pending) -> Result<u64, CacheError> {
        let local = self.local.apply(&what);
        self.near.apply(&what);
        if self.shared.is_none() {
            return Ok(local);
        }
        let cause = match self.shared().await {
            Some((shared, permit)) => {
                let applied = shared.invalidate(&what).await;
                // Again: a fill of this instance that read Redis between the
                // first application and Redis's own took the old value.
                self.near.apply(&what);
                let result = match applied {
                    Ok(deleted) => self.announce_applied(shared, &what).await.map(|()| deleted),
                    Err(e) => Err(e),
                };
                match self.settle(permit, result) {
                    // Only an unreachable store defers the invalidation; an error it
                    // answered with would fail the replay forever, so it goes to the caller.
                    Err(e) if e.is_unavailable() => e.to_string(),
                    other => return other,
                }
            }
            None => "the circuit breaker is open".to_owned(),
        };
        self.pending.push(what);
        Err(CacheError::Deferred(cause))
    }

    /// What a fill whose read starts at `now` is checked against: no round trip.
    #[inline]
    pub(crate) fn fence(&self, full: &str, now: Instant) -> FillFence {
        match (&self.shared, self.breaker.state()) {
            (Some(shared), BreakerState::Closed) => shared.fence(full, now),
            _ => self.local.fence(now),
        }
    }

    /// Reads `full`; `now` is when the call began, for the local tier's TTL check.
    pub(crate) async fn read(&self, full: &str, now: Instant) -> Result<Option<Raw>, CacheError> {
        match self.shared().await {
            Some((shared, permit)) => self.settle(permit, shared.get(full).await),
            None if self.serves_locally() => Ok(self.local.get(full, now).map(Raw::Local)),
            // What another instance invalidated meanwhile can't be heard: a miss.
            None => Ok(None),
        }
    }

    /// Whether the local tier serves calls now that the shared store does not:
    /// always without one, and while the breaker is open if `local_fallback`.
    fn serves_locally(&self) -> bool {
        self.shared.is_none() || self.local_fallback
    }

    /// Stores a fill in the tier it read (an outage fill never reaches the shared
    /// store, a shared fill never the local tier), or a `set` in the tier serving.
    pub(crate) async fn write(&self, write: Write<'_>) -> Result<bool, CacheError> {
        match self.shared().await {
            // A `set` replaces what other instances may keep near: it is announced as an invalidation.
            Some((shared, permit)) if write.bump && !write.check_only => {
                let what = Pending::Key(write.full.to_owned());
                let written = shared.write(write).await;
                self.near.apply(&what);
                let stored = match written {
                    Ok(stored) => stored,
                    Err(e) => return self.settle(permit, Err(e)),
                };
                let announced = self.announce_applied(shared, &what).await;
                match self.settle(permit, announced) {
                    Ok(()) => Ok(stored),
                    // Stored, but the others' near tiers can't be told: an
                    // invalidation of the key is queued, which tells them.
                    Err(e) => {
                        self.pending.push(what);
                        Err(CacheError::Deferred(e.to_string()))
                    }
                }
            }
            Some((shared, permit)) => self.settle(permit, shared.write(write).await),
            None if self.serves_locally() => self.local.write_now(write),
            // Not `Ok(false)`, which says a fill was refused (the engine would
            // not share it): nothing was stored, as after any cache fault.
            None => Err(CacheError::Unavailable(
                "Redis is unreachable and local_fallback is off: nothing was stored".into(),
            )),
        }
    }

    /// Takes the fleet lease on `full` (`lease.rs`); unavailable while the shared store does not serve.
    pub(crate) async fn acquire_lease(
        &self,
        full: &str,
        token: &str,
        ttl: Duration,
        purpose: Purpose,
    ) -> Result<Claim, CacheError> {
        let Some((shared, permit)) = self.shared().await else { return Err(not_serving()) };
        self.settle(permit, shared.acquire_lease(full, token, ttl, purpose).await)
    }

    pub(crate) async fn renew_lease(
        &self,
        full: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        let Some((shared, permit)) = self.shared().await else { return Err(not_serving()) };
        self.settle(permit, shared.renew_lease(full, token, ttl).await)
    }

    /// Lets a lease go; while the shared store does not serve, it expires instead.
    pub(crate) async fn release_lease(&self, full: &str, token: &str) -> Result<(), CacheError> {
        let Some((shared, permit)) = self.shared().await else { return Err(not_serving()) };
        let message = self.bus.released(full);
        self.settle(permit, shared.release_lease(full, token, self.bus.channel(), &message).await)
    }

    /// Runs this instance's handlers of `event` on `runtime`, whatever Redis
    /// does, and publishes it for the other instances'.
    pub(crate) async fn emit(
        &self,
        event: Event,
        runtime: Option<&tokio::runtime::Handle>,
    ) -> Result<(), CacheError> {
        self.bus.dispatch(&event, runtime);
        if self.shared.is_none() {
            return Ok(());
        }
        let only_here = |e: CacheError| {
            CacheError::Unavailable(format!("{e}: the event ran this instance's handlers only"))
        };
        if !self.bus.is_enabled() {
            return Err(only_here(CacheError::Unavailable(
                "Redis refuses PUBLISH to the cache's user".into(),
            )));
        }
        match self.shared().await {
            Some((shared, permit)) => match self.settle(permit, self.bus.emit(shared, event).await) {
                Err(e) if e.is_unavailable() => Err(only_here(e)),
                other => other,
            },
            None => Err(only_here(not_serving())),
        }
    }

    /// [`announce`](Self::announce), for a call that has just applied `what`
    /// to Redis: if the call is dropped before the announcement is made, it
    /// is queued, and its replay announces it.
    async fn announce_applied(&self, shared: &dyn Store, what: &Pending) -> Result<(), CacheError> {
        let unannounced = Unannounced::new(&self.pending, what);
        let announced = self.announce(shared, what).await;
        unannounced.disarm();
        announced
    }

    /// Announces an invalidation Redis applied. Only an unreachable store is
    /// an error (the invalidation is then queued, and its replay announces
    /// it); one Redis answered with is logged: the invalidation itself stands.
    async fn announce(&self, shared: &dyn Store, what: &Pending) -> Result<(), CacheError> {
        match self.bus.announce(shared, what).await {
            Err(e) if !e.is_unavailable() => {
                tracing::error!(error = %e, "an invalidation applied to Redis could not be announced to the other instances");
                Ok(())
            }
            other => other,
        }
    }

    /// Removes an unreadable entry from the tier serving, fencing nothing.
    pub(crate) async fn drop_if_same(&self, full: &str, bytes: &[u8]) {
        match self.shared().await {
            Some((shared, permit)) => drop(self.settle(permit, shared.drop_if_same(full, bytes).await)),
            None => self.local.drop_if_same(full, bytes),
        }
    }

    pub(crate) async fn exists(&self, full: &str) -> Result<bool, CacheError> {
        match self.shared().await {
            Some((shared, permit)) => self.settle(permit, shared.exists(full).await),
            None => Ok(self.local.remaining(full).is_some()),
        }
    }

    pub(crate) async fn ttl(&self, full: &str) -> Result<KeyTtl, CacheError> {
        match self.shared().await {
            Some((shared, permit)) => self.settle(permit, shared.ttl(full).await),
            None => Ok(self.local.remaining(full).map_or(KeyTtl::Missing, KeyTtl::Expires)),
        }
    }

    pub(crate) async fn scan_page(
        &self,
        glob: &str,
        cursor: u64,
        count: usize,
    ) -> Result<KeyPage, CacheError> {
        match self.shared().await {
            Some((shared, permit)) => self.settle(permit, shared.scan_page(glob, cursor, count).await),
            None => self.local.scan_page_now(glob, cursor, count),
        }
    }

    /// Keys matching `glob` and the server's facts from the shared store, or
    /// `None` when it is not serving or did not answer.
    pub(crate) async fn shared_stats(&self, glob: &str) -> Option<(u64, Option<ServerInfo>)> {
        let (shared, permit) = self.shared().await?;
        let result = async { Ok((shared.count(glob).await?, shared.server_info().await?)) }.await;
        self.settle(permit, result).ok()
    }

    /// One PING (none in local-only mode) and the breaker's and the
    /// credentials' state. Never fails: a failure is the answer.
    pub(crate) async fn health(&self) -> Health {
        let started = Instant::now();
        let result = match (&self.shared, self.shared().await) {
            (None, _) => Ok(()),
            (Some(_), Some((shared, permit))) => self.settle(permit, shared.ping().await),
            (Some(_), None) => Err(CacheError::Unavailable("the circuit breaker is open".into())),
        };
        let took = started.elapsed();
        Health::new(self.mode(), self.breaker.state(), took, result.err(), self.misconfig.current())
    }

    /// Starts the background upkeep; each loop ends with the last strong reference.
    pub(crate) fn spawn_loops(
        this: &Arc<Failover>,
        health_every: Duration,
        runtime: &tokio::runtime::Handle,
    ) {
        if this.shared.is_none() {
            return;
        }
        runtime.spawn(health_loop(Arc::downgrade(this), health_every).with_current_subscriber());
        runtime.spawn(crate::bus::listen_loop(Arc::downgrade(this)).with_current_subscriber());
        runtime.spawn(replay_loop(Arc::downgrade(this)).with_current_subscriber());
    }
}

/// PINGs the shared store every `health_check_interval`: counts failures while
/// the breaker is closed, and probes it (replaying pending invalidations first)
/// once it may close. While it answers, the store's own upkeep runs; a refused
/// password or command is re-checked until the whole check passes.
async fn health_loop(this: Weak<Failover>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(this) = this.upgrade() else { return };
        if let Some((shared, permit)) = this.shared().await {
            if this.settle(permit, shared.ping().await).is_ok() {
                shared.maintain().await;
            }
        }
        // A failed check adds nothing the refused calls did not report.
        if let (Some(shared), Some(_)) = (&this.shared, this.misconfig.current()) {
            if shared.check_access().await.is_ok() {
                this.misconfig.resolve();
            }
        }
    }
}

/// Retries queued invalidations every [`REPLAY_EVERY`], whatever the breaker says.
async fn replay_loop(this: Weak<Failover>) {
    loop {
        tokio::time::sleep(REPLAY_EVERY).await;
        let Some(this) = this.upgrade() else { return };
        if !this.pending.is_dirty() {
            continue;
        }
        if let Some(shared) = this.shared.as_deref() {
            if let Err(e) = this.replay(shared).await {
                tracing::debug!(error = %e, "queued invalidations not replayed yet");
            }
        }
    }
}

fn not_serving() -> CacheError {
    CacheError::Unavailable("the circuit breaker is open".into())
}

/// An invalidation applied to Redis and not announced yet: if the call is
/// dropped before [`disarm`](Self::disarm), it is queued, and its replay
/// (every [`REPLAY_EVERY`]) announces it.
struct Unannounced<'a> {
    log: &'a PendingLog,
    what: Option<&'a Pending>,
}

impl<'a> Unannounced<'a> {
    fn new(log: &'a PendingLog, what: &'a Pending) -> Self {
        Unannounced { log, what: Some(what) }
    }

    fn disarm(mut self) {
        self.what = None;
    }
}

impl Drop for Unannounced<'_> {
    fn drop(&mut self) {
        if let Some(what) = self.what {
            self.log.push(what.clone());
        }
    }
}
