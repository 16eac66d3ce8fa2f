//! Decoded values in the local tier: a hit of a `Clone` type clones the value
//! its entry keeps instead of decoding; other types, other shapes and Redis
//! hits decode; invalidations, writes and TTLs reach kept values too.

mod support;

use std::cell::Cell;
use std::future::IntoFuture;
use std::time::Duration;

use cache_runtime::cached;
use cache_runtime::codec::fingerprint;
use serde::{Deserialize, Deserializer, Serialize};
use support::{local_cache, Redis, CURRENT, FORMATS};

thread_local! {
    // Each `#[tokio::test]` runs on its own thread, and the local tier decodes on the caller's.
    static DECODES: Cell<u64> = const { Cell::new(0) };
}

fn decodes() -> u64 {
    DECODES.with(Cell::get)
}

/// How many values were deserialized while `f` ran.
async fn decodes_during<F: IntoFuture>(f: F) -> (F::Output, u64) {
    // A type's fingerprint is traced through its `Deserialize` once per process: not a decode.
    fingerprint::<Report>();
    fingerprint::<ReportView>();
    fingerprint::<Summary>();
    fingerprint::<Opaque>();
    let before = decodes();
    let out = f.await;
    (out, decodes() - before)
}

/// An `init` for a call that must hit.
async fn hit<T>() -> T {
    unreachable!("a hit runs no init")
}

/// A `u64` that counts its deserializations.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Counted(u64);

impl<'de> Deserialize<'de> for Counted {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        DECODES.with(|c| c.set(c.get() + 1));
        u64::deserialize(d).map(Counted)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Report {
    id: u64,
    seen: Counted,
    title: String,
}

fn report(id: u64) -> Report {
    Report { id, seen: Counted(id * 10), title: format!("report {id}") }
}

/// The same shape as [`Report`] under the same name: another type reading the same bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename = "Report")]
struct ReportView {
    id: u64,
    seen: Counted,
    title: String,
}

/// Another shape: its fingerprint differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Summary {
    seen: Counted,
}

/// Not `Clone`: its hits decode.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Opaque {
    seen: Counted,
}

/// Not `Clone` either, and never stored: only the `Ok` value's type matters.
#[derive(Debug)]
struct LoadError;

thread_local! {
    static BODY_RUNS: Cell<u64> = const { Cell::new(0) };
}

fn body_runs() -> u64 {
    BODY_RUNS.with(Cell::get)
}

fn ran() {
    BODY_RUNS.with(|c| c.set(c.get() + 1));
}

#[cached(cache = support::current(), ttl = 60, prefix = "reports", tags = ["reports", "report:{id}"])]
async fn load_report(id: u64) -> Report {
    ran();
    report(id)
}

#[cached(cache = support::current(), ttl = 60, prefix = "fallible")]
async fn try_load_report(id: u64) -> Result<Report, LoadError> {
    ran();
    Ok(report(id))
}

#[cached(cache = support::current(), ttl = 60, prefix = "opaque")]
async fn load_opaque(id: u64) -> Opaque {
    ran();
    Opaque { seen: Counted(id) }
}

#[tokio::test]
async fn a_local_hit_of_a_clone_type_decodes_once_then_clones() {
    for format in FORMATS {
        let cache = local_cache("kept", format);
        CURRENT
            .scope(cache.clone(), async {
                let (first, n) = decodes_during(load_report(1)).await;
                assert_eq!((first, n, body_runs()), (report(1), 0, 1), "{format}: the fill decodes nothing");
                let (hit, n) = decodes_during(load_report(1)).await;
                assert_eq!((hit, n), (report(1), 1), "{format}: the first hit decodes and keeps the value");
                let (hits, n) = decodes_during(async {
                    let mut hits = Vec::new();
                    for _ in 0..100 {
                        hits.push(load_report(1).await);
                    }
                    hits
                })
                .await;
                assert_eq!(n, 0, "{format}: later hits clone the kept value");
                assert!(hits.iter().all(|h| *h == report(1)), "{format}");
                assert_eq!(body_runs(), 1, "{format}");
            })
            .await;
        BODY_RUNS.with(|c| c.set(0));
        let stats = cache.stats().await.unwrap();
        assert_eq!((stats.hits, stats.misses), (101, 1), "{format}: hits are counted as before");
    }
}

#[tokio::test]
async fn the_ok_value_is_kept_when_the_error_type_is_not_clone() {
    let cache = local_cache("fallible", FORMATS[0]);
    CURRENT
        .scope(cache, async {
            try_load_report(2).await.unwrap();
            try_load_report(2).await.unwrap();
            let (hit, n) = decodes_during(try_load_report(2)).await;
            assert_eq!((hit.unwrap(), n), (report(2), 0));
        })
        .await;
}

#[tokio::test]
async fn a_type_that_is_not_clone_decodes_every_hit() {
    let cache = local_cache("opaque", FORMATS[0]);
    CURRENT
        .scope(cache, async {
            load_opaque(3).await;
            for _ in 0..3 {
                let (hit, n) = decodes_during(load_opaque(3)).await;
                assert_eq!((hit, n), (Opaque { seen: Counted(3) }, 1));
            }
        })
        .await;
}

#[tokio::test]
async fn get_with_hits_clone_the_kept_value() {
    let cache = local_cache("get_with", FORMATS[2]);
    cache.get_with("r", async { report(4) }).await;
    cache.get_with("r", hit::<Report>()).await;
    let (got, n) = decodes_during(cache.get_with("r", hit())).await;
    assert_eq!((got, n), (report(4), 0));
    let (hit, n) = decodes_during(cache.try_get_with("r", async { Err::<Report, _>(LoadError) })).await;
    assert_eq!((hit.unwrap(), n), (report(4), 0), "the same stored type through try_get_with");
}

#[tokio::test]
async fn another_type_under_the_same_key_decodes_and_checks_the_fingerprint() {
    for format in FORMATS {
        let cache = local_cache("types", format);
        cache.get_with("r", async { report(5) }).await;
        cache.get_with("r", async { report(0) }).await;

        // Same shape, another type: the downcast fails, the bytes decode.
        let (view, n) = decodes_during(cache.get_with("r", hit())).await;
        let view: ReportView = view;
        assert_eq!((view.id, view.seen, view.title, n), (5, Counted(50), "report 5".into(), 1), "{format}");
        // The kept value stays the first reader's.
        let (hit, n) = decodes_during(cache.get_with("r", async { report(0) })).await;
        assert_eq!((hit, n), (report(5), 0), "{format}");

        // Another shape: a miss, counted, whatever value is kept.
        let before = cache.stats().await.unwrap().type_mismatches;
        let summary = cache.get_with("r", async { Summary { seen: Counted(6) } }).await;
        assert_eq!(summary, Summary { seen: Counted(6) }, "{format}");
        assert!(cache.stats().await.unwrap().type_mismatches > before, "{format}");
        assert_eq!(cache.get::<Report>("r").await.unwrap(), None, "{format}: the new fill replaced it");
        assert_eq!(cache.get::<Summary>("r").await.unwrap(), Some(Summary { seen: Counted(6) }), "{format}");
    }
}

#[tokio::test]
async fn get_decodes_what_a_clone_reader_kept() {
    let cache = local_cache("get", FORMATS[1]);
    cache.set("r", &report(7)).await.unwrap();
    cache.get_with("r", async { report(0) }).await;
    let (got, n) = decodes_during(cache.get::<Report>("r")).await;
    assert_eq!((got.unwrap(), n), (Some(report(7)), 1), "get has no Clone bound: it decodes");
}

/// Fills with `report(id)` through the macro and keeps the decoded value.
async fn fill_and_keep(id: u64) {
    load_report(id).await;
    load_report(id).await;
    let (_, n) = decodes_during(load_report(id)).await;
    assert_eq!(n, 0, "kept");
}

/// Whether the next call runs the body.
async fn runs_body(id: u64) -> bool {
    let before = body_runs();
    assert_eq!(load_report(id).await, report(id));
    body_runs() > before
}

#[tokio::test]
async fn invalidations_reach_kept_values() {
    let cache = local_cache("invalidate", FORMATS[0]);
    CURRENT
        .scope(cache.clone(), async {
            for how in ["delete", "tag", "pattern", "invalidate_all", "clear"] {
                fill_and_keep(1).await;
                assert!(!runs_body(1).await, "{how}: a hit before");
                match how {
                    "delete" => assert!(load_report_invalidate(1).await.unwrap()),
                    "tag" => assert_eq!(cache.invalidate_tags(["report:1"]).await.unwrap(), 1),
                    "pattern" => assert_eq!(cache.delete_pattern("reports:*").await.unwrap(), 1),
                    "invalidate_all" => assert_eq!(load_report_invalidate_all().await.unwrap(), 1),
                    _ => assert_eq!(cache.clear().await.unwrap(), 1),
                }
                assert!(runs_body(1).await, "{how}: the kept value went with its entry");
            }
        })
        .await;
}

#[tokio::test]
async fn a_write_replaces_the_kept_value() {
    let cache = local_cache("write", FORMATS[0]);
    CURRENT
        .scope(cache.clone(), async {
            fill_and_keep(8).await;
            let newer = Report { title: "rewritten".into(), ..report(8) };
            cache.set(&load_report_key(8), &newer).await.unwrap();
            assert_eq!(load_report(8).await, newer);
            load_report_refresh(8).await;
            assert_eq!(load_report(8).await, report(8), "refresh wrote through");
        })
        .await;
}

#[tokio::test]
async fn a_kept_value_expires_with_its_entry() {
    let cache = local_cache("ttl", FORMATS[0]);
    let ttl = Duration::from_millis(300);
    cache.get_with("r", async { report(9) }).ttl(ttl).await;
    cache.get_with("r", hit::<Report>()).ttl(ttl).await;
    let (_, n) = decodes_during(cache.get_with("r", hit::<Report>()).ttl(ttl)).await;
    assert_eq!(n, 0, "kept");
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let fresh = Report { title: "fresh".into(), ..report(9) };
    assert_eq!(cache.get_with("r", async { fresh.clone() }).ttl(ttl).await, fresh, "expired: a miss");
}

#[tokio::test]
async fn redis_hits_decode_every_time() {
    let redis = Redis::start();
    let cache = redis.cache("redis_hits", FORMATS[0]).await;
    cache.get_with("r", async { report(10) }).await;
    for _ in 0..3 {
        let (hit, n) = decodes_during(cache.get_with("r", hit())).await;
        assert_eq!((hit, n), (report(10), 1), "the value is read from Redis and decoded");
    }
}
