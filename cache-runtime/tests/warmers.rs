//! Warmers at start: they run in the background while `health` says not
//! ready, a failing or panicking one stops nothing, and `warmup_enabled: false`
//! runs none.

mod support;

use std::sync::Arc;
use std::time::Duration;

use cache_runtime::{Cache, CacheError, Warmers};
use support::{eventually, Redis};
use tokio::sync::Notify;

fn warmers(gate: Arc<Notify>) -> Warmers {
    Warmers::new()
        .add("missions", |cache: Cache| async move {
            cache.warm((0..50u32).map(|i| (format!("missions:{i}"), i)), None, &["missions"]).await
        })
        .add("broken", |_| async { Err(CacheError::InvalidArgument("the database is down".into())) })
        .add("buggy", |_| async {
            if "a bug".len() == 5 {
                panic!("a bug in a warmer");
            }
            Ok(0)
        })
        .add("slow", move |cache: Cache| {
            let gate = gate.clone();
            async move {
                gate.notified().await;
                cache.warm([("late", 7u32)], None, &[]).await
            }
        })
}

#[tokio::test]
async fn warmers_run_at_start_and_readiness_waits_for_the_last_one() {
    let redis = Redis::start();
    for redis_mode in [true, false] {
        let gate = Arc::new(Notify::new());
        let builder =
            if redis_mode { redis.config("warmers") } else { cache_runtime::CacheConfig::builder() };
        let config = builder.key_prefix(support::unique_prefix("warmers")).warmup(10, 2).build().unwrap();
        let cache = Cache::new_with_warmers(config, warmers(gate.clone())).await.unwrap();

        // Serving at once, while not ready.
        assert!(!cache.health().await.ready);
        cache.set("now", &1u32).await.unwrap();
        eventually("the missions warmer", || async {
            cache.get::<u32>("missions:49").await.unwrap() == Some(49)
        })
        .await;
        assert!(!cache.health().await.ready, "the slow warmer still runs");

        // The failing and the panicking warmers stopped nothing; the slow one finishes.
        gate.notify_one();
        eventually("readiness", || async { cache.health().await.ready }).await;
        assert_eq!(cache.get::<u32>("late").await.unwrap(), Some(7));
        assert_eq!(cache.invalidate_tags(["missions"]).await.unwrap(), 50);
        assert_eq!(cache.health().await.status, "healthy");
    }
}

#[tokio::test]
async fn warmup_disabled_runs_no_warmer_and_is_ready_at_once() {
    let redis = Redis::start();
    let config = redis.config("nowarm").warmup_enabled(false).build().unwrap();
    let cache = Cache::new_with_warmers(config, warmers(Arc::new(Notify::new()))).await.unwrap();
    assert!(cache.health().await.ready);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(cache.get::<u32>("missions:0").await.unwrap(), None);
}
