//! [`Cache::get_with`] and [`Cache::try_get_with`]: the engine behind
//! `#[cached]`, for code without the macro.

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::detached::Attached;
use crate::engine::{get_or_compute, Cacheable, Call, OkOnly, Plain, Sharing, Tags};
use crate::spec::{Spec, TtlSpec};
use crate::{Cache, IntoTtl};

/// The spec of a call made without the macro: the cache's own prefix, nothing more.
fn spec(ttl: Option<Duration>) -> Spec {
    Spec { ttl: ttl.map(TtlSpec::Fixed), ..Spec::named("get_with") }
}

impl Cache {
    /// Returns the value cached under `key`, or runs `init` and caches what it
    /// returns. Concurrent callers of a cold key in this process run `init` once
    /// and share its result; a fill computed before an invalidation of `key` (or
    /// of one of its tags, a pattern or a clear covering it) is refused; a cache
    /// fault returns `init`'s own result. `.ttl(..)`, `.tags(..)` and
    /// `.condition(..)` refine the call before it is awaited. A hit in the local
    /// tier clones the value the entry's first hit decoded (hence `T: Clone`);
    /// a Redis hit decodes.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// # let cache = cache_runtime::Cache::local(Default::default());
    /// let name: String = cache
    ///     .get_with("mission:7:name", async { "Apollo".to_owned() })
    ///     .ttl(60)
    ///     .tags(["missions"])
    ///     .await;
    /// let again: String = cache.get_with("mission:7:name", async { unreachable!("a hit") }).await;
    /// assert_eq!((name.as_str(), again.as_str()), ("Apollo", "Apollo"));
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// None: a cache fault (Redis down, a value that can't be encoded, a
    /// decode failure) is counted and logged, and `init`'s result is returned.
    /// Outside a Tokio runtime `init` runs without the cache.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops `init` with it. If this caller was running
    /// `init` for the key, another caller waiting for it takes over: it reads
    /// the cache again (a fill already sent may have landed) and otherwise runs
    /// its own `init`. A waiting caller that is dropped affects no one. A fill
    /// sent before the drop is still applied, under the fence taken before the
    /// read, so it can't resurrect an invalidated value.
    pub fn get_with<'a, T, F>(&'a self, key: &'a str, init: F) -> GetWith<'a, T, F, fn(&T) -> bool>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: Future<Output = T> + Send,
    {
        GetWith::new(self, key, init)
    }

    /// Like [`get_with`](Self::get_with) for an `init` that can fail: an `Err` is
    /// not cached, and the callers that waited for it get the same error (an
    /// `Arc` of it) instead of each running `init` again.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// # let cache = cache_runtime::Cache::local(Default::default());
    /// let failed = cache.try_get_with::<u32, _, _>("mission:7:crew", async { Err("db down") }).await;
    /// assert_eq!(*failed.unwrap_err(), "db down");
    /// let crew = cache.try_get_with::<u32, &str, _>("mission:7:crew", async { Ok(3) }).await;
    /// assert_eq!(crew.unwrap(), 3, "the error was not cached");
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// Only `init`'s own error, as an `Arc<E>`: shared with the callers that
    /// waited for this run when nothing covering the key was invalidated since it
    /// began. Cache faults are not errors, as for [`get_with`](Self::get_with).
    ///
    /// # Cancel safety
    ///
    /// As for [`get_with`](Self::get_with).
    pub fn try_get_with<'a, T, E, F>(
        &'a self,
        key: &'a str,
        init: F,
    ) -> TryGetWith<'a, T, E, F, fn(&T) -> bool>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: Future<Output = Result<T, E>> + Send,
    {
        TryGetWith(GetWith::new(self, key, init), PhantomData)
    }
}

/// The engine call both builders make: the cache's own key, an explicit or
/// default TTL, the given tags, and results shared by cloning.
async fn run<M, Out, T, C>(
    cache: &Cache,
    key: &str,
    ttl: Option<Duration>,
    tags: Vec<String>,
    condition: C,
    init: impl Future<Output = Out>,
) -> Out
where
    Out: Cacheable<M, Value = T> + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
    C: FnOnce(&T) -> bool,
{
    let spec = spec(ttl);
    let call = Call { cache, spec: &spec, key: cache.inner.schema.entry_key(key) };
    let miss = move || (Tags::Owned(tags), init);
    get_or_compute::<M, Out, _, _, _, _>(
        call,
        condition,
        Sharing::cloned(),
        Sharing::cloned(),
        Attached,
        miss,
    )
    .await
}

fn always<T>(_: &T) -> bool {
    true
}

/// A pending [`Cache::get_with`]; await it for the value. See that method for
/// its errors and cancel safety.
#[must_use = "a GetWith does nothing until awaited"]
pub struct GetWith<'a, T, F, C> {
    cache: &'a Cache,
    key: &'a str,
    init: F,
    ttl: Option<Duration>,
    tags: Vec<String>,
    condition: C,
    value: PhantomData<fn() -> T>,
}

impl<'a, T, F> GetWith<'a, T, F, fn(&T) -> bool> {
    fn new(cache: &'a Cache, key: &'a str, init: F) -> Self {
        GetWith { cache, key, init, ttl: None, tags: Vec::new(), condition: always::<T>, value: PhantomData }
    }
}

impl<'a, T, F, C> GetWith<'a, T, F, C> {
    /// Time to live: seconds as an integer, or a `Duration`; the default TTL otherwise.
    pub fn ttl(mut self, ttl: impl IntoTtl) -> Self {
        self.ttl = Some(ttl.into_ttl());
        self
    }

    /// Tags for [`Cache::invalidate_tags`].
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Stores the value only when `condition` says so (it is returned either way).
    pub fn condition<C2: FnOnce(&T) -> bool>(self, condition: C2) -> GetWith<'a, T, F, C2> {
        let GetWith { cache, key, init, ttl, tags, value, .. } = self;
        GetWith { cache, key, init, ttl, tags, condition, value }
    }
}

impl<'a, T, F, C> IntoFuture for GetWith<'a, T, F, C>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    F: Future<Output = T> + Send + 'a,
    C: FnOnce(&T) -> bool + Send + 'a,
{
    type Output = T;
    type IntoFuture = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        let GetWith { cache, key, init, ttl, tags, condition, .. } = self;
        Box::pin(run::<Plain, T, T, _>(cache, key, ttl, tags, condition, init))
    }
}

/// A pending [`Cache::try_get_with`]; await it for the value or the shared error.
/// See that method for its errors and cancel safety.
#[must_use = "a TryGetWith does nothing until awaited"]
pub struct TryGetWith<'a, T, E, F, C>(GetWith<'a, T, F, C>, PhantomData<fn() -> E>);

impl<'a, T, E, F, C> TryGetWith<'a, T, E, F, C> {
    /// Time to live: seconds as an integer, or a `Duration`; the default TTL otherwise.
    pub fn ttl(self, ttl: impl IntoTtl) -> Self {
        TryGetWith(self.0.ttl(ttl), PhantomData)
    }

    /// Tags for [`Cache::invalidate_tags`].
    pub fn tags<I, S>(self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        TryGetWith(self.0.tags(tags), PhantomData)
    }

    /// Stores an `Ok` value only when `condition` says so (it is returned either way).
    pub fn condition<C2: FnOnce(&T) -> bool>(self, condition: C2) -> TryGetWith<'a, T, E, F, C2> {
        TryGetWith(self.0.condition(condition), PhantomData)
    }
}

impl<'a, T, E, F, C> IntoFuture for TryGetWith<'a, T, E, F, C>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    E: Send + Sync + 'static,
    F: Future<Output = Result<T, E>> + Send + 'a,
    C: FnOnce(&T) -> bool + Send + 'a,
{
    type Output = Result<T, Arc<E>>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        let GetWith { cache, key, init, ttl, tags, condition, .. } = self.0;
        let init = async move { init.await.map_err(Arc::new) };
        Box::pin(run::<OkOnly, Result<T, Arc<E>>, T, _>(cache, key, ttl, tags, condition, init))
    }
}
