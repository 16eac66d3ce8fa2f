//! Hits on a Redis Cluster and over TLS, each beside raw redis-rs on the same
//! servers (GET + decode of the same ~207-byte JSON value), in interleaved
//! rounds (A B, B A, …).
//!
//! ```text
//! cargo run --release --example topologies -- --concurrency 64 --ops 300000 --rounds 6
//! ```
//!
//! Starts a 3-master cluster with a replica each and a TLS server of its own
//! (certificates generated for the run), unless `REDIS_CLUSTER_NODES` names a
//! cluster. Prints a table and one JSON line per row on stderr.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::OnceLock;

use cache_runtime::{cached, Cache};
use hdrhistogram::Histogram;
use support::bench::{drive, median, mission, Mission};

static CLUSTER: OnceLock<Cache> = OnceLock::new();
static TLS: OnceLock<Cache> = OnceLock::new();
const KEYSPACE: u64 = 1_000;

#[cached(cache = CLUSTER.get().unwrap(), prefix = "topo")]
async fn cluster_mission(id: u64) -> Mission {
    mission(id)
}

#[cached(cache = TLS.get().unwrap(), prefix = "topo")]
async fn tls_mission(id: u64) -> Mission {
    mission(id)
}

/// GET + decode over any redis-rs connection: the raw baseline.
async fn raw_get<C: redis::aio::ConnectionLike + Clone>(conn: &C, n: u64) {
    let mut conn = conn.clone();
    let bytes: Vec<u8> =
        redis::cmd("GET").arg(format!("topo-raw:{}", n % KEYSPACE)).query_async(&mut conn).await.unwrap();
    std::hint::black_box(serde_json::from_slice::<Mission>(&bytes).unwrap());
}

fn main() {
    let concurrency = support::arg("--concurrency", 64) as usize;
    let ops = support::arg("--ops", 300_000);
    let rounds = support::arg("--rounds", 6) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let cluster = support::cluster::Cluster::start();
        let tls = support::tls::TlsRedis::spawn("no");
        let cluster_cache = cluster.cache("topologies").await;
        let tls_cache = Cache::new(tls.config("topologies").build().unwrap()).await.unwrap();
        assert_eq!(tls_cache.mode(), cache_runtime::Mode::Redis);
        CLUSTER.set(cluster_cache.clone()).unwrap();
        TLS.set(tls_cache.clone()).unwrap();

        let raw_cluster = cluster.raw().await;
        let ca = std::fs::read(tls.certs.ca_pem()).unwrap();
        let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(ca) };
        let raw_tls = redis::Client::build_with_tls(tls.url(), certs)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        for id in 0..KEYSPACE {
            let json = serde_json::to_vec(&mission(id)).unwrap();
            let set = redis::cmd("SET").arg(format!("topo-raw:{id}")).arg(&json).clone();
            let _: () = set.query_async(&mut raw_cluster.clone()).await.unwrap();
            let _: () = set.query_async(&mut raw_tls.clone()).await.unwrap();
            cluster_mission(id).await;
            tls_mission(id).await;
        }

        let scenarios = ["cluster_raw_get", "cluster_cached_hit", "tls_raw_get", "tls_cached_hit"];
        let mut per_round = vec![Vec::new(); scenarios.len()];
        let mut hists: Vec<Histogram<u64>> =
            (0..scenarios.len()).map(|_| Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()).collect();
        let per = ops / rounds as u64;
        for round in 0..rounds {
            // Each pair in A B, then B A order.
            let order: [usize; 4] = if round % 2 == 0 { [0, 1, 2, 3] } else { [1, 0, 3, 2] };
            for i in order {
                let (ops_s, hist) = match scenarios[i] {
                    "cluster_raw_get" => {
                        let conn = raw_cluster.clone();
                        drive(concurrency, per, move |n| {
                            let conn = conn.clone();
                            async move { raw_get(&conn, n).await }
                        })
                        .await
                    }
                    "cluster_cached_hit" => {
                        drive(concurrency, per, |n| async move {
                            std::hint::black_box(cluster_mission(n % KEYSPACE).await);
                        })
                        .await
                    }
                    "tls_raw_get" => {
                        let conn = raw_tls.clone();
                        drive(concurrency, per, move |n| {
                            let conn = conn.clone();
                            async move { raw_get(&conn, n).await }
                        })
                        .await
                    }
                    _ => {
                        drive(concurrency, per, |n| async move {
                            std::hint::black_box(tls_mission(n % KEYSPACE).await);
                        })
                        .await
                    }
                };
                per_round[i].push(ops_s);
                hists[i].add(hist).unwrap();
            }
        }
        println!("topologies: concurrency {concurrency}, {ops} ops per scenario over {rounds} rounds");
        println!("{:<20} {:>11} {:>9} {:>9}  vs raw", "scenario", "ops/s", "p50 µs", "p99 µs");
        for (i, scenario) in scenarios.iter().enumerate() {
            let q = |p: f64| hists[i].value_at_quantile(p) as f64 / 1e3;
            // A cached scenario's ratio is the median of its per-round ratios to the raw one.
            let ratio = (i % 2 == 1)
                .then(|| median(per_round[i].iter().zip(&per_round[i - 1]).map(|(a, b)| a / b).collect()));
            let ops_s = median(per_round[i].clone());
            println!(
                "{scenario:<20} {ops_s:>11.0} {:>9.1} {:>9.1}  {}",
                q(0.5),
                q(0.99),
                ratio.map_or("-".to_owned(), |r| format!("{:.1}%", r * 100.0))
            );
            let json = serde_json::json!({
                "figure": "topology_hit", "scenario": scenario, "concurrency": concurrency,
                "ops_per_sec": ops_s.round(), "p50_us": q(0.5), "p99_us": q(0.99),
                "ratio_to_raw": ratio, "rounds": rounds,
            });
            eprintln!("{json}");
        }
        let stats = cluster_cache.stats().await.unwrap();
        println!("cluster cache: hits {} misses {} faults {}", stats.hits, stats.misses, stats.errors);
        let stats = tls_cache.stats().await.unwrap();
        println!("tls cache: hits {} misses {} faults {}", stats.hits, stats.misses, stats.errors);
        cluster_cache.clear().await.unwrap();
    });
}
