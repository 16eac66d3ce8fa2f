//! The cache-aside engine: a hit returns the stored value; a miss runs the
//! body once per key in this process (single flight, `flight.rs`) and stores
//! what it returns under the fence taken before the read (`fence.rs`); any
//! cache fault falls back to the body's own result.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::field::Empty;
use tracing::level_filters::LevelFilter;
use tracing::{debug_span, Instrument, Level, Span};

use crate::detached::{Detach, Late, Waited};
use crate::flight::{self, Outcome, Role, Shared};
use crate::key::escape_glob;
use crate::schema::Key;
use crate::spec::Spec;
use crate::store::{FillFence, Raw};
use crate::{codec, Cache, CacheError, Serialization};
use crate::{detached, fail_safe, lease};

/// A call's tags: literal ones cost no allocation on a hit.
#[derive(Clone)]
pub enum Tags {
    /// Tags written as literals.
    Static(&'static [&'static str]),
    /// Tags that interpolate arguments.
    Owned(Vec<String>),
}

impl Tags {
    fn to_vec(&self) -> Vec<String> {
        match self {
            Tags::Static(tags) => tags.iter().map(|t| (*t).to_owned()).collect(),
            Tags::Owned(tags) => tags.clone(),
        }
    }
}

/// Selects caching of the whole return value.
pub struct Plain;
/// Selects caching of `Ok` values only.
pub struct OkOnly;
/// Selects caching of `Some` values only.
pub struct SomeOnly;

/// How a return type is split into what is stored and rebuilt from it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` can't be cached: the stored value must be `Serialize + DeserializeOwned + Send + Sync + 'static`",
    label = "the return type of a #[cached] function"
)]
pub trait Cacheable<M>: Sized {
    /// What is stored.
    type Value: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The part to store, if any.
    fn stored(&self) -> Option<&Self::Value>;
    /// Rebuilds the return value from a stored one.
    fn from_cached(v: Self::Value) -> Self;
    /// Whether this result is a failure a fail-safe function serves its last value for (an `Err`).
    fn failed(&self) -> bool {
        false
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Cacheable<Plain> for T {
    type Value = T;
    fn stored(&self) -> Option<&T> {
        Some(self)
    }
    fn from_cached(v: T) -> T {
        v
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static, E> Cacheable<OkOnly> for Result<T, E> {
    type Value = T;
    fn stored(&self) -> Option<&T> {
        self.as_ref().ok()
    }
    fn from_cached(v: T) -> Self {
        Ok(v)
    }
    fn failed(&self) -> bool {
        self.is_err()
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Cacheable<SomeOnly> for Option<T> {
    type Value = T;
    fn stored(&self) -> Option<&T> {
        self.as_ref()
    }
    fn from_cached(v: T) -> Self {
        Some(v)
    }
}

/// How copies of a `T` are made, where it is `Clone`. It serves two ends.
///
/// For a result the cache did not store (an `Err`, a `None`, a value that could
/// not be encoded), how it reaches the callers that waited for the same flight:
/// with a copy, the body runs once for all of them; without one, they form a new
/// flight, so the body runs once at a time, each caller's at most once, never as
/// a herd.
///
/// For a stored value, whether a local-tier hit can clone the value the entry
/// keeps instead of decoding its bytes: without a copy, every hit decodes.
pub struct Sharing<Out> {
    share: fn(&Out) -> Option<Shared>,
    take: fn(&Shared) -> Option<Out>,
}

impl<Out> Sharing<Out> {
    /// Nothing is shared: each waiting caller runs the body in turn, each hit decodes.
    pub fn none() -> Self {
        Sharing { share: |_| None, take: |_| None }
    }
}

impl<Out: Clone + Send + Sync + 'static> Sharing<Out> {
    /// Every waiting caller gets a clone of the leader's result, every local hit a clone of the entry's value.
    pub fn cloned() -> Self {
        Sharing {
            share: |out| Some(Arc::new(out.clone())),
            take: |shared| shared.downcast_ref::<Out>().cloned(),
        }
    }
}

/// Picks [`Sharing::cloned`] where `T` is `Clone` and
/// [`Sharing::none`] elsewhere, by method resolution: `(&Probe::<T>::new()).sharing()`
/// finds [`ByClone`] first when it applies, [`NotShared`] otherwise.
pub struct Probe<T>(PhantomData<fn() -> T>);

impl<T> Probe<T> {
    /// A probe for `T`.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Probe(PhantomData)
    }
}

/// The sharing of a `Clone` result.
pub trait ByClone<T> {
    /// [`Sharing::cloned`].
    fn sharing(&self) -> Sharing<T>;
}

impl<T: Clone + Send + Sync + 'static> ByClone<T> for Probe<T> {
    fn sharing(&self) -> Sharing<T> {
        Sharing::cloned()
    }
}

/// The sharing of any other result.
pub trait NotShared<T> {
    /// [`Sharing::none`].
    fn sharing(&self) -> Sharing<T>;
}

impl<T> NotShared<T> for &Probe<T> {
    fn sharing(&self) -> Sharing<T> {
        Sharing::none()
    }
}

/// One call: which cache, the function's spec, and the finished key.
pub struct Call<'a> {
    /// The cache to use.
    pub cache: &'a Cache,
    /// The function's spec.
    pub spec: &'a Spec,
    /// The key.
    pub key: Key,
}

/// Cache-aside: a hit returns the stored value; a miss calls `miss` for the
/// call's tags and the body, runs the body once per key in this process (other
/// callers wait for it) and stores what `condition` accepts. Any cache fault
/// falls back to the body's own result. `sharing` copies results that were not
/// stored to the callers that waited; `values` copies stored values out of the
/// local tier, so its hits skip the decode.
///
/// `miss` is called only when the body must run, so a hit neither builds the
/// tags nor the body's future. Values are stored in the cache's configured
/// serialization. `detach` says whether the body may run in a task of its
/// own (`detached.rs`: early refresh, soft timeouts).
pub fn get_or_compute<'a, M, Out, C, B, Fut, D>(
    call: Call<'a>,
    condition: C,
    sharing: Sharing<Out>,
    values: Sharing<Out::Value>,
    detach: D,
    miss: B,
) -> impl Future<Output = Out> + use<'a, M, Out, C, B, Fut, D>
where
    Out: Cacheable<M>,
    C: FnOnce(&Out::Value) -> bool,
    B: FnOnce() -> (Tags, Fut),
    Fut: Future<Output = Out>,
    D: Detach<M, Out, C, B, Fut>,
{
    let format = call.cache.config().serialization;
    get_or_compute_as(format, call, condition, sharing, values, detach, miss)
}

/// [`get_or_compute`], storing values in `format` whatever the cache's
/// configured serialization: for values whose encoding is not the caller's
/// choice (a cached HTTP response is bytes, which JSON would write as an array
/// of numbers). Readers decode by the format an entry's header names, so
/// entries of both kinds live side by side.
///
/// A plain function rather than an `async fn`: whether the call is traced is
/// decided once, here, and an untraced call is the engine's own future with
/// no layer around it (a layer cost a local hit ~3%, the span's state in it more).
#[allow(clippy::too_many_arguments)]
pub fn get_or_compute_as<'a, M, Out, C, B, Fut, D>(
    format: Serialization,
    call: Call<'a>,
    condition: C,
    sharing: Sharing<Out>,
    values: Sharing<Out::Value>,
    detach: D,
    miss: B,
) -> impl Future<Output = Out> + use<'a, M, Out, C, B, Fut, D>
where
    Out: Cacheable<M>,
    C: FnOnce(&Out::Value) -> bool,
    B: FnOnce() -> (Tags, Fut),
    Fut: Future<Output = Out>,
    D: Detach<M, Out, C, B, Fut>,
{
    // Decided before the engine's future is built, and kept beside it: one
    // future type built in place either way. Moving the engine's future (hundreds
    // of bytes) between branches and boxes cost a local hit a tenth in copies.
    let span = if debugging() { Some(call_span(&call)).filter(|span| !span.is_disabled()) } else { None };
    CallFuture { inner: lookup(format, call, condition, sharing, values, detach, miss), span }
}

/// The span of one call, its fields filled in if a subscriber wants it.
#[cold]
#[inline(never)]
fn call_span(call: &Call<'_>) -> Span {
    described(debug_span!("cache.call", function = Empty, key = Empty, outcome = Empty), call)
}

pin_project_lite::pin_project! {
    /// A call's future: the engine's, entered into its span when a subscriber
    /// wants one, which then records the outcome. It yields the call's result.
    pub struct CallFuture<F> {
        #[pin]
        inner: F,
        span: Option<Span>,
    }
}

impl<Out, F> Future for CallFuture<F>
where
    F: Future<Output = (Out, Traced)>,
{
    type Output = Out;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Out> {
        let this = self.project();
        let Some(span) = this.span.as_ref() else {
            return this.inner.poll(cx).map(|(out, _)| out);
        };
        let _entered = span.enter();
        this.inner.poll(cx).map(|(out, traced)| {
            span.record("outcome", traced.as_str());
            out
        })
    }
}

/// Whether DEBUG spans can be wanted at all: one relaxed load, so a service
/// at INFO pays nothing more for the call spans.
#[inline]
fn debugging() -> bool {
    tracing::level_filters::STATIC_MAX_LEVEL >= Level::DEBUG && LevelFilter::current() >= Level::DEBUG
}

/// Names the call on `span`. The fields are filled in only when a subscriber
/// wants the span: a hit at INFO pays one level check, never a copy of the key.
fn described(span: Span, call: &Call<'_>) -> Span {
    if !span.is_disabled() {
        span.record("function", call.spec.name);
        span.record("key", call.key.relative());
    }
    span
}

/// How a call ended, for its span's `outcome` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Traced {
    /// The stored value was returned.
    Hit,
    /// The body ran and its result was not stored (not cacheable, or refused by the condition or size).
    Miss,
    /// The body ran and its result was stored.
    Filled,
    /// The body ran and the fence refused its result: something covering the key was invalidated meanwhile.
    Refused,
    /// A cache fault: the body's own result was served.
    Fault,
    /// The result of another caller's flight.
    Shared,
    /// The body failed and the function's last value was served (fail-safe).
    Stale,
}

impl Traced {
    fn as_str(self) -> &'static str {
        match self {
            Traced::Hit => "hit",
            Traced::Miss => "miss",
            Traced::Filled => "filled",
            Traced::Refused => "refused",
            Traced::Fault => "fault",
            Traced::Shared => "shared",
            Traced::Stale => "stale",
        }
    }
}

/// The cache-aside path of [`get_or_compute_as`], saying how it ended.
#[allow(clippy::too_many_arguments)]
async fn lookup<M, Out, C, B, Fut, D>(
    format: Serialization,
    call: Call<'_>,
    condition: C,
    sharing: Sharing<Out>,
    values: Sharing<Out::Value>,
    detach: D,
    miss: B,
) -> (Out, Traced)
where
    Out: Cacheable<M>,
    C: FnOnce(&Out::Value) -> bool,
    B: FnOnce() -> (Tags, Fut),
    Fut: Future<Output = Out>,
    D: Detach<M, Out, C, B, Fut>,
{
    let cache = call.cache;
    if is_uncacheable(&call.key) {
        return (miss().1.await, Traced::Miss);
    }
    let full = call.key.full.as_str();
    let started = Instant::now();
    let near = call.spec.near(cache).then(|| &cache.inner.tiers.near);
    if let Some(near) = near {
        if let Some(entry) = near.get(full, started).filter(|e| !fail_safe::expired(&e.bytes)) {
            let due = refresh_due(&call, &entry.bytes);
            if let Some(v) = decode_or_reuse(cache, full, &Raw::Local(entry), &values) {
                cache.record_near_hit();
                if let Some(seen) = due {
                    detach.refresh(&call, format, seen, condition, miss);
                }
                return (Out::from_cached(v), Traced::Hit);
            }
        }
    }
    // Taken before the read: an invalidation after the read is newer than these.
    let near_fence = near.filter(|near| near.is_listening()).map(|near| near.fence(started));
    let fence = cache.fill_fence(full, started);
    // A fail-safe entry past its expiry: a miss, kept to serve if the body
    // fails, with the fence taken before the read that found it.
    let mut expired = None;
    match cache.read(full, started).await {
        Ok(Some(raw)) if fail_safe::expired(&raw) => expired = Some((raw, fence)),
        Ok(Some(raw)) => {
            let due = refresh_due(&call, &raw);
            let kept = match (&raw, near_fence) {
                (Raw::Owned(bytes), Some(near_fence)) if bytes.len() <= cache.config().big_value_bytes() => {
                    Some((bytes.clone(), near_fence))
                }
                _ => None,
            };
            if let Some(v) = decode_hit(cache, full, raw, &values).await {
                cache.record_lookup(true);
                if let Some(seen) = due {
                    // Its fill keeps the new value near.
                    detach.refresh(&call, format, seen, condition, miss);
                } else if let Some((bytes, near_fence)) = kept {
                    // The body is not run: its future is dropped unpolled, built for its tags.
                    let tags = call.spec.tags(cache, miss().0.to_vec());
                    keep_near(cache, full, bytes, call.spec.ttl(cache), &tags, near_fence).await;
                }
                return (Out::from_cached(v), Traced::Hit);
            }
        }
        Ok(None) => {}
        Err(e) => {
            cache.record_fault("get", full, &e);
            return (miss().1.await, Traced::Fault);
        }
    }
    cache.record_lookup(false);

    let mut started = started;
    let mut fence = fence;
    let mut reread = false;
    let leader = loop {
        let outcome = match cache.inner.flights.join(full, reread) {
            Role::Leader(leader) => break leader,
            Role::Follower(slot) => flight::follow(slot).await,
            Role::Reread => None,
        };
        match outcome {
            Some(Outcome::Value(bytes, at)) if started < at => match codec::decode::<Out::Value>(&bytes) {
                Ok(v) => return (Out::from_cached(v), Traced::Shared),
                Err(_) => return (miss().1.await, Traced::Miss),
            },
            // Checked against the fence after this call began: as good as its own.
            Some(Outcome::Shared(shared, at)) if started < at => match (sharing.take)(&shared) {
                Some(out) => return (out, Traced::Shared),
                // A result of another type under the same key (two `get_with` callers).
                None => return (miss().1.await, Traced::Miss),
            },
            // Written or checked after this call began, refused as stale, or not
            // shareable: start over.
            Some(Outcome::Value(..) | Outcome::Shared(..) | Outcome::Stale | Outcome::Unshared) => continue,
            // A flight stored its value since this caller read (rare), or its
            // leader went away, perhaps after storing: read again before leading.
            None => {
                started = Instant::now();
                // A fill after this read is checked against what is newer than it.
                fence = cache.fill_fence(full, started);
                reread = true;
                match cache.read(full, started).await {
                    Ok(Some(raw)) if fail_safe::expired(&raw) => expired = Some((raw, fence)),
                    Ok(Some(raw)) => {
                        if let Some(v) = decode_hit(cache, full, raw, &values).await {
                            return (Out::from_cached(v), Traced::Hit);
                        }
                    }
                    _ => {}
                }
            }
        }
    };

    // Another instance may be running the body already: wait for its fill.
    let mut lease = None;
    if cache.config().fleet_lease() && cache.inner.tiers.shared_store().is_some() {
        match lease::turn(cache, full, &mut fence).await {
            lease::Turn::Run(held) => lease = held,
            lease::Turn::Found(raw, _) if fail_safe::expired(&raw) => expired = Some((raw, fence)),
            lease::Turn::Found(raw, read_at) => {
                let bytes: Arc<[u8]> = Arc::from(&*raw);
                if let Some(v) = decode_hit(cache, full, raw, &values).await {
                    leader.publish(Outcome::Value(bytes, read_at));
                    return (Out::from_cached(v), Traced::Shared);
                }
            }
        }
    }

    // Decoded up front: the body is guarded only when there is a value to serve instead.
    let stale =
        match expired.filter(|_| call.spec.fail_safe(cache)) {
            Some((raw, fence)) => cache
                .decode_or_drop::<Out::Value>(full, &raw)
                .map(|value| fail_safe::Stale { value, bytes: raw.to_vec(), fence }),
            None => None,
        };

    // No second read: the fill is checked against the fence taken before the
    // read, so the miss path is one GET and one write.
    let (tags, body) = miss();
    let fill = Fill { format, fence: Some(fence), bump: false, near: near_fence, took: Duration::ZERO };
    let began = Instant::now();
    let (out, condition) = match stale {
        None => (body.await, condition),
        Some(stale) => match guarded(&call, &detach, &tags, body, condition, fill, stale).await {
            Guarded::Fresh(out, condition) => (out, condition),
            Guarded::Stale { out, bytes, at, late } => {
                leader.publish(Outcome::Value(bytes.into(), at));
                // Its body goes on, holding the lease, and fills; or it ended just now.
                if let Some((fresh, condition)) = late.and_then(|late| late.leave(&mut lease)) {
                    let fill = Fill { took: began.elapsed(), ..fill };
                    store(&call, fresh.stored(), &tags, condition, fill).await;
                }
                drop(lease);
                return (out, Traced::Stale);
            }
        },
    };
    let fill = Fill { took: began.elapsed(), ..fill };
    let (outcome, traced) = store(&call, out.stored(), &tags, condition, fill).await;
    // Released once the fill is written, so that the instances it wakes read
    // it; in the background, so that the caller does not wait for it.
    drop(lease);
    let outcome = match outcome {
        Outcome::Unshared => share(&call, full, &out, &tags, fence, &sharing, &leader).await,
        outcome => outcome,
    };
    leader.publish(outcome);
    (out, traced)
}

/// Whether a hit on `bytes` should refresh its entry in the background (`detached.rs`).
#[inline]
fn refresh_due(call: &Call<'_>, bytes: &[u8]) -> Option<u64> {
    if !call.spec.early_refresh {
        return None;
    }
    detached::due(bytes, call.cache.config().early_refresh_beta(), &call.key.full)
}

/// How a body guarded by a last value ended.
enum Guarded<Out, C> {
    /// The body's own result, to store as usual.
    Fresh(Out, C),
    /// The last value, served; `bytes` and `at` are for the flight's
    /// followers. `late`: the body, still running in the background (soft timeout).
    Stale { out: Out, bytes: Vec<u8>, at: Instant, late: Option<Late<Out, C>> },
}

/// Runs `body` for a fail-safe call that has `stale` to serve if the body
/// fails (an `Err`, a panic), runs past `hard_timeout` or, with a soft
/// timeout and a body that can run in a task of its own, past `soft_timeout`.
/// The last value is served only if nothing covering the key was
/// invalidated since the read that found it; else the body's own result is.
async fn guarded<M, Out, C, B, Fut, D>(
    call: &Call<'_>,
    detach: &D,
    tags: &Tags,
    body: Fut,
    condition: C,
    fill: Fill,
    stale: fail_safe::Stale<Out::Value>,
) -> Guarded<Out, C>
where
    Out: Cacheable<M>,
    Fut: Future<Output = Out>,
    D: Detach<M, Out, C, B, Fut>,
{
    let hard = call.cache.config().hard_timeout();
    // Within `hard_timeout` too, which bounds any wait while a last value could be served.
    let soft = call
        .spec
        .soft_timeout
        .filter(|limit| !limit.is_zero())
        .map(|soft| hard.map_or(soft, |h| h.min(soft)));
    let body = match soft {
        Some(limit) => match detach.soft(call, tags, body, fill) {
            Ok(soft) => {
                return match soft.wait(limit, condition).await {
                    Waited::Done(done, condition) => settle(call, tags, stale, done, condition).await,
                    Waited::Late(late) => match last_value(call, "the soft timeout", stale, tags).await {
                        Ok((out, bytes, at)) => {
                            call.cache.inner.counters.soft_timeouts.fetch_add(1, Ordering::Relaxed);
                            Guarded::Stale { out, bytes, at, late: Some(late) }
                        }
                        // Invalidated since it was read: this caller waits for the body after all.
                        Err(_) => match late.finish().await {
                            Waited::Done(done, condition) => settle_fresh(done, condition),
                            Waited::Late(_) => unreachable!("a finished body is done"),
                        },
                    },
                };
            }
            Err(body) => body,
        },
        None => body,
    };
    let mut body = std::pin::pin!(fail_safe::caught(body));
    match hard {
        Some(limit) => match tokio::time::timeout(limit, body.as_mut()).await {
            Ok(done) => settle(call, tags, stale, done, condition).await,
            Err(_) => match last_value(call, "the hard timeout", stale, tags).await {
                Ok((out, bytes, at)) => Guarded::Stale { out, bytes, at, late: None },
                Err(_) => settle_fresh(body.await, condition),
            },
        },
        None => {
            let done = body.await;
            settle(call, tags, stale, done, condition).await
        }
    }
}

/// A finished body's result, or the last value where it failed.
async fn settle<M, Out: Cacheable<M>, C>(
    call: &Call<'_>,
    tags: &Tags,
    stale: fail_safe::Stale<Out::Value>,
    done: Result<Out, detached::Panic>,
    condition: C,
) -> Guarded<Out, C> {
    let cause = match &done {
        Ok(out) if !out.failed() => return settle_fresh(done, condition),
        Ok(_) => "an error".to_owned(),
        Err(panic) => fail_safe::describe(&**panic),
    };
    match last_value(call, &cause, stale, tags).await {
        Ok((out, bytes, at)) => Guarded::Stale { out, bytes, at, late: None },
        Err(_) => settle_fresh(done, condition),
    }
}

/// The body's own result: its value, or its panic raised again.
fn settle_fresh<Out, C>(done: Result<Out, detached::Panic>, condition: C) -> Guarded<Out, C> {
    match done {
        Ok(out) => Guarded::Fresh(out, condition),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Serves `stale` for `cause` if it may be: within its last-resort deadline
/// (a value read before its entry went may be older) and not invalidated
/// since it was read. The bytes and the instant of the check are for the
/// flight's followers; `Err` gives the value back, unserved.
async fn last_value<M, Out: Cacheable<M>>(
    call: &Call<'_>,
    cause: &str,
    stale: fail_safe::Stale<Out::Value>,
    tags: &Tags,
) -> Result<(Out, Vec<u8>, Instant), fail_safe::Stale<Out::Value>> {
    let tags = call.spec.tags(call.cache, tags.to_vec());
    let checking = Instant::now();
    if !fail_safe::servable(&stale.bytes) || !call.cache.unfenced(&call.key.full, &tags, stale.fence).await {
        return Err(stale);
    }
    let (out, bytes) = serve_stale(call, cause, stale, &tags).await;
    Ok((out, bytes, checking))
}

/// Serves `stale`, checked unfenced, in place of what the body gave, and
/// writes it back to expire after `fail_safe_throttle`, under the fence of
/// the read that found it, so that an invalidation since wins and the body is
/// not retried by every call meanwhile. The bytes are for the flight's followers.
async fn serve_stale<M, Out: Cacheable<M>>(
    call: &Call<'_>,
    cause: &str,
    stale: fail_safe::Stale<Out::Value>,
    tags: &[String],
) -> (Out, Vec<u8>) {
    let (cache, full) = (call.cache, call.key.full.as_str());
    cache.inner.counters.stale_served.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(key = full, cause, "fail-safe: the body failed; its last value is served");
    let bytes = match fail_safe::throttled(&stale.bytes, cache.config().fail_safe_throttle()) {
        Some((bytes, ttl)) => {
            if let Err(e) = cache.write_back(full, &stale.bytes, &bytes, ttl, tags, stale.fence).await {
                cache.record_fault("set", full, &e);
            }
            bytes
        }
        None => stale.bytes,
    };
    (Out::from_cached(stale.value), bytes)
}

/// A result that was not stored, for the callers waiting on `leader`: shared
/// only if nothing covering the key was invalidated since the leader's read
/// (one check, made only when someone waits), and then only with callers that
/// started before the check, as a stored value is.
async fn share<M, Out: Cacheable<M>>(
    call: &Call<'_>,
    full: &str,
    out: &Out,
    tags: &Tags,
    fence: FillFence,
    sharing: &Sharing<Out>,
    leader: &flight::Leader<'_>,
) -> Outcome {
    if !leader.has_followers() {
        return Outcome::Unshared;
    }
    let Some(shared) = (sharing.share)(out) else {
        return Outcome::Unshared;
    };
    let checking = Instant::now();
    let tags = call.spec.tags(call.cache, tags.to_vec());
    if call.cache.unfenced(full, &tags, fence).await {
        Outcome::Shared(shared, checking)
    } else {
        Outcome::Unshared
    }
}

/// Keeps what a Redis hit read in the near tier, for no longer than the
/// entry has left in Redis: its expiry is not announced, and a value must not
/// outlive it here.
async fn keep_near(
    cache: &Cache,
    full: &str,
    bytes: Vec<u8>,
    ttl: std::time::Duration,
    tags: &[String],
    fence: FillFence,
) {
    let left = match cache.inner.tiers.ttl(full).await {
        Ok(crate::KeyTtl::Expires(left)) => left,
        Ok(crate::KeyTtl::Persistent) => ttl,
        Ok(crate::KeyTtl::Missing) | Err(_) => return,
    };
    cache.inner.tiers.near.fill(full, bytes, ttl.min(left), tags, fence);
}

/// Whether building the key failed: the key builder flags an argument that
/// could be neither written out nor hashed.
fn is_uncacheable(key: &Key) -> bool {
    key.uncacheable
}

/// [`decode_or_reuse`], with a big value decoded on the cache's bulk thread:
/// its megabytes take milliseconds, which the small calls sharing this worker
/// would otherwise wait out.
async fn decode_hit<V: DeserializeOwned + Send + 'static>(
    cache: &Cache,
    full: &str,
    raw: Raw,
    values: &Sharing<V>,
) -> Option<V> {
    match raw {
        Raw::Owned(bytes) if bytes.len() > cache.config().big_value_bytes() => {
            let (owner, key) = (cache.clone(), full.to_owned());
            cache.off_workers(move || owner.decode_or_drop::<V>(&key, &bytes)).await
        }
        raw => decode_or_reuse(cache, full, &raw, values),
    }
}

/// Decodes what was read, or clones the value a local-tier entry keeps. The
/// first reader of an entry that can copy its type keeps what it decoded there:
/// a value decoded from the entry's own bytes, so a later hit returns what a
/// decode would. Another type under the same key misses the downcast and
/// decodes, which checks the fingerprint as before.
fn decode_or_reuse<V: DeserializeOwned>(
    cache: &Cache,
    full: &str,
    raw: &Raw,
    values: &Sharing<V>,
) -> Option<V> {
    let Raw::Local(entry) = raw else {
        return cache.decode_or_drop(full, raw);
    };
    if let Some(v) = entry.decoded.get().and_then(|kept| (values.take)(kept)) {
        return Some(v);
    }
    let v = cache.decode_or_drop::<V>(full, raw)?;
    if let Some(copy) = (values.share)(&v) {
        // A concurrent first reader may have kept its own decode of the same bytes: either serves.
        let _ = entry.decoded.set(copy);
    }
    Some(v)
}

/// Write-through: runs the body `run` returns and stores what `condition` accepts.
pub async fn refresh<M, Out, C, B, Fut>(call: Call<'_>, condition: C, run: B) -> Out
where
    Out: Cacheable<M>,
    C: FnOnce(&Out::Value) -> bool,
    B: FnOnce() -> (Tags, Fut),
    Fut: Future<Output = Out>,
{
    if !debugging() {
        return write_through(call, condition, run).await.0;
    }
    Box::pin(async move {
        let span =
            described(debug_span!("cache.refresh", function = Empty, key = Empty, outcome = Empty), &call);
        if span.is_disabled() {
            return write_through(call, condition, run).await.0;
        }
        let (out, traced) = write_through(call, condition, run).instrument(span.clone()).await;
        span.record("outcome", traced.as_str());
        out
    })
    .await
}

async fn write_through<M, Out, C, B, Fut>(call: Call<'_>, condition: C, run: B) -> (Out, Traced)
where
    Out: Cacheable<M>,
    C: FnOnce(&Out::Value) -> bool,
    B: FnOnce() -> (Tags, Fut),
    Fut: Future<Output = Out>,
{
    let (tags, body) = run();
    if is_uncacheable(&call.key) {
        return (body.await, Traced::Miss);
    }
    // Fenced like a fill, and fencing the key: fills that read before this one
    // wrote can't put an older value back.
    let fence = call.cache.fill_fence(&call.key.full, Instant::now());
    let began = Instant::now();
    let out = body.await;
    let format = call.cache.config().serialization;
    let fill = Fill { format, fence: Some(fence), bump: true, near: None, took: began.elapsed() };
    let (_, traced) = store(&call, out.stored(), &tags, condition, fill).await;
    (out, traced)
}

/// Removes one cached result.
pub async fn invalidate(cache: &Cache, key: &Key) -> Result<bool, CacheError> {
    cache.delete(key.relative()).await
}

/// Removes every cached result of the function `spec` describes.
pub async fn invalidate_all(cache: &Cache, spec: &Spec) -> Result<u64, CacheError> {
    cache.delete_pattern(&format!("{}:*", escape_glob(spec.prefix(cache)))).await
}

/// How a body's result is stored (the engine's own: fields are private).
#[derive(Clone, Copy)]
pub struct Fill {
    /// The format it is encoded in.
    pub(crate) format: Serialization,
    /// The fence taken before the read that missed: the write lands only if
    /// nothing covering the key was invalidated since (none: unfenced).
    pub(crate) fence: Option<FillFence>,
    /// Whether the write fences the key itself (write-through).
    pub(crate) bump: bool,
    /// The near tier's fence taken before that read, to keep the value near.
    pub(crate) near: Option<FillFence>,
    /// How long the body ran (stamped for early refresh).
    pub(crate) took: Duration,
}

/// Stores what the body returned, and keeps it in the near tier under
/// `fill.near`.
///
/// Takes what is stored (`Cacheable::stored`), not the whole result: that is
/// `Sync` where a result may not be, so a background fill can hold it.
pub(crate) async fn store<V, C>(
    call: &Call<'_>,
    value: Option<&V>,
    tags: &Tags,
    condition: C,
    fill: Fill,
) -> (Outcome, Traced)
where
    V: Serialize + DeserializeOwned + Sync,
    C: FnOnce(&V) -> bool,
{
    let Fill { format, fence, bump, near, took } = fill;
    let (cache, full) = (call.cache, call.key.full.as_str());
    let Some(value) = value else {
        return (Outcome::Unshared, Traced::Miss);
    };
    let mut bytes = match codec::encode(format, value) {
        Ok(bytes) => bytes,
        Err(e) => {
            cache.record_fault("encode", full, &e);
            return (Outcome::Unshared, Traced::Fault);
        }
    };
    // Followers that started before this instant may share the value (flight.rs).
    let writing = Instant::now();
    // A value no fence check let through (not stored: too large, the condition
    // said no, a cache fault) is shared only with callers that started before
    // the leader's read: for them it is as if they had read first.
    let unchecked = fence.map_or(writing, |f| f.taken().min(writing));
    if cache.check_size(bytes.len()).is_err() {
        tracing::debug!(key = full, size = bytes.len(), "result too large to cache");
    } else if condition(value) {
        let mut ttl = cache.jittered(full, call.spec.ttl(cache));
        if call.spec.stamped(cache) {
            let max =
                if call.spec.fail_safe(cache) { cache.config().fail_safe_max() } else { Duration::ZERO };
            (bytes, ttl) = fail_safe::stamp(&bytes, ttl, max, call.spec.early_refresh.then_some(took));
        }
        let tags = call.spec.tags(cache, tags.to_vec());
        match cache.write(full, &bytes, ttl, &tags, fence, bump).await {
            Ok(true) => {
                // Only what Redis took: an outage fill lives in the local tier alone.
                if let (Some(near), Some(FillFence::Shared(..))) = (near, fence) {
                    if bytes.len() <= cache.config().big_value_bytes() {
                        cache.inner.tiers.near.fill(full, bytes.clone(), ttl, &tags, near);
                    }
                }
                return (Outcome::Value(bytes.into(), writing), Traced::Filled);
            }
            Ok(false) => {
                cache.inner.counters.fills_refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key = full, "fill refused: invalidated while computing");
                return (Outcome::Stale, Traced::Refused);
            }
            Err(e) => {
                cache.record_fault("set", full, &e);
                return (Outcome::Value(bytes.into(), unchecked), Traced::Fault);
            }
        }
    }
    (Outcome::Value(bytes.into(), unchecked), Traced::Miss)
}
