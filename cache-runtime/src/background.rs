//! Runtimes of the cache's own, on two threads, for what must outlive any one
//! caller's runtime: the health, replay and upkeep loops, and the connections
//! made when no caller's runtime is at hand.
//!
//! A multiplexed connection's driver is a task on the runtime that connected
//! it, and dies with it: a test suite (one runtime per `#[tokio::test]`)
//! sharing the global cache finds the connections of the first test's runtime
//! dead. Connections are made on a caller's runtime when there is one (no hop
//! between threads on the hit path); `conn.rs` replaces one whose runtime has
//! gone before the call that found it fails, and makes connections here when
//! no caller's runtime is at hand. The threads stop when the cache is dropped.
//!
//! A second thread carries the connection for big values and decodes them, so
//! that reading megabytes never holds up the small replies or the callers'
//! workers. It keeps the default priority: a lowered one starved it on a busy
//! machine until big reads timed out and opened the breaker.

use std::future::Future;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::CacheError;

pub(crate) struct Background {
    io: Thread,
    bulk: Thread,
}

/// One thread running a runtime until the cache is dropped.
pub(crate) struct Thread {
    handle: Handle,
    /// Dropped with the cache: the thread's runtime then stops.
    _stop: oneshot::Sender<()>,
}

impl Thread {
    /// Starts the thread `cache-runtime-{name}`; `bulk` runs at a lower priority.
    pub(crate) fn start(name: &str) -> Result<Thread, CacheError> {
        let failed = |e: std::io::Error| {
            CacheError::Unavailable(format!("could not start the cache's {name} thread: {e}"))
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(failed)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("cache-runtime-{name}"))
            .spawn(move || {
                OWN_THREAD.with(|own| own.set(true));
                runtime.block_on(async move { drop(stopped.await) })
            })
            .map_err(failed)?;
        Ok(Thread { handle, _stop: stop })
    }

    /// Where tasks for this thread's runtime are spawned.
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Background {
    pub(crate) fn start() -> Result<Background, CacheError> {
        Ok(Background { io: Thread::start("io")?, bulk: Thread::start("bulk")? })
    }

    /// Where the connections of small commands and the upkeep loops live.
    pub(crate) fn handle(&self) -> &Handle {
        &self.io.handle
    }

    /// Where the connection of big values lives.
    pub(crate) fn bulk_handle(&self) -> &Handle {
        &self.bulk.handle
    }

    /// Runs `fut` on the cache's runtime and waits for it from whichever
    /// executor the caller is on.
    pub(crate) async fn run<T: Send + 'static>(
        handle: &Handle,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, CacheError> {
        handle.spawn(fut).await.map_err(|_| CacheError::Unavailable("the cache is shutting down".into()))
    }
}

thread_local! {
    static OWN_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this is one of the cache's own threads.
pub(crate) fn on_own_thread() -> bool {
    OWN_THREAD.with(std::cell::Cell::get)
}

/// Whether the caller runs on a Tokio runtime: timers (and so every Redis
/// command, each under the operation timeout) need one.
pub(crate) fn on_runtime() -> Result<(), CacheError> {
    // Every command asks: inside a task the task's id answers with one
    // thread-local read; only a future driven by `block_on` needs the handle
    // (an `Arc` clone).
    if tokio::task::try_id().is_some() || Handle::try_current().is_ok() {
        return Ok(());
    }
    Err(CacheError::NoRuntime)
}
