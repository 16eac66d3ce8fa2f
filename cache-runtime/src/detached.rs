//! Bodies that run in a task of their own, so that no caller waits for them:
//! early refresh and soft timeouts.
//!
//! **Early refresh** (`#[cached(early_refresh = true)]`) is XFetch (Vattani,
//! Chierichetti, Lowenstein, "Optimal Probabilistic Cache Stampede
//! Prevention", VLDB 2015). An entry's stamp (`codec.rs`) records when it
//! expires and how long its body took (δ); a hit at time `t` refreshes it if
//! `t − δ·β·ln(U) ≥ expiry`, `U` uniform in (0, 1]. The chance rises as expiry
//! nears, and sooner for slow bodies, so a hot key is refreshed about once,
//! shortly before it expires, while every caller keeps hitting; a cold key is
//! left to expire. The hit that draws it returns its value at once and the
//! body runs in the background: once per process (single flight), and once
//! across the fleet (the fleet lease, taken without waiting), under a fence
//! taken before it read the entry again, as any fill.
//!
//! **Soft timeouts** (`soft_timeout`, on fail-safe functions): a caller whose
//! body runs longer while a last value is kept gets that value; the body goes
//! on in the background and fills. The last value is written back first (to
//! expire after `fail_safe_throttle`, as when a body fails) and only then may
//! the body's fill land, so the older value never overwrites the newer.
//!
//! Both need the body's future to be `Send + 'static`, which only the macro
//! can see for a given function: it passes [`Detached`] for functions that
//! ask for either, [`Attached`] elsewhere.

use std::any::Any;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::engine::{store, Cacheable, Call, Fill, Tags, Traced};
use crate::flight::Role;
use crate::lease::Held;
use crate::schema::Key;
use crate::spec::Spec;
use crate::{codec, fail_safe, lease, Cache, Serialization};

/// A panic a body raised, caught.
pub(crate) type Panic = Box<dyn Any + Send>;

/// A uniform draw from [0, 1), seeded by the clock and `salt`: the TTL jitter's
/// and XFetch's, where a fresh draw per call is all that matters.
pub(crate) fn draw(salt: &[u8]) -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let bits = xxhash_rust::xxh3::xxh3_64_with_seed(salt, nanos.as_nanos() as u64);
    // 53 bits: every value is exact in an f64.
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether a hit on `bytes` (a stamped entry) should refresh it early: its
/// logical expiry if so, to recognize the entry again.
#[inline]
pub(crate) fn due(bytes: &[u8], beta: f64, full: &str) -> Option<u64> {
    let stamp = codec::stamped(bytes)?;
    let left = stamp.expires_ms.checked_sub(codec::now_ms())? as f64;
    // A body that took no measurable time is given a millisecond.
    let scale = f64::from(stamp.took_ms.max(1)) * beta;
    // −ln(U) ≤ 37 for any U the draw gives: most hits are decided without one.
    if left > scale * 37.0 {
        return None;
    }
    let u = 1.0 - draw(full.as_bytes());
    (-u.ln() * scale >= left).then_some(stamp.expires_ms)
}

/// Where a body may run: in the caller ([`Attached`]) or in a task of its
/// own ([`Detached`]). Each method gives back what it can't take.
#[diagnostic::on_unimplemented(
    message = "`early_refresh` and `soft_timeout` run the body in a task of its own: its future must be `Send + 'static`",
    label = "a function with owned arguments whose body and result are `Send`"
)]
pub trait Detach<M, Out, C, B, Fut> {
    /// Refreshes `call`'s entry, last seen expiring at `seen`, in the background.
    #[doc(hidden)]
    fn refresh(&self, call: &Call<'_>, format: Serialization, seen: u64, condition: C, miss: B);

    /// Runs `body` in the background; its result comes back through the
    /// returned [`Soft`], which also decides who stores it.
    #[doc(hidden)]
    fn soft(&self, call: &Call<'_>, tags: &Tags, body: Fut, fill: Fill) -> Result<Soft<Out, C>, Fut>;
}

/// The body runs in the caller: no early refresh, no soft timeout.
pub struct Attached;

/// The body may run in a task of its own.
pub struct Detached;

impl<M, Out, C, B, Fut> Detach<M, Out, C, B, Fut> for Attached {
    fn refresh(&self, _: &Call<'_>, _: Serialization, _: u64, _: C, _: B) {}

    fn soft(&self, _: &Call<'_>, _: &Tags, body: Fut, _: Fill) -> Result<Soft<Out, C>, Fut> {
        Err(body)
    }
}

impl<M, Out, C, B, Fut> Detach<M, Out, C, B, Fut> for Detached
where
    M: 'static,
    Out: Cacheable<M> + Send + 'static,
    C: FnOnce(&Out::Value) -> bool + Send + 'static,
    B: FnOnce() -> (Tags, Fut) + Send + 'static,
    Fut: Future<Output = Out> + Send + 'static,
{
    fn refresh(&self, call: &Call<'_>, format: Serialization, seen: u64, condition: C, miss: B) {
        // A refresh already running here: this hit is served, as the others are.
        if call.cache.inner.flights.running(&call.key.full) {
            return;
        }
        let Some(runtime) = runtime(call.cache) else { return };
        let (cache, spec, key) = (call.cache.clone(), call.spec.clone(), call.key.clone());
        runtime.spawn(refresh(cache, spec, key, format, seen, condition, miss));
    }

    fn soft(&self, call: &Call<'_>, tags: &Tags, body: Fut, fill: Fill) -> Result<Soft<Out, C>, Fut> {
        let Some(runtime) = runtime(call.cache) else { return Err(body) };
        let (result, result_rx) = oneshot::channel();
        let (gate, gate_rx) = oneshot::channel::<(C, Option<Held>)>();
        let (cache, spec, key, tags) =
            (call.cache.clone(), call.spec.clone(), call.key.clone(), tags.clone());
        let task = runtime.spawn(async move {
            let began = Instant::now();
            let mut body = std::pin::pin!(fail_safe::caught(body));
            let out = match tokio::time::timeout(background_limit(&cache), body.as_mut()).await {
                Ok(out) => out,
                // Left to fill in the background, and running on past the limit: given up.
                Err(_) if result.is_closed() => {
                    return tracing::warn!(
                        key = key.full,
                        "soft timeout: the body ran past its limit; given up"
                    )
                }
                // Its caller waits for it still (the last value could not be served).
                Err(_) => body.await,
            };
            let Err(out) = result.send(out) else { return };
            // The caller served the last value and went on: this fills, once
            // the caller has written that value back.
            let Ok((condition, lease)) = gate_rx.await else { return };
            match out {
                Ok(out) if !out.failed() => {
                    let call = Call { cache: &cache, spec: &spec, key };
                    let fill = Fill { took: began.elapsed(), ..fill };
                    store(&call, out.stored(), &tags, condition, fill).await;
                }
                Ok(_) => tracing::debug!(key = key.full, "soft timeout: the body went on and failed"),
                Err(panic) => {
                    tracing::warn!(
                        key = key.full,
                        cause = fail_safe::describe(&*panic),
                        "soft timeout: the body went on and failed"
                    )
                }
            }
            drop(lease);
        });
        Ok(Soft { result: result_rx, gate: Some(gate), task: Some(task.abort_handle()) })
    }
}

/// A body running in the background for a caller that may stop waiting.
/// Dropped before the caller handed the body off (the call was cancelled),
/// it stops the body, as dropping the call stops a body run in the caller.
pub struct Soft<Out, C> {
    result: oneshot::Receiver<Result<Out, Panic>>,
    gate: Option<oneshot::Sender<(C, Option<Held>)>>,
    task: Option<tokio::task::AbortHandle>,
}

impl<Out, C> Drop for Soft<Out, C> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// How waiting on a [`Soft`] body ended.
pub(crate) enum Waited<Out, C> {
    /// It finished in time (or failed): its result, to handle as the caller's own.
    Done(Result<Out, Panic>, C),
    /// Still running at the deadline.
    Late(Late<Out, C>),
}

/// A body still running after the soft timeout.
pub(crate) struct Late<Out, C> {
    soft: Soft<Out, C>,
    condition: C,
}

impl<Out, C> Soft<Out, C> {
    /// Waits up to `limit` for the body.
    pub(crate) async fn wait(mut self, limit: Duration, condition: C) -> Waited<Out, C> {
        match tokio::time::timeout(limit, &mut self.result).await {
            Ok(Ok(out)) => Waited::Done(out, condition),
            // The task was dropped (its runtime shut down): as a panic.
            Ok(Err(_)) => Waited::Done(Err(Box::new("the body's task was dropped")), condition),
            Err(_) => Waited::Late(Late { soft: self, condition }),
        }
    }
}

impl<Out, C> Late<Out, C> {
    /// Waits for the body after all (the last value could not be served).
    pub(crate) async fn finish(mut self) -> Waited<Out, C> {
        match (&mut self.soft.result).await {
            Ok(out) => Waited::Done(out, self.condition),
            Err(_) => Waited::Done(Err(Box::new("the body's task was dropped")), self.condition),
        }
    }

    /// Leaves the body to fill in the background, holding `lease`, now that
    /// the last value is written back: unless it finished meanwhile, and then
    /// its result is given back to store here (the lease stays with the caller).
    pub(crate) fn leave(mut self, lease: &mut Option<Held>) -> Option<(Out, C)> {
        self.soft.result.close();
        match self.soft.result.try_recv() {
            Ok(Ok(out)) => Some((out, self.condition)),
            Ok(Err(panic)) => {
                tracing::warn!(cause = fail_safe::describe(&*panic), "soft timeout: the body failed");
                None
            }
            Err(_) => {
                // Handed off: the body goes on whatever becomes of this call.
                self.soft.task = None;
                if let Some(gate) = self.soft.gate.take() {
                    let _ = gate.send((self.condition, lease.take()));
                }
                None
            }
        }
    }
}

/// How long a body left to run in the background may: `hard_timeout`, and
/// never past the fill window, beyond which its fill would be refused anyway.
fn background_limit(cache: &Cache) -> Duration {
    cache.config().hard_timeout().unwrap_or(crate::fence::WINDOW).min(crate::fence::WINDOW)
}

/// The runtime background bodies run on: the caller's, else the cache's own.
fn runtime(cache: &Cache) -> Option<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current().ok().or_else(|| cache.runtime().cloned())
}

/// Refreshes the entry of `key`, seen expiring at `seen`, unless it was
/// replaced, invalidated or is being refreshed meanwhile.
async fn refresh<M, Out, C, B, Fut>(
    cache: Cache,
    spec: Spec,
    key: Key,
    format: Serialization,
    seen: u64,
    condition: C,
    miss: B,
) where
    Out: Cacheable<M>,
    C: FnOnce(&Out::Value) -> bool,
    B: FnOnce() -> (Tags, Fut),
    Fut: Future<Output = Out>,
{
    let call = Call { cache: &cache, spec: &spec, key };
    let full = call.key.full.as_str();
    let Role::Leader(leader) = cache.inner.flights.join(full, false) else { return };
    let started = Instant::now();
    let near = spec.near(&cache).then(|| &cache.inner.tiers.near).filter(|near| near.is_listening());
    let near = near.map(|near| near.fence(started));
    let fence = cache.fill_fence(full, started);
    // Read again: another instance may have refreshed it, or someone invalidated it.
    match cache.read(full, started).await {
        Ok(Some(raw)) if codec::logical_expiry(&raw) == Some(seen) => {}
        _ => return,
    }
    let lease = if cache.config().fleet_lease() && cache.inner.tiers.shared_store().is_some() {
        match lease::try_take(&cache, full).await {
            Some(held) => Some(held),
            // Another instance refreshes it (or Redis could not be asked): its entry serves meanwhile.
            None => return,
        }
    } else {
        None
    };
    let (tags, body) = miss();
    let began = Instant::now();
    let Ok(out) = tokio::time::timeout(background_limit(&cache), fail_safe::caught(body)).await else {
        return tracing::warn!(key = full, "early refresh: the body ran past its limit; given up");
    };
    let out = match out {
        Ok(out) if !out.failed() => out,
        // The entry serves until it expires; then a caller runs the body as on any miss.
        Ok(_) => return tracing::debug!(key = full, "early refresh: the body failed"),
        Err(panic) => {
            return tracing::warn!(
                key = full,
                cause = fail_safe::describe(&*panic),
                "early refresh: the body failed"
            )
        }
    };
    let fill = Fill { format, fence: Some(fence), bump: false, near, took: began.elapsed() };
    let (outcome, traced) = store(&call, out.stored(), &tags, condition, fill).await;
    drop(lease);
    if traced == Traced::Filled {
        cache.inner.counters.early_refreshes.fetch_add(1, Ordering::Relaxed);
    }
    leader.publish(outcome);
}
