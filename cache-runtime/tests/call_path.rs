//! The call path: failures that don't stampede, flights that hold nothing after
//! they end, and `get_with` / `try_get_with` with the macro's guarantees.

mod support;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cache_runtime::{cached, Cache};
use serde::{Deserialize, Serialize, Serializer};
use support::{both_modes, Redis, CURRENT};
use tokio::sync::{Barrier, Notify};

/// A database error the caller can clone: the flight shares it.
#[derive(Debug, Clone, PartialEq)]
struct DbDown(String);

/// An error that can't be cloned: callers take turns.
#[derive(Debug)]
struct Opaque;

/// Counts body runs and the most that ran at once.
#[derive(Default)]
struct Runs {
    total: AtomicU32,
    running: AtomicUsize,
    most: AtomicUsize,
}

impl Runs {
    async fn run(&self, time: Duration) {
        self.total.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(time).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
    }

    fn reset(&self) {
        self.total.store(0, Ordering::SeqCst);
        self.most.store(0, Ordering::SeqCst);
    }
}

static SHARED_ERR: Runs =
    Runs { total: AtomicU32::new(0), running: AtomicUsize::new(0), most: AtomicUsize::new(0) };
static OPAQUE_ERR: Runs =
    Runs { total: AtomicU32::new(0), running: AtomicUsize::new(0), most: AtomicUsize::new(0) };
static UNENCODABLE: Runs =
    Runs { total: AtomicU32::new(0), running: AtomicUsize::new(0), most: AtomicUsize::new(0) };

#[cached(cache = support::current(), prefix = "failing")]
async fn failing(id: u32) -> Result<u32, DbDown> {
    SHARED_ERR.run(Duration::from_millis(50)).await;
    Err(DbDown(format!("db down for {id}")))
}

#[cached(cache = support::current(), prefix = "opaque")]
async fn opaque(id: u32) -> Result<u32, Opaque> {
    OPAQUE_ERR.run(Duration::from_millis(2)).await;
    let _ = id;
    Err(Opaque)
}

/// A value whose encoding always fails.
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Unencodable(u32);

impl Serialize for Unencodable {
    fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("refuses to be encoded"))
    }
}

#[cached(cache = support::current(), prefix = "unencodable")]
async fn unencodable(id: u32) -> Unencodable {
    UNENCODABLE.run(Duration::from_millis(50)).await;
    Unencodable(id)
}

async fn scoped<F: std::future::Future>(cache: &Cache, f: F) -> F::Output {
    CURRENT.scope(cache.clone(), f).await
}

/// Runs `n` calls at once, each a task of its own that sees `cache` as current.
async fn concurrently<F, Fut>(cache: &Cache, n: usize, call: F) -> Vec<Fut::Output>
where
    F: Fn() -> Fut,
    Fut: std::future::Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(CURRENT.scope(cache.clone(), call()))).collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn two_hundred_callers_of_a_failing_key_run_it_once_when_the_error_can_be_shared() {
    let redis = Redis::start();
    for cache in both_modes(&redis, "failing").await {
        SHARED_ERR.reset();
        let results = concurrently(&cache, 200, || failing(1)).await;
        assert!(results.iter().all(|r| *r == Err(DbDown("db down for 1".into()))));
        assert_eq!(SHARED_ERR.total.load(Ordering::SeqCst), 1, "{:?}", cache.mode());
        // Nothing was stored: the next caller runs the body again.
        assert!(scoped(&cache, failing(1)).await.is_err());
        assert_eq!(SHARED_ERR.total.load(Ordering::SeqCst), 2);
    }
}

#[tokio::test]
async fn an_error_that_cant_be_shared_runs_one_caller_at_a_time() {
    let redis = Redis::start();
    for cache in both_modes(&redis, "opaque").await {
        OPAQUE_ERR.reset();
        let results = concurrently(&cache, 200, || opaque(1)).await;
        assert!(results.iter().all(Result::is_err));
        // Each caller needs an error of its own, so each runs the body, but never
        // two at once: a failing database sees one query for the key, not a herd.
        assert_eq!(OPAQUE_ERR.total.load(Ordering::SeqCst), 200);
        assert_eq!(OPAQUE_ERR.most.load(Ordering::SeqCst), 1, "{:?}", cache.mode());
    }
}

#[tokio::test]
async fn a_result_that_cant_be_stored_is_shared_when_it_can_be_cloned() {
    let redis = Redis::start();
    for cache in both_modes(&redis, "unencodable").await {
        UNENCODABLE.reset();
        let results = concurrently(&cache, 200, || unencodable(3)).await;
        assert!(results.iter().all(|v| *v == Unencodable(3)));
        assert_eq!(UNENCODABLE.total.load(Ordering::SeqCst), 1, "{:?}", cache.mode());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_with_runs_a_cold_key_once_for_a_thousand_callers() {
    let redis = Redis::start();
    for cache in both_modes(&redis, "get_with").await {
        let runs = Arc::new(AtomicU32::new(0));
        let start = Arc::new(Barrier::new(1000));
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let (cache, runs, start) = (cache.clone(), runs.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    let load = async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        vec![7u64; 3]
                    };
                    cache.get_with("cold", load).ttl(60).tags(["cold"]).await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), vec![7; 3]);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{:?}", cache.mode());
        // A hit now, readable by the typed API under the same key.
        assert_eq!(cache.get::<Vec<u64>>("cold").await.unwrap(), Some(vec![7; 3]));
        let again = cache.get_with("cold", async { vec![0u64] }).await;
        assert_eq!(again, vec![7; 3]);
        // Tagged: invalidating the tag removes it.
        assert_eq!(cache.invalidate_tags(["cold"]).await.unwrap(), 1);
        assert_eq!(cache.get::<Vec<u64>>("cold").await.unwrap(), None);
    }
}

#[tokio::test]
async fn try_get_with_shares_one_error_among_the_callers_that_waited() {
    let redis = Redis::start();
    for cache in both_modes(&redis, "try_get_with").await {
        let runs = Arc::new(AtomicU32::new(0));
        let results = concurrently(&cache, 200, || {
            let (cache, runs) = (cache.clone(), runs.clone());
            async move {
                let flaky = async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err::<u32, _>(Opaque)
                };
                cache.try_get_with("flaky", flaky).await
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let first = results[0].as_ref().unwrap_err();
        assert!(results.iter().all(|r| Arc::ptr_eq(r.as_ref().unwrap_err(), first)));
        // An Ok is stored and read back; the condition can refuse one.
        assert_eq!(cache.try_get_with("flaky", async { Ok::<_, Opaque>(5u32) }).await.unwrap(), 5);
        assert_eq!(cache.get::<u32>("flaky").await.unwrap(), Some(5));
        let refused = cache.try_get_with("big", async { Ok::<_, Opaque>(1_000u32) }).condition(|v| *v < 100);
        assert_eq!(refused.await.unwrap(), 1_000);
        assert_eq!(cache.get::<u32>("big").await.unwrap(), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_with_refuses_a_fill_computed_before_an_invalidation() {
    let redis = Redis::start();
    let reader = redis.cache("get_with_fence", support::FORMATS[0]).await;
    let writer = Cache::new(
        redis.config("unused").key_prefix(reader.config().key_prefix().to_owned()).build().unwrap(),
    )
    .await
    .unwrap();
    for (i, how) in ["key", "tag", "pattern", "clear"].into_iter().enumerate() {
        let key = format!("fenced:{i}");
        let (read, proceed) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let fill = {
            let (reader, key, read, proceed) = (reader.clone(), key.clone(), read.clone(), proceed.clone());
            tokio::spawn(async move {
                let old = async move {
                    read.notify_one();
                    proceed.notified().await;
                    1u32
                };
                reader.get_with(&key, old).tags(["fenced"]).await
            })
        };
        read.notified().await;
        match how {
            "key" => drop(writer.delete(&key).await.unwrap()),
            "tag" => drop(writer.invalidate_tags(["fenced"]).await.unwrap()),
            "pattern" => drop(writer.delete_pattern("fenced:*").await.unwrap()),
            _ => drop(writer.clear().await.unwrap()),
        }
        proceed.notify_one();
        // The caller gets its own value; the cache does not keep it.
        assert_eq!(fill.await.unwrap(), 1);
        assert_eq!(reader.get::<u32>(&key).await.unwrap(), None, "invalidated by {how}");
        assert_eq!(reader.get_with(&key, async { 2u32 }).await, 2);
    }
    assert!(reader.stats().await.unwrap().fills_refused >= 4);
}

#[tokio::test]
async fn get_with_returns_the_bodys_value_when_redis_is_gone() {
    let mut redis = Redis::spawn();
    let cache = Cache::new(
        redis.config("get_with_fault").operation_timeout(Duration::from_millis(100)).build().unwrap(),
    )
    .await
    .unwrap();
    redis.kill();
    for i in 0..20u32 {
        assert_eq!(cache.get_with(&format!("k{i}"), async move { i * 2 }).await, i * 2);
        assert_eq!(
            cache.try_get_with("e", async { Err::<u32, _>(DbDown("x".into())) }).await.unwrap_err().0,
            "x"
        );
    }
}

/// A key argument that counts how often it is serialized into a key or a tag.
#[derive(Debug)]
struct Counted(u32);

static SERIALIZED: AtomicU32 = AtomicU32::new(0);

impl Serialize for Counted {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        SERIALIZED.fetch_add(1, Ordering::SeqCst);
        s.serialize_u32(self.0)
    }
}

#[cached(cache = support::current(), prefix = "counted", tags = ["counted:{id}", "all:{id}"])]
async fn counted(id: Counted) -> u32 {
    id.0
}

#[tokio::test]
async fn a_hit_builds_no_tags() {
    let cache = support::local_cache("counted", support::FORMATS[0]);
    scoped(&cache, async {
        SERIALIZED.store(0, Ordering::SeqCst);
        assert_eq!(counted(Counted(4)).await, 4);
        // The key, then the two tags of the fill.
        assert_eq!(SERIALIZED.load(Ordering::SeqCst), 3);
        assert_eq!(counted(Counted(4)).await, 4);
        // A hit builds the key only.
        assert_eq!(SERIALIZED.load(Ordering::SeqCst), 4);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_is_not_shared_with_a_caller_that_started_after_an_invalidation() {
    let redis = Redis::start();
    for cache in both_modes(&redis, "shared_after_invalidation").await {
        let (in_body, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let leader = {
            let (cache, in_body, release) = (cache.clone(), in_body.clone(), release.clone());
            tokio::spawn(async move {
                let old = async move {
                    in_body.notify_one();
                    release.notified().await;
                    Err::<u32, _>("computed before the update")
                };
                cache.try_get_with("user:7", old).await.map_err(|e| *e)
            })
        };
        in_body.notified().await;
        cache.delete("user:7").await.unwrap();
        // Starts after the invalidation returned, and joins the leader's flight.
        let late = {
            let cache = cache.clone();
            tokio::spawn(async move {
                let new = async { Err::<u32, _>("computed after the update") };
                cache.try_get_with("user:7", new).await.map_err(|e| *e)
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.notify_one();
        assert_eq!(leader.await.unwrap(), Err("computed before the update"));
        assert_eq!(late.await.unwrap(), Err("computed after the update"), "{:?}", cache.mode());
    }
}
