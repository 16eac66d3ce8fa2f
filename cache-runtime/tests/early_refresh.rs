//! Bodies that run in a task of their own: early refresh keeps a hot key
//! hitting across its expiries, and a soft timeout serves the last value
//! while a slow body goes on and fills. Neither lets an invalidation be undone.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use cache_runtime::{cached, Cache};
use support::{eventually, Redis, CURRENT};

static HOT_RUNS: AtomicU32 = AtomicU32::new(0);
static CONTROL_RUNS: AtomicU32 = AtomicU32::new(0);

#[cached(early_refresh = true, ttl = 1, cache = support::current(), prefix = "hot")]
async fn hot(id: u32) -> u32 {
    HOT_RUNS.fetch_add(1, SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
    id
}

#[cached(ttl = 1, cache = support::current(), prefix = "hot_control")]
async fn hot_control(id: u32) -> u32 {
    CONTROL_RUNS.fetch_add(1, SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
    id
}

async fn early_cache(redis: &Redis) -> Cache {
    Cache::new(redis.config("early").early_refresh_beta(2.0).build().unwrap()).await.unwrap()
}

/// Calls `call` from `callers` tasks for `period`: how many of those calls missed.
async fn hammer<F, Fut>(cache: &Cache, callers: usize, period: Duration, call: F) -> u64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = u32> + Send,
{
    let before = cache.stats().await.unwrap().misses;
    let until = Instant::now() + period;
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (cache, call) = (cache.clone(), call.clone());
            tokio::spawn(CURRENT.scope(cache, async move {
                while Instant::now() < until {
                    assert_eq!(call().await, 7);
                }
            }))
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    cache.stats().await.unwrap().misses - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_is_refreshed_before_it_expires_and_no_caller_waits_for_its_body() {
    let redis = Redis::start();
    let cache = early_cache(&redis).await;
    let period = Duration::from_millis(3500);

    CURRENT.scope(cache.clone(), hot(7)).await;
    let waited = hammer(&cache, 8, period, || hot(7)).await;
    let stats = cache.stats().await.unwrap();
    let refreshes = stats.early_refreshes;
    assert_eq!(waited, 0, "callers that waited for the body after the first fill");
    assert!(refreshes >= 3, "one refresh per 1 s expiry over 3.5 s, got {refreshes}");
    // A refresh whose fill Redis took but answered late (a loaded machine) ran
    // its body uncounted: an error stands for it.
    let runs = HOT_RUNS.load(SeqCst) as u64;
    assert!(
        (1 + refreshes..=1 + refreshes + stats.errors).contains(&runs),
        "the body ran for the first fill and each refresh: {runs} runs, {refreshes} refreshes, {} errors",
        stats.errors
    );

    // The control: the same key without early refresh misses at every expiry.
    CURRENT.scope(cache.clone(), hot_control(7)).await;
    let waited = hammer(&cache, 8, period, || hot_control(7)).await;
    assert!(waited >= 3, "the control waited at each expiry, got {waited}");
    assert!(CONTROL_RUNS.load(SeqCst) >= 4);
}

static VERSION: AtomicU32 = AtomicU32::new(0);
static IN_BODY: AtomicBool = AtomicBool::new(false);

/// A slow body reading `VERSION` when it starts.
#[cached(early_refresh = true, ttl = 2, cache = support::current(), prefix = "versioned")]
async fn versioned(id: u32) -> u32 {
    let version = VERSION.load(SeqCst);
    IN_BODY.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    id * 100 + version
}

#[tokio::test]
async fn a_refresh_that_read_before_an_invalidation_is_refused() {
    let redis = Redis::start();
    let cache = early_cache(&redis).await;
    CURRENT
        .scope(cache.clone(), async {
            assert_eq!(versioned(1).await, 100);
            IN_BODY.store(false, SeqCst);
            // Hits until one starts a refresh (400 ms bodies make it due early).
            while !IN_BODY.load(SeqCst) {
                assert_eq!(versioned(1).await, 100);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The data changes while the refresh's body runs on what it read before.
            VERSION.store(1, SeqCst);
            versioned_invalidate(1).await.unwrap();
            eventually("the refresh's fill is refused", || async {
                cache.stats().await.unwrap().fills_refused == 1
            })
            .await;
            assert_eq!(versioned(1).await, 101, "the value after the invalidation, not the refresh's");
            assert_eq!(cache.stats().await.unwrap().early_refreshes, 0, "no refresh landed");
        })
        .await;
}

static SLOW: AtomicBool = AtomicBool::new(false);
static SOFT_RUNS: AtomicU32 = AtomicU32::new(0);
static CONTROL_SOFT_RUNS: AtomicU32 = AtomicU32::new(0);

const SHORT: Duration = Duration::from_millis(300);

#[cached(soft_timeout = Duration::from_millis(100), ttl = SHORT, cache = support::current(), prefix = "soft")]
async fn soft(id: u32) -> u32 {
    let run = SOFT_RUNS.fetch_add(1, SeqCst) + 1;
    if SLOW.load(SeqCst) {
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    id * 100 + run
}

#[cached(fail_safe = true, ttl = SHORT, cache = support::current(), prefix = "soft_control")]
async fn soft_control(id: u32) -> u32 {
    let run = CONTROL_SOFT_RUNS.fetch_add(1, SeqCst) + 1;
    if SLOW.load(SeqCst) {
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    id * 100 + run
}

/// Invalidates its own key (through `race`: the background task has no
/// test scope), then outlives the soft timeout.
#[cached(soft_timeout = Duration::from_millis(100), ttl = SHORT, cache = support::current(), prefix = "soft_racing", skip = [race])]
async fn soft_racing(id: u32, race: Option<(Cache, String)>) -> u32 {
    if let Some((cache, key)) = race {
        cache.delete(&key).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        return 99;
    }
    id
}

// One test: the functions share `SLOW`.
#[tokio::test]
async fn past_the_soft_timeout_the_last_value_is_served_and_the_body_fills_in_the_background() {
    let redis = Redis::start();
    let config = redis
        .config("soft")
        .fail_safe_throttle(Duration::from_secs(10))
        .fail_safe_max(Duration::from_secs(30));
    let cache = Cache::new(config.build().unwrap()).await.unwrap();
    CURRENT
        .scope(cache.clone(), async {
            assert_eq!(soft(1).await, 101);
            assert_eq!(soft_control(1).await, 101);
            assert_eq!(soft_racing(1, None).await, 1);
            tokio::time::sleep(SHORT + Duration::from_millis(100)).await;

            SLOW.store(true, SeqCst);
            assert_eq!(soft(1).await, 101, "the last value, at the soft timeout");
            let stats = cache.stats().await.unwrap();
            assert_eq!((stats.soft_timeouts, stats.stale_served), (1, 1));
            // Meanwhile other callers get it too, and start no second body.
            for _ in 0..5 {
                assert_eq!(soft(1).await, 101);
            }
            assert_eq!(SOFT_RUNS.load(SeqCst), 2);
            // The body went on and filled: its value is a hit.
            eventually("the background body fills", || async { soft(1).await == 102 }).await;
            assert_eq!(SOFT_RUNS.load(SeqCst), 2, "its value came from the background body");

            // The control: a fail-safe function without a soft timeout waits for its body.
            assert_eq!(soft_control(1).await, 102);
            assert_eq!(cache.stats().await.unwrap().soft_timeouts, 1);

            // Invalidated while the body runs: the last value is not served, the body's result is.
            let race = Some((cache.clone(), soft_racing_key(1)));
            assert_eq!(soft_racing(1, race).await, 99);
            let stats = cache.stats().await.unwrap();
            assert_eq!(
                (stats.soft_timeouts, stats.stale_served),
                (1, 1),
                "no last value after an invalidation"
            );
        })
        .await;
}

static CANCELLED_DONE: AtomicBool = AtomicBool::new(false);
static CANCELLED_SLOW: AtomicBool = AtomicBool::new(false);

#[cached(soft_timeout = Duration::from_millis(200), ttl = SHORT, cache = support::current(), prefix = "cancelled")]
async fn cancelled(id: u32) -> u32 {
    if CANCELLED_SLOW.load(SeqCst) {
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    CANCELLED_DONE.store(true, SeqCst);
    id
}

#[tokio::test]
async fn a_call_cancelled_before_its_soft_timeout_stops_its_body() {
    let redis = Redis::start();
    let cache = Cache::new(redis.config("cancelled").build().unwrap()).await.unwrap();
    CURRENT
        .scope(cache.clone(), async {
            assert_eq!(cancelled(1).await, 1);
            assert!(CANCELLED_DONE.swap(false, SeqCst), "the control: a body that is let run ends");
            tokio::time::sleep(SHORT + Duration::from_millis(100)).await;
            CANCELLED_SLOW.store(true, SeqCst);
            // Dropped while it waits, before the soft timeout: as with any call, the body stops.
            assert!(tokio::time::timeout(Duration::from_millis(50), cancelled(1)).await.is_err());
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert!(!CANCELLED_DONE.load(SeqCst), "the body ran on after its call was dropped");
        })
        .await;
}
