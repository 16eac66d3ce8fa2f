//! The five-minute tour: runs in local mode with no Redis, against Redis when
//! `REDIS_URL` is set, and prints what it does with hit and miss timings.
//!
//! ```text
//! cargo run --example quickstart
//! REDIS_URL=redis://127.0.0.1:6379/0 cargo run --example quickstart
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::{cached, CacheConfig, CacheError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Mission {
    id: String,
    name: String,
    priority: u8,
}

static DB_QUERIES: AtomicU32 = AtomicU32::new(0);

/// Stands in for a database read that takes 40 ms.
#[cached(ttl = 60, prefix = "missions", tags = ["missions", "mission:{id}"])]
async fn get_mission(id: String) -> Result<Mission, String> {
    DB_QUERIES.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(40)).await;
    Ok(Mission { name: format!("Mission {id}"), id, priority: 3 })
}

async fn timed<T>(label: &str, f: impl std::future::IntoFuture<Output = T>) -> T {
    let started = Instant::now();
    let out = f.await;
    let took = started.elapsed();
    println!(
        "  {label:<48} {:>9.3} ms   (db queries so far: {})",
        took.as_secs_f64() * 1e3,
        DB_QUERIES.load(Ordering::Relaxed)
    );
    out
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt().with_env_filter("cache_runtime=info").with_target(false).init();
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Display, not Debug: the message says what happened and what to do.
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), CacheError> {
    let config = CacheConfig::builder().key_prefix("quickstart").build()?.with_env()?;
    let cache = cache_runtime::init(config).await?;
    match cache.mode() {
        cache_runtime::Mode::Local => {
            println!("mode: local (set REDIS_URL=redis://127.0.0.1:6379/0 to use Redis)")
        }
        cache_runtime::Mode::Redis => println!("mode: redis"),
    }
    cache.clear().await?;

    println!("\n#[cached] get_mission:");
    timed("get_mission(\"m1\")   miss: runs the body", get_mission("m1".into())).await.ok();
    timed("get_mission(\"m1\")   hit", get_mission("m1".into())).await.ok();
    timed("get_mission(\"m1\")   hit", get_mission("m1".into())).await.ok();
    println!("  key: {}", get_mission_key("m1".into()));
    timed("get_mission_invalidate(\"m1\")", get_mission_invalidate("m1".into())).await?;
    timed("get_mission(\"m1\")   miss after invalidation", get_mission("m1".into())).await.ok();
    timed("get_mission(\"m2\")   miss", get_mission("m2".into())).await.ok();
    let deleted = timed("invalidate_tags([\"missions\"])", cache.invalidate_tags(["missions"])).await?;
    println!("  -> {deleted} entries deleted");
    timed("get_mission(\"m2\")   miss after tag invalidation", get_mission("m2".into())).await.ok();

    println!("\nthe client API:");
    timed(
        "set(\"agents:1\", ttl 600, tags [agents])",
        cache.set("agents:1", &"agent one").ttl(600).tags(["agents"]),
    )
    .await?;
    let agent: Option<String> = timed("get(\"agents:1\")", cache.get("agents:1")).await?;
    println!("  -> {agent:?}, ttl {:?}", cache.ttl("agents:1").await?);
    let gone = timed("delete_pattern(\"agents:*\")", cache.delete_pattern("agents:*")).await?;
    println!("  -> {gone} deleted");

    let stats = cache.stats().await?;
    println!(
        "\nstats: mode={} keys={} hits={} misses={} hit_rate={:.2} redis_version={} memory={}",
        stats.mode.as_str(),
        stats.total_keys,
        stats.hits,
        stats.misses,
        stats.hit_rate,
        stats.redis_version.as_deref().unwrap_or("-"),
        stats.used_memory_human.as_deref().unwrap_or("-"),
    );
    cache.clear().await?;
    Ok(())
}
