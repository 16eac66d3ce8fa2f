//! Fail-safe: past its expiry, a fail-safe function's last value is served
//! when its body fails (an `Err`, a panic, the hard timeout), the body is not
//! retried before the throttle, and nothing invalidated is ever served.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::time::Duration;

use cache_runtime::{cached, Cache, CacheConfig, CacheConfigBuilder};
use support::{Redis, CURRENT};

static FAILING: AtomicBool = AtomicBool::new(false);
static RUNS: AtomicU32 = AtomicU32::new(0);

const TTL: Duration = Duration::from_millis(300);

#[cached(fail_safe = true, ttl = TTL, cache = support::current(), prefix = "quote")]
async fn quote(id: u32) -> Result<u32, String> {
    RUNS.fetch_add(1, SeqCst);
    if FAILING.load(SeqCst) {
        return Err("the origin is down".into());
    }
    Ok(id * 100 + RUNS.load(SeqCst))
}

#[cached(ttl = TTL, cache = support::current(), prefix = "plain_quote")]
async fn plain_quote(id: u32) -> Result<u32, String> {
    if FAILING.load(SeqCst) {
        return Err("the origin is down".into());
    }
    Ok(id)
}

#[cached(fail_safe = true, ttl = TTL, cache = support::current(), prefix = "panicky", skip = [fail])]
async fn panicky(id: u32, fail: bool) -> u32 {
    if fail {
        panic!("a bug in the origin client");
    }
    id
}

#[cached(fail_safe = true, ttl = TTL, cache = support::current(), prefix = "slow", skip = [hang])]
async fn slow(id: u32, hang: bool) -> u32 {
    if hang {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    id
}

/// A body that invalidates its own key while it runs, then fails (`1`), or
/// outlives the hard timeout and succeeds (`2`).
#[cached(fail_safe = true, ttl = TTL, cache = support::current(), prefix = "racing", skip = [mode])]
async fn racing(id: u32, mode: u8) -> Result<u32, String> {
    if mode > 0 {
        racing_invalidate(id).await.unwrap();
    }
    match mode {
        1 => Err("the origin is down".into()),
        2 => {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Ok(99)
        }
        _ => Ok(id),
    }
}

static CONTESTED_RUNS: AtomicU32 = AtomicU32::new(0);

/// Fails; with `meanwhile`, only once that other instance has filled the key afresh.
#[cached(fail_safe = true, ttl = TTL, cache = support::current(), prefix = "contested", skip = [fail, meanwhile])]
async fn contested(id: u32, fail: bool, meanwhile: Option<Cache>) -> Result<u32, String> {
    let run = CONTESTED_RUNS.fetch_add(1, SeqCst) + 1;
    if let Some(other) = meanwhile {
        CURRENT.scope(other, contested_elsewhere(id)).await?;
    }
    if fail {
        return Err("the origin is down".into());
    }
    Ok(id * 100 + run)
}

/// `contested` as another instance runs it: the same prefix, so the same keys.
#[cached(fail_safe = true, ttl = TTL, cache = support::current(), prefix = "contested")]
async fn contested_elsewhere(id: u32) -> Result<u32, String> {
    Ok(id * 100 + CONTESTED_RUNS.fetch_add(1, SeqCst) + 1)
}

async fn cache(redis: &Redis) -> Cache {
    let config = redis
        .config("fail_safe")
        .fail_safe_max(Duration::from_secs(30))
        .fail_safe_throttle(Duration::from_millis(400))
        .hard_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    Cache::new(config).await.unwrap()
}

// One test: the functions share the statics above.
#[tokio::test]
async fn the_last_value_is_served_when_the_body_fails_and_never_after_an_invalidation() {
    let redis = Redis::start();
    let cache = cache(&redis).await;
    CURRENT
        .scope(cache.clone(), async {
            let first = quote(1).await.unwrap();
            tokio::time::sleep(TTL + Duration::from_millis(100)).await;

            // Expired, and the origin fails: the last value, counted.
            FAILING.store(true, SeqCst);
            let runs = RUNS.load(SeqCst);
            assert_eq!(quote(1).await, Ok(first));
            assert_eq!(RUNS.load(SeqCst), runs + 1, "the body was tried");
            assert_eq!(cache.stats().await.unwrap().stale_served, 1);
            // Within the throttle the body is not tried again.
            assert_eq!(quote(1).await, Ok(first));
            assert_eq!(RUNS.load(SeqCst), runs + 1, "throttled");
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(quote(1).await, Ok(first));
            assert_eq!(RUNS.load(SeqCst), runs + 2, "tried again after the throttle");

            // The control: a function without fail-safe gives the error.
            assert_eq!(plain_quote(2).await, Err("the origin is down".into()));
            FAILING.store(false, SeqCst);
            assert_eq!(plain_quote(2).await, Ok(2));

            // An invalidation removes the last value: the error is served, not the old value.
            FAILING.store(true, SeqCst);
            quote_invalidate(1).await.unwrap();
            assert_eq!(quote(1).await, Err("the origin is down".into()));
            FAILING.store(false, SeqCst);
            assert_ne!(quote(1).await, Ok(first), "a fresh value");

            // A panic and the hard timeout serve the last value too.
            assert_eq!(panicky(3, false).await, 3);
            assert_eq!(slow(4, false).await, 4);
            tokio::time::sleep(TTL + Duration::from_millis(100)).await;
            assert_eq!(panicky(3, true).await, 3);
            let started = std::time::Instant::now();
            assert_eq!(slow(4, true).await, 4);
            assert!(started.elapsed() < Duration::from_secs(10), "cut off at the hard timeout");
            assert_eq!(cache.stats().await.unwrap().stale_served, 4);

            // Written back for the throttle, then expired again: a plain `get` sees it missing.
            assert_eq!(cache.get::<u32>(&slow_key(4)).await.unwrap(), Some(4));
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(cache.get::<u32>(&slow_key(4)).await.unwrap(), None);
            // Invalidated while the body runs: the last value is not served,
            // the body's own result is, even past the hard timeout.
            assert_eq!(racing(5, 0).await, Ok(5));
            tokio::time::sleep(TTL + Duration::from_millis(100)).await;
            assert_eq!(racing(5, 1).await, Err("the origin is down".into()));
            assert_eq!(racing(5, 0).await, Ok(5));
            tokio::time::sleep(TTL + Duration::from_millis(100)).await;
            assert_eq!(racing(5, 2).await, Ok(99));
            assert_eq!(
                cache.stats().await.unwrap().stale_served,
                4,
                "no last value served after an invalidation"
            );
        })
        .await;
}

/// The last value written back after a failure never replaces a value another
/// instance filled while the body ran (there is no fleet lease to keep it from
/// running its own body, as with `fleet_lease` off, or a lease given up on);
/// also where entries are signed, sealed, and big (a pointer to a body).
#[tokio::test]
async fn a_written_back_last_value_never_replaces_a_newer_fill() {
    let redis = Redis::start();
    let plain = |b: CacheConfigBuilder| b;
    let sealed_big = |b: CacheConfigBuilder| {
        b.signing_key("fail-safe-signing-secret")
            .encryption_keys([("k1", "fail-safe-sealing-secret")])
            .sensitive_prefixes(["contested"])
            .big_value_bytes(8)
    };
    for (round, shape) in [plain, sealed_big].into_iter().enumerate() {
        let prefix = support::unique_prefix("contested");
        let config = || {
            let b =
                CacheConfig::builder().redis_url(redis.url()).key_prefix(prefix.clone()).fleet_lease(false);
            shape(b.fail_safe_throttle(Duration::from_secs(5))).build().unwrap()
        };
        let here = Cache::new(config()).await.unwrap();
        let there = Cache::new(config()).await.unwrap();
        let (id, control) = (round as u32 * 10 + 1, round as u32 * 10 + 2);
        CURRENT
            .scope(here.clone(), async {
                assert_eq!(contested_key(id), contested_elsewhere_key(id));
                let first = contested(id, false, None).await.unwrap();
                let second = contested(control, false, None).await.unwrap();
                tokio::time::sleep(TTL + Duration::from_millis(100)).await;

                // The control: with no fill meanwhile the last value is written
                // back, and read as live within the throttle.
                assert_eq!(contested(control, true, None).await, Ok(second));
                let back = there.get::<u32>(&contested_key(control)).await.unwrap();
                assert_eq!(back, Some(second), "written back (round {round})");

                // The other instance fills while this one's body runs and fails: the
                // caller here gets the last value it read, and Redis keeps the newer one.
                assert_eq!(contested(id, true, Some(there.clone())).await, Ok(first));
                let fresh = there.get::<u32>(&contested_key(id)).await.unwrap();
                assert!(fresh.is_some_and(|v| v != first), "round {round}: {fresh:?} replaced by {first}");
                assert_eq!(contested(id, true, None).await, Ok(fresh.unwrap()), "a hit on the newer value");
                assert_eq!(here.stats().await.unwrap().stale_served, 2);
            })
            .await;
    }
}
