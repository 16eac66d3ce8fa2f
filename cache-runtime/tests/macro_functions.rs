//! `#[cached]` on free functions: the seeds' mission, agent and policy systems.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use cache_runtime::{cached, Cache, CacheError};
use serde::{Deserialize, Serialize};
use support::{both_modes, Redis, CURRENT};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Mission {
    id: String,
    status: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PolicyResult {
    allowed: bool,
    reason: String,
}

tokio::task_local! {
    static RUNS: Arc<AtomicU32>;
}

fn ran() {
    RUNS.with(|r| r.fetch_add(1, Ordering::SeqCst));
}

fn runs() -> u32 {
    RUNS.with(|r| r.load(Ordering::SeqCst))
}

#[cached(cache = support::current(), ttl = 60, prefix = "missions", tags = ["missions", "mission:{mission_id}"])]
async fn get_mission(mission_id: String) -> Mission {
    ran();
    Mission { id: mission_id, status: "active".into() }
}

#[cached(cache = support::current(), ttl = 600, key_prefix = "agents", tags = ["agents"])]
async fn get_agent_config(agent_id: u32) -> Result<HashMap<String, String>, String> {
    ran();
    if agent_id == 0 {
        return Err("no agent 0".into());
    }
    Ok(HashMap::from([("model".to_owned(), format!("m{agent_id}"))]))
}

#[cached(cache = support::current(), ttl = 300, prefix = "policies", tags = ["policies"])]
async fn evaluate_policy(agent_id: u32, action: String, context: HashMap<String, u32>) -> PolicyResult {
    ran();
    PolicyResult {
        allowed: context.get("level").copied().unwrap_or(0) > 2,
        reason: format!("{agent_id}:{action}"),
    }
}

#[cached(cache = support::current(), prefix = "lookup")]
async fn find_mission(name: String) -> Option<Mission> {
    ran();
    (name != "ghost").then(|| Mission { id: name, status: "found".into() })
}

#[cached(cache = support::current(), prefix = "lookup_none", cache_none = true)]
async fn find_mission_caching_none(name: String) -> Option<Mission> {
    ran();
    (name != "ghost").then(|| Mission { id: name, status: "found".into() })
}

fn valid(m: &Mission) -> bool {
    m.status == "active"
}

#[cached(cache = support::current(), prefix = "filtered", condition = valid)]
async fn get_filtered(id: String, status: String) -> Mission {
    ran();
    Mission { id, status }
}

#[cached(cache = support::current(), prefix = "scores", condition = |v: &u32| *v > 10)]
async fn score(x: u32) -> u32 {
    ran();
    x
}

#[cached(cache = support::current(), prefix = "queue", key = "{priority}:{mission_id}", tags = ["queue:{priority}"])]
async fn queued(priority: String, mission_id: u32, note: String) -> String {
    ran();
    format!("{priority}/{mission_id}/{note}")
}

/// Runs `f` once per mode with fresh counters and that mode's cache in scope.
async fn in_both_modes<F, Fut>(name: &str, f: F)
where
    F: Fn(Cache) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let redis = Redis::start();
    for cache in both_modes(&redis, name).await {
        RUNS.scope(Arc::new(AtomicU32::new(0)), CURRENT.scope(cache.clone(), f(cache))).await;
    }
}

#[tokio::test]
async fn the_second_call_is_served_from_the_cache() {
    in_both_modes("second", |cache| async move {
        let first = get_mission("m1".into()).await;
        let second = get_mission("m1".into()).await;
        assert_eq!(first, second);
        assert_eq!(runs(), 1, "{:?}", cache.mode());
        get_mission("m2".into()).await;
        assert_eq!(runs(), 2);
        assert!(cache.exists(&get_mission_key("m1".into())).await.unwrap());
    })
    .await;
}

#[tokio::test]
async fn invalidate_by_arguments_and_all() {
    in_both_modes("inval", |_| async move {
        get_mission("m1".into()).await;
        get_mission("m2".into()).await;
        assert!(get_mission_invalidate("m1".into()).await.unwrap());
        assert!(!get_mission_invalidate("m1".into()).await.unwrap());
        get_mission("m1".into()).await;
        get_mission("m2".into()).await;
        assert_eq!(runs(), 3);
        assert_eq!(get_mission_invalidate_all().await.unwrap(), 2);
        get_mission("m1".into()).await;
        get_mission("m2".into()).await;
        assert_eq!(runs(), 5);
    })
    .await;
}

#[tokio::test]
async fn tags_including_interpolated_ones_invalidate_through_the_runtime() {
    in_both_modes("tags", |cache| async move {
        get_mission("m1".into()).await;
        get_mission("m2".into()).await;
        assert_eq!(cache.invalidate_tags(["mission:m1"]).await.unwrap(), 1);
        get_mission("m2".into()).await;
        assert_eq!(runs(), 2);
        get_mission("m1".into()).await;
        assert_eq!(runs(), 3);
        assert_eq!(cache.invalidate_tags(["missions"]).await.unwrap(), 2);
        get_mission("m1".into()).await;
        assert_eq!(runs(), 4);
    })
    .await;
}

#[tokio::test]
async fn only_ok_is_stored() {
    in_both_modes("result", |_| async move {
        assert!(get_agent_config(0).await.is_err());
        assert!(get_agent_config(0).await.is_err());
        assert_eq!(runs(), 2);
        let ok = get_agent_config(5).await.unwrap();
        assert_eq!(get_agent_config(5).await.unwrap(), ok);
        assert_eq!(runs(), 3);
    })
    .await;
}

#[tokio::test]
async fn none_is_stored_only_when_asked() {
    in_both_modes("option", |_| async move {
        assert_eq!(find_mission("ghost".into()).await, None);
        assert_eq!(find_mission("ghost".into()).await, None);
        assert_eq!(runs(), 2);
        assert!(find_mission("real".into()).await.is_some());
        assert!(find_mission("real".into()).await.is_some());
        assert_eq!(runs(), 3);
        assert_eq!(find_mission_caching_none("ghost".into()).await, None);
        assert_eq!(find_mission_caching_none("ghost".into()).await, None);
        assert_eq!(runs(), 4);
    })
    .await;
}

#[tokio::test]
async fn condition_decides_what_is_stored() {
    in_both_modes("cond", |_| async move {
        get_filtered("a".into(), "draft".into()).await;
        get_filtered("a".into(), "draft".into()).await;
        assert_eq!(runs(), 2, "a refused result is not stored");
        get_filtered("b".into(), "active".into()).await;
        get_filtered("b".into(), "active".into()).await;
        assert_eq!(runs(), 3);
        score(5).await;
        score(5).await;
        assert_eq!(runs(), 5, "5 is refused by the condition: not stored");
        score(50).await;
        score(50).await;
        assert_eq!(runs(), 6);
    })
    .await;
}

#[tokio::test]
async fn composite_arguments_hash_into_the_key() {
    in_both_modes("policy", |cache| async move {
        let ctx = |level| HashMap::from([("level".to_owned(), level)]);
        let allowed = evaluate_policy(1, "launch".into(), ctx(3)).await;
        assert!(allowed.allowed);
        assert_eq!(evaluate_policy(1, "launch".into(), ctx(3)).await, allowed);
        assert!(!evaluate_policy(1, "launch".into(), ctx(1)).await.allowed);
        assert_eq!(runs(), 2);
        let key = evaluate_policy_key(1, "launch".into(), ctx(3));
        assert!(key.starts_with("policies:v2:1:launch:#"), "{key}");
        assert_eq!(cache.invalidate_tags(["policies"]).await.unwrap(), 2);
        evaluate_policy(1, "launch".into(), ctx(3)).await;
        assert_eq!(runs(), 3);
    })
    .await;
}

#[tokio::test]
async fn a_key_format_replaces_the_argument_list() {
    in_both_modes("keyfmt", |cache| async move {
        assert_eq!(queued("high".into(), 7, "first".into()).await, "high/7/first");
        // `note` is not in the key: the second call is a hit with the first result.
        assert_eq!(queued("high".into(), 7, "second".into()).await, "high/7/first");
        assert_eq!(runs(), 1);
        assert_eq!(queued_key("high".into(), 7), "queue:v2:high:7");
        assert_eq!(cache.delete_pattern("queue:v2:high:*").await.unwrap(), 1);
        queued("high".into(), 7, "third".into()).await;
        assert_eq!(cache.invalidate_tags(["queue:high"]).await.unwrap(), 1);
    })
    .await;
}

#[tokio::test]
async fn refresh_writes_through() {
    in_both_modes("refresh", |_| async move {
        get_mission("m1".into()).await;
        let fresh = get_mission_refresh("m1".into()).await;
        assert_eq!(runs(), 2);
        assert_eq!(get_mission("m1".into()).await, fresh);
        assert_eq!(runs(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_callers_run_the_body_once() {
    in_both_modes("herd", |cache| async move {
        let runs = RUNS.with(Arc::clone);
        let start = Arc::new(tokio::sync::Barrier::new(1000));
        let callers: Vec<_> = (0..1000)
            .map(|_| {
                let (cache, runs, start) = (cache.clone(), runs.clone(), start.clone());
                tokio::spawn(RUNS.scope(
                    runs,
                    CURRENT.scope(cache, async move {
                        start.wait().await;
                        get_mission("cold".into()).await
                    }),
                ))
            })
            .collect();
        for c in callers {
            assert_eq!(c.await.unwrap().id, "cold");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{:?}", cache.mode());
    })
    .await;
}

#[tokio::test]
async fn a_cache_fault_falls_back_to_the_body() {
    let redis = Redis::spawn();
    let cache = redis.cache("fault", cache_runtime::Serialization::Json).await;
    let mut killed = redis;
    killed.kill();
    RUNS.scope(
        Arc::new(AtomicU32::new(0)),
        CURRENT.scope(cache.clone(), async {
            let m = get_mission("m1".into()).await;
            assert_eq!(m.id, "m1");
            get_mission("m1".into()).await;
            assert_eq!(runs(), 2);
            let err: CacheError = get_mission_invalidate("m1".into()).await.unwrap_err();
            assert!(err.to_string().contains("redis"), "{err}");
        }),
    )
    .await;
    let stats = cache.stats().await.unwrap();
    assert!(!stats.connected && stats.errors >= 2, "{stats:?}");
}
