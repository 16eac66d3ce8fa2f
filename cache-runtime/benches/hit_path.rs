//! The `#[cached]` call beside its baseline in each group: a Redis-tier hit beside
//! a raw redis-rs GET + decode, a local-tier hit beside a moka get, and a
//! miss-then-fill beside a raw GET + SET. Starts its own redis-server unless
//! `REDIS_URL` is set.

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cache_runtime::{cached, Cache, CacheConfig, Op};
use criterion::{criterion_group, criterion_main, Criterion};
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
struct Mission {
    id: u64,
    name: String,
    status: String,
    crew: Vec<String>,
    progress: f64,
}

fn mission(id: u64) -> Mission {
    Mission {
        id,
        name: format!("Survey of the outer belt, leg {id:06}"),
        status: "active".into(),
        crew: vec!["ada.lovelace".into(), "grace.hopper".into(), "linus.torvalds".into()],
        progress: 0.4242,
    }
}

static REDIS: OnceLock<Cache> = OnceLock::new();
static LOCAL: OnceLock<Cache> = OnceLock::new();

#[cached(cache = REDIS.get().unwrap(), prefix = "bench")]
async fn redis_mission(id: u64) -> Mission {
    mission(id)
}

#[cached(cache = LOCAL.get().unwrap(), prefix = "bench")]
async fn local_mission(id: u64) -> Mission {
    mission(id)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let server = support::Redis::start();
    let config = CacheConfig::builder().redis_url(server.url()).key_prefix("bench").build().unwrap();
    let (raw, redis_cache) = rt.block_on(async {
        let cache = Cache::new(config.clone()).await.unwrap();
        let raw =
            redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        (raw, cache)
    });
    REDIS.set(redis_cache.clone()).unwrap();
    LOCAL.set(Cache::local(config)).unwrap();
    rt.block_on(async {
        let mut conn = raw.clone();
        let _: () = redis::cmd("SET")
            .arg("raw:1")
            .arg(serde_json::to_vec(&mission(1)).unwrap())
            .query_async(&mut conn)
            .await
            .unwrap();
        redis_mission(1).await;
        local_mission(1).await;
    });

    let mut g = c.benchmark_group("redis_hit");
    g.bench_function("raw_get_decode", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = raw.clone();
            async move {
                let bytes: Vec<u8> = redis::cmd("GET").arg("raw:1").query_async(&mut conn).await.unwrap();
                black_box(serde_json::from_slice::<Mission>(&bytes).unwrap())
            }
        })
    });
    g.bench_function("cached", |b| b.to_async(&rt).iter(|| async { black_box(redis_mission(1).await) }));
    g.finish();

    let mut g = c.benchmark_group("local_hit");
    let moka: moka::sync::Cache<u64, Arc<Mission>> = moka::sync::Cache::new(1_000);
    moka.insert(1, Arc::new(mission(1)));
    g.bench_function("moka_get", |b| b.iter(|| black_box(moka.get(&1).unwrap())));
    g.bench_function("cached", |b| b.to_async(&rt).iter(|| async { black_box(local_mission(1).await) }));
    g.finish();

    let mut g = c.benchmark_group("miss_then_fill");
    g.bench_function("raw_get_set", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = raw.clone();
            async move {
                let _: Option<Vec<u8>> =
                    redis::cmd("GET").arg("raw:miss").query_async(&mut conn).await.unwrap();
                let bytes = serde_json::to_vec(&mission(2)).unwrap();
                let _: () = redis::cmd("SET")
                    .arg("raw:miss")
                    .arg(bytes)
                    .arg("EX")
                    .arg(60)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        })
    });
    g.bench_function("cached_invalidate_then_call", |b| {
        b.to_async(&rt).iter(|| async {
            redis_mission_invalidate(2).await.unwrap();
            black_box(redis_mission(2).await)
        })
    });
    g.finish();

    // What counting adds to every hit: two counters and a histogram observation.
    let mut g = c.benchmark_group("metrics");
    let metrics = redis_cache.metrics();
    g.bench_function("record_one_operation", |b| {
        b.iter(|| metrics.record(black_box(Op::Get), true, black_box(Duration::from_micros(150))))
    });
    g.finish();
    rt.block_on(async { redis_cache.clear().await.unwrap() });
}

criterion_group!(benches, bench);
criterion_main!(benches);
