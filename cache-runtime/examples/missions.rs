//! The mission system of the BRAiN design document: cached reads, an update that
//! invalidates, agent configuration written through, and policy evaluations
//! dropped by tag when a policy changes. Prints what happens.
//!
//! ```text
//! cargo run --example missions                                   # local mode
//! REDIS_URL=redis://127.0.0.1:6379/0 cargo run --example missions
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cache_runtime::{cached, get_cache, CacheConfig, CacheError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Mission {
    id: String,
    status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AgentConfig {
    agent_id: String,
    model: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PolicyResult {
    allowed: bool,
    rule: String,
}

/// The database the functions below stand in front of.
#[derive(Default)]
struct Db {
    missions: Mutex<HashMap<String, String>>,
    agents: Mutex<HashMap<String, String>>,
    max_priority: Mutex<u32>,
    queries: AtomicU32,
}

static DB: std::sync::LazyLock<Db> = std::sync::LazyLock::new(Db::default);

fn query<T>(f: impl FnOnce(&Db) -> T) -> T {
    DB.queries.fetch_add(1, Ordering::Relaxed);
    f(&DB)
}

#[cached(ttl = 60, prefix = "missions", tags = ["missions", "mission:{mission_id}"])]
async fn get_mission(mission_id: String) -> Option<Mission> {
    let status = query(|db| db.missions.lock().unwrap().get(&mission_id).cloned())?;
    Some(Mission { id: mission_id, status })
}

async fn update_mission(mission_id: &str, status: &str) -> Result<(), CacheError> {
    query(|db| db.missions.lock().unwrap().insert(mission_id.to_owned(), status.to_owned()));
    // After the write: drop this mission's entry wherever it is cached.
    get_cache().invalidate_tags([format!("mission:{mission_id}")]).await?;
    Ok(())
}

#[cached(ttl = 600, prefix = "agents", tags = ["agents"])]
async fn get_agent_config(agent_id: String) -> Result<AgentConfig, String> {
    let model = query(|db| db.agents.lock().unwrap().get(&agent_id).cloned()).ok_or("no such agent")?;
    Ok(AgentConfig { agent_id, model })
}

async fn update_agent_config(agent_id: &str, model: &str) -> AgentConfig {
    query(|db| db.agents.lock().unwrap().insert(agent_id.to_owned(), model.to_owned()));
    // Write-through: the next read is a hit with the new configuration.
    get_agent_config_refresh(agent_id.to_owned()).await.expect("just written")
}

#[cached(ttl = 300, prefix = "policies", tags = ["policies"])]
async fn evaluate_policy(agent_id: String, action: String, context: BTreeMap<String, u32>) -> PolicyResult {
    let max = query(|db| *db.max_priority.lock().unwrap());
    let priority = context.get("priority").copied().unwrap_or(0);
    PolicyResult { allowed: priority <= max, rule: format!("{agent_id}/{action}: priority <= {max}") }
}

async fn update_policy(max_priority: u32) -> Result<u64, CacheError> {
    query(|db| *db.max_priority.lock().unwrap() = max_priority);
    get_cache().invalidate_tags(["policies"]).await
}

fn queries() -> u32 {
    DB.queries.load(Ordering::Relaxed)
}

#[tokio::main]
async fn main() -> Result<(), CacheError> {
    let config = CacheConfig::builder()
        .key_prefix("brain")
        .default_ttl(Duration::from_secs(300))
        .build()?
        .with_env()?;
    let cache = cache_runtime::init(config).await?;
    cache.clear().await?;
    println!("cache mode: {}", cache.mode().as_str());
    DB.missions.lock().unwrap().insert("mission_123".into(), "queued".into());
    DB.agents.lock().unwrap().insert("agent_456".into(), "small".into());
    *DB.max_priority.lock().unwrap() = 3;

    println!("\n-- missions: cache-aside, then invalidation on update");
    let m = get_mission("mission_123".into()).await;
    println!("get_mission -> {m:?} (db queries: {})", queries());
    let m = get_mission("mission_123".into()).await;
    println!("get_mission -> {m:?} (db queries: {}, a hit)", queries());
    update_mission("mission_123", "active").await?;
    let m = get_mission("mission_123".into()).await;
    println!("after update_mission -> {m:?} (db queries: {}: the stale entry was dropped)", queries());
    let none = get_mission("nope".into()).await;
    println!("get_mission(nope) -> {none:?}: None is not cached");

    println!("\n-- agents: write-through");
    let a = get_agent_config("agent_456".into()).await;
    println!("get_agent_config -> {a:?} (db queries: {})", queries());
    let a = update_agent_config("agent_456", "large").await;
    println!("update_agent_config -> {a:?} (db queries: {})", queries());
    let a = get_agent_config("agent_456".into()).await;
    println!("get_agent_config -> {a:?} (db queries: {}, a hit with the new value)", queries());
    let err = get_agent_config("agent_999".into()).await;
    println!("get_agent_config(agent_999) -> {err:?}: errors pass through, uncached");

    println!("\n-- policies: composite arguments, tag invalidation");
    let ctx = BTreeMap::from([("priority".to_owned(), 5)]);
    let p = evaluate_policy("agent_456".into(), "launch".into(), ctx.clone()).await;
    println!("evaluate_policy -> {p:?} (db queries: {})", queries());
    println!("  key: {}", evaluate_policy_key("agent_456".into(), "launch".into(), ctx.clone()));
    let p = evaluate_policy("agent_456".into(), "launch".into(), ctx.clone()).await;
    println!("evaluate_policy -> {p:?} (db queries: {}, a hit)", queries());
    let dropped = update_policy(10).await?;
    println!("update_policy(10) dropped {dropped} cached evaluation(s)");
    let p = evaluate_policy("agent_456".into(), "launch".into(), ctx).await;
    println!("evaluate_policy -> {p:?} (db queries: {})", queries());

    let stats = cache.stats().await?;
    println!(
        "\nstats: {} keys, {} hits, {} misses, hit rate {:.2}",
        stats.total_keys, stats.hits, stats.misses, stats.hit_rate
    );
    println!("get_mission_invalidate_all removed {} entries", get_mission_invalidate_all().await?);
    cache.clear().await?;
    Ok(())
}
