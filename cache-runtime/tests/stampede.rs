//! The cache-aside path under concurrency: one body run per cold key, leaders
//! that vanish, and fills that lose to an invalidation.

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cache_runtime::__private::{
    always, get_or_compute, Attached, Cacheable, Call, KeyBuilder, OkOnly, Plain, Sharing, Spec, Tags,
};
use cache_runtime::Cache;
use support::{local_cache, Redis, FORMATS};
use tokio::sync::{Barrier, Notify};

const SPEC: Spec = Spec::named("load").with_prefix("load");

fn call(cache: &Cache, id: u32) -> Call<'_> {
    let mut key = KeyBuilder::new(cache, &SPEC);
    key.arg(&id);
    Call { cache, spec: &SPEC, key: key.finish() }
}

async fn load(cache: &Cache, id: u32, runs: &AtomicU32, delay: Duration) -> u64 {
    compute::<Plain, _>(cache, id, async move {
        runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        u64::from(id) * 10
    })
    .await
}

/// The engine on key `id`, tagged `load`, sharing nothing: what a `#[cached]`
/// function expands to, with `body` as its body.
async fn compute<M, Out: Cacheable<M>>(cache: &Cache, id: u32, body: impl Future<Output = Out>) -> Out {
    let miss = move || (Tags::Static(&["load"]), body);
    get_or_compute::<M, Out, _, _, _, _>(
        call(cache, id),
        always,
        Sharing::none(),
        Sharing::none(),
        Attached,
        miss,
    )
    .await
}

/// A body that says it runs, then waits for `release` before returning `value`.
async fn paused(in_body: Arc<Notify>, release: Arc<Notify>, value: String) -> String {
    in_body.notify_one();
    release.notified().await;
    value
}

async fn caches(redis: &Redis, name: &str) -> Vec<Cache> {
    vec![redis.cache(name, FORMATS[0]).await, local_cache(name, FORMATS[1])]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_callers_of_a_cold_key_run_the_body_once() {
    let redis = Redis::start();
    for cache in caches(&redis, "stampede").await {
        let runs = Arc::new(AtomicU32::new(0));
        let start = Arc::new(Barrier::new(1000));
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let (cache, runs, start) = (cache.clone(), runs.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    load(&cache, 7, &runs, Duration::from_millis(50)).await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 70);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{:?}", cache.mode());
        assert_eq!(load(&cache, 7, &runs, Duration::ZERO).await, 70);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_leader_hands_over_to_a_follower() {
    let redis = Redis::start();
    for cache in caches(&redis, "cancel").await {
        let runs = Arc::new(AtomicU32::new(0));
        let leader = {
            let (cache, runs) = (cache.clone(), runs.clone());
            tokio::spawn(async move { load(&cache, 1, &runs, Duration::from_secs(30)).await })
        };
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let followers: Vec<_> = (0..20)
            .map(|_| {
                let (cache, runs) = (cache.clone(), runs.clone());
                tokio::spawn(async move { load(&cache, 1, &runs, Duration::from_millis(20)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let results = tokio::time::timeout(Duration::from_secs(5), async move {
            let mut out = Vec::new();
            for f in followers {
                out.push(f.await.unwrap());
            }
            out
        })
        .await
        .expect("followers hung after the leader was cancelled");
        assert!(results.iter().all(|&v| v == 10));
        assert_eq!(runs.load(Ordering::SeqCst), 2, "exactly one follower took over");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_leader_hands_over_and_leaves_no_lock() {
    let redis = Redis::start();
    for cache in caches(&redis, "panic").await {
        let runs = Arc::new(AtomicU32::new(0));
        let entered = Arc::new(Notify::new());
        let leader = {
            let (cache, entered) = (cache.clone(), entered.clone());
            tokio::spawn(async move {
                compute::<Plain, _>(&cache, 2, async move {
                    entered.notify_one();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    panic!("the body failed");
                    #[allow(unreachable_code)]
                    0u64
                })
                .await
            })
        };
        entered.notified().await;
        let follower = {
            let (cache, runs) = (cache.clone(), runs.clone());
            tokio::spawn(async move { load(&cache, 2, &runs, Duration::ZERO).await })
        };
        assert!(leader.await.unwrap_err().is_panic());
        let v = tokio::time::timeout(Duration::from_secs(5), follower).await.expect("follower hung").unwrap();
        assert_eq!(v, 20);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_computed_before_an_invalidation_is_refused() {
    let redis = Redis::start();
    for cache in caches(&redis, "stale").await {
        for invalidate in ["key", "tag", "pattern", "clear"] {
            let in_body = Arc::new(Notify::new());
            let release = Arc::new(Notify::new());
            let reader = {
                let (cache, in_body, release) = (cache.clone(), in_body.clone(), release.clone());
                tokio::spawn(async move {
                    compute::<Plain, _>(&cache, 3, paused(in_body, release, "read before the update".into()))
                        .await
                })
            };
            in_body.notified().await;
            let key = call(&cache, 3).key.into_relative();
            match invalidate {
                "key" => drop(cache.delete(&key).await.unwrap()),
                "tag" => drop(cache.invalidate_tags(["load"]).await.unwrap()),
                "pattern" => drop(cache.delete_pattern("load:*").await.unwrap()),
                _ => drop(cache.clear().await.unwrap()),
            }
            release.notify_one();
            assert_eq!(reader.await.unwrap(), "read before the update");
            assert_eq!(
                cache.get::<String>(&key).await.unwrap(),
                None,
                "{:?} {invalidate}: stale fill landed",
                cache.mode()
            );
        }
        assert!(cache.stats().await.unwrap().fills_refused >= 4);
    }
}

#[tokio::test]
async fn errors_pass_through_and_are_not_stored() {
    let redis = Redis::start();
    for cache in caches(&redis, "errors").await {
        let runs = &AtomicU32::new(0);
        for _ in 0..3 {
            let r: Result<u32, String> = compute::<OkOnly, _>(&cache, 4, async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Err("db down".to_owned())
            })
            .await;
            assert_eq!(r.unwrap_err(), "db down");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_by_another_process_refuses_the_fill() {
    let redis = Redis::start();
    let reader = redis.cache("xproc", FORMATS[0]).await;
    let config = cache_runtime::CacheConfig::builder()
        .redis_url(redis.url())
        .key_prefix(reader.config().key_prefix())
        .build()
        .unwrap();
    let writer = Cache::new(config).await.unwrap();
    for round in 0..3 {
        let in_body = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let task = {
            let (reader, in_body, release) = (reader.clone(), in_body.clone(), release.clone());
            tokio::spawn(async move {
                compute::<Plain, _>(&reader, 5, paused(in_body, release, format!("stale {round}"))).await
            })
        };
        in_body.notified().await;
        writer.invalidate_tags(["load"]).await.unwrap();
        release.notify_one();
        task.await.unwrap();
        let key = call(&reader, 5).key.into_relative();
        assert_eq!(writer.get::<String>(&key).await.unwrap(), None, "round {round}: a stale fill landed");
    }
    // The refusals taught the reader the current epoch: its next fill lands.
    let runs = AtomicU32::new(0);
    load(&reader, 5, &runs, Duration::ZERO).await;
    let key = call(&reader, 5).key.into_relative();
    assert_eq!(writer.get::<u64>(&key).await.unwrap(), Some(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_starting_after_an_invalidation_never_gets_the_older_flight_value() {
    let redis = Redis::start();
    for cache in caches(&redis, "follower_stale").await {
        let in_body = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let leader = {
            let (cache, in_body, release) = (cache.clone(), in_body.clone(), release.clone());
            tokio::spawn(async move {
                compute::<Plain, _>(&cache, 6, paused(in_body, release, "computed before the update".into()))
                    .await
            })
        };
        in_body.notified().await;
        cache.invalidate_tags(["load"]).await.unwrap();
        // Starts after the invalidation returned, while the old flight is still running.
        let late = {
            let cache = cache.clone();
            tokio::spawn(async move {
                compute::<Plain, _>(&cache, 6, async { "computed after the update".to_owned() }).await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.notify_one();
        assert_eq!(leader.await.unwrap(), "computed before the update");
        assert_eq!(late.await.unwrap(), "computed after the update", "{:?}", cache.mode());
    }
}
