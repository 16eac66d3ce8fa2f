//! Warmers that run when a cache starts, while `health` says `ready: false`.
//!
//! Each warmer is a function of the new cache, typically loading what the
//! service reads first and writing it with [`Cache::warm`]. They run in the
//! background on the caller's runtime, `warmup_concurrency` at a time, so
//! that `Cache::new` returns at once and an orchestrator waits on readiness
//! instead. A warmer that fails, or panics, is logged at error level and
//! counted as done: a service with a cold cache still serves.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;

use crate::store::BoxFuture;
use crate::{Cache, CacheError};

type Warm = Arc<dyn Fn(Cache) -> BoxFuture<'static, Result<u64, CacheError>> + Send + Sync>;

/// The warmers a cache runs when it starts ([`Cache::new_with_warmers`],
/// [`init_with_warmers`](crate::init_with_warmers)).
///
/// ```
/// use cache_runtime::{Cache, CacheConfig, Warmers};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), cache_runtime::CacheError> {
/// let warmers = Warmers::new().add("capabilities", |cache: Cache| async move {
///     let capabilities = vec![("capabilities:quantum", "on"), ("capabilities:neural", "on")];
///     cache.warm(capabilities, None, &["capabilities"]).await
/// });
/// let cache = Cache::new_with_warmers(CacheConfig::default(), warmers).await?;
/// while !cache.health().await.ready {
///     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
/// }
/// assert_eq!(cache.get::<String>("capabilities:quantum").await?.as_deref(), Some("on"));
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Warmers {
    list: Vec<(String, Warm)>,
}

impl Warmers {
    /// No warmers yet.
    pub fn new() -> Self {
        Warmers::default()
    }

    /// Adds the warmer `name`: it gets the new cache and returns how many
    /// entries it wrote, or why it could not.
    pub fn add<F, Fut>(mut self, name: impl Into<String>, warm: F) -> Self
    where
        F: Fn(Cache) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<u64, CacheError>> + Send + 'static,
    {
        self.list.push((name.into(), Arc::new(move |cache| Box::pin(warm(cache)))));
        self
    }

    /// How many warmers there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

impl std::fmt::Debug for Warmers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.list.iter().map(|(name, _)| name)).finish()
    }
}

impl Cache {
    /// Starts `warmers` in the background: the cache is `warming` until the
    /// last one ends, however it ends.
    pub(crate) fn start_warmers(&self, warmers: Warmers) {
        if warmers.is_empty() {
            return;
        }
        if !self.config().warmup_enabled() {
            tracing::info!(
                warmers = warmers.len(),
                "cache warm-up is disabled (warmup_enabled: false): warmers not run"
            );
            return;
        }
        // The caller's runtime: a warmer is the application's code, and may
        // block or hog; the cache's own thread keeps its upkeep.
        let Some(runtime) = tokio::runtime::Handle::try_current().ok().or_else(|| self.runtime().cloned())
        else {
            tracing::error!("no runtime to run the warmers on: warmers not run");
            return;
        };
        self.inner.warming.store(warmers.len(), Ordering::Release);
        let (cache, concurrency) = (self.clone(), self.config().warmup_concurrency().max(1));
        runtime.spawn(async move {
            let started = Instant::now();
            let mut queue = warmers.list.into_iter();
            let mut running = tokio::task::JoinSet::new();
            loop {
                while running.len() < concurrency {
                    let Some((name, warm)) = queue.next() else { break };
                    let cache = cache.clone();
                    running.spawn(async move {
                        let began = Instant::now();
                        // Called in the task: a warmer that panics building its future is caught too.
                        let result = AssertUnwindSafe(async move { warm(cache).await }).catch_unwind().await;
                        let result = result.unwrap_or_else(|panic| {
                            Err(CacheError::InvalidArgument(crate::fail_safe::describe(panic.as_ref())))
                        });
                        (name, result, began.elapsed())
                    });
                }
                let Some(done) = running.join_next().await else { break };
                match done {
                    Ok((name, Ok(entries), took)) => tracing::info!(warmer = %name, entries, ?took, "cache warmer done"),
                    Ok((name, Err(e), took)) => {
                        tracing::error!(warmer = %name, error = %e, ?took, "cache warmer failed; the service goes on with a colder cache")
                    }
                    Err(e) => tracing::error!(error = %e, "a cache warmer panicked; the service goes on with a colder cache"),
                }
                cache.inner.warming.fetch_sub(1, Ordering::AcqRel);
            }
            let took = started.elapsed();
            cache.inner.metrics.observe_warmup(took);
            tracing::info!(?took, "cache warmers finished: ready");
        });
    }
}
