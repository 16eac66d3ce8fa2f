//! The global cache used from several runtimes, as a test suite does (one
//! runtime per `#[tokio::test]`), and from outside any runtime.
//!
//! One test in this binary: the global cache can be initialised once per process.

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use cache_runtime::{cached, CacheError, Mode};
use support::Redis;

static RUNS: AtomicU32 = AtomicU32::new(0);

#[cached(prefix = "runtimes", ttl = 60)]
async fn load(id: u32) -> u32 {
    RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    id * 10
}

/// What `#[tokio::test]` builds for each test.
fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A minimal executor that is not Tokio: polls on this thread, parks between wakes.
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

#[test]
fn the_global_cache_serves_every_runtime_and_never_panics_outside_one() {
    let redis = Redis::start();
    let config = redis.config("runtimes").build().unwrap();

    // The first test initialises the global cache and ends: its runtime goes away.
    test_runtime().block_on(async {
        let cache = cache_runtime::init(config).await.unwrap();
        assert_eq!(cache.mode(), Mode::Redis);
        assert_eq!(load(1).await, 10);
        assert_eq!(load(1).await, 10);
    });
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);

    // A later test on a runtime of its own: 1,000 cold callers run the body once,
    // and a key filled earlier is a hit from the first call.
    test_runtime().block_on(async {
        let callers: Vec<_> = (0..1000).map(|_| tokio::spawn(load(2))).collect();
        for c in callers {
            assert_eq!(c.await.unwrap(), 20);
        }
        assert_eq!(RUNS.load(Ordering::SeqCst), 2, "one run for key 2");
        assert_eq!(load(1).await, 10);
        assert_eq!(load(2).await, 20);
        assert_eq!(RUNS.load(Ordering::SeqCst), 2, "hits from the first call");
        let stats = cache_runtime::get_cache().stats().await.unwrap();
        assert_eq!((stats.mode, stats.errors), (Mode::Redis, 0), "no cache fault on the second runtime");
    });

    // Outside any runtime: the typed API says why, a cached function runs its
    // body (no timer to bound a Redis command with), and nothing panics.
    let cache = cache_runtime::get_cache();
    assert!(matches!(block_on(cache.get::<u32>("k")), Err(CacheError::NoRuntime)));
    let body_only =
        std::thread::spawn(|| block_on(async { (load_sync(3).await, RUNS.load(Ordering::SeqCst)) }));
    assert_eq!(body_only.join().unwrap(), (30, 3));
}

/// A cached function whose body needs no runtime, for the call made outside one.
#[cached(prefix = "runtimes_sync", ttl = 60)]
async fn load_sync(id: u32) -> u32 {
    RUNS.fetch_add(1, Ordering::SeqCst);
    id * 10
}
