//! The response-cache layer against a real Redis, driven with `oneshot` on an
//! axum `Router`: single flight, tags and patterns, fenced fills, the stored
//! form, `Vary`, the size limit, ETags and fault fallback.

mod support;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use cache_runtime::http::ResponseCacheLayer;
use cache_runtime::{Cache, Serialization};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use redis::AsyncCommands;
use support::Redis;
use tokio::sync::Notify;
use tower::ServiceExt;

/// How often the handler ran.
#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

impl Runs {
    fn next(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// `GET /missions` answering `missions v{run}` (the run that computed it) after `delay`.
fn missions(layer: ResponseCacheLayer, runs: Runs, delay: Duration) -> Router {
    Router::new()
        .route(
            "/missions",
            get(move || {
                let runs = runs.clone();
                async move {
                    let run = runs.next();
                    tokio::time::sleep(delay).await;
                    format!("missions v{run}")
                }
            }),
        )
        .layer(layer)
}

async fn send(app: &Router, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
    let mut req = Request::get(path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let response = app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
}

fn x_cache(headers: &HeaderMap) -> &str {
    headers.get("x-cache").map_or("none", |v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_run_the_handler_once() {
    let redis = Redis::start();
    let cache = redis.cache("rc_flight", Serialization::Json).await;
    let runs = Runs::default();
    let app = missions(ResponseCacheLayer::new(cache), runs.clone(), Duration::from_millis(100));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let app = app.clone();
        tasks.spawn(async move { send(&app, "/missions", &[]).await });
    }
    let mut misses = 0;
    let mut hits = 0;
    while let Some(done) = tasks.join_next().await {
        let (status, headers, body) = done.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "missions v1");
        match x_cache(&headers) {
            "miss" => misses += 1,
            "hit" => hits += 1,
            other => panic!("x-cache {other}"),
        }
    }
    println!(
        "100 concurrent requests for a cold URL: handler ran {} time(s); {misses} miss, {hits} hit",
        runs.count()
    );
    assert_eq!(runs.count(), 1, "one handler run for the whole herd");
    assert_eq!((misses, hits), (1, 99));
}

#[tokio::test]
async fn tags_and_patterns_drop_cached_responses_under_the_documented_key() {
    let redis = Redis::start();
    let cache = redis.cache("rc_tags", Serialization::Json).await;
    let runs = Runs::default();
    let app =
        missions(ResponseCacheLayer::new(cache.clone()).tags(["missions"]), runs.clone(), Duration::ZERO);

    let (_, headers, body) = send(&app, "/missions", &[]).await;
    assert_eq!((x_cache(&headers), &body[..]), ("miss", &b"missions v1"[..]));
    assert!(cache.exists("http:GET:/missions").await.unwrap(), "the key schema of the docs");
    let (_, headers, body) = send(&app, "/missions", &[]).await;
    assert_eq!((x_cache(&headers), &body[..]), ("hit", &b"missions v1"[..]));

    assert_eq!(cache.invalidate_tags(["missions"]).await.unwrap(), 1);
    let (_, headers, body) = send(&app, "/missions", &[]).await;
    assert_eq!((x_cache(&headers), &body[..]), ("miss", &b"missions v2"[..]), "the tag dropped it");

    assert_eq!(cache.delete_pattern("http:GET:/missions*").await.unwrap(), 1);
    let (_, headers, body) = send(&app, "/missions", &[]).await;
    assert_eq!((x_cache(&headers), &body[..]), ("miss", &b"missions v3"[..]), "the pattern dropped it");

    let (_, headers, _) = send(&app, "/missions?page=2", &[]).await;
    assert_eq!(x_cache(&headers), "miss", "the query is part of the key");
    assert!(cache.exists("http:GET:/missions%3Fpage=2").await.unwrap());
    assert_eq!(runs.count(), 4);
}

#[tokio::test]
async fn a_response_computed_before_an_invalidation_is_not_stored_after_it() {
    let redis = Redis::start();
    let cache = redis.cache("rc_fence", Serialization::Json).await;
    let (started, go) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/missions",
            get({
                let (started, go, runs) = (started.clone(), go.clone(), runs.clone());
                move || {
                    let (started, go, runs) = (started.clone(), go.clone(), runs.clone());
                    async move {
                        let run = runs.next();
                        started.notify_one();
                        go.notified().await;
                        format!("missions v{run}")
                    }
                }
            }),
        )
        .layer(ResponseCacheLayer::new(cache.clone()).tags(["missions"]));

    let request = tokio::spawn({
        let app = app.clone();
        async move { send(&app, "/missions", &[]).await }
    });
    started.notified().await;
    cache.invalidate_tags(["missions"]).await.unwrap();
    go.notify_one();
    let (status, _, body) = request.await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"missions v1"[..]), "the client still gets it");
    assert!(!cache.exists("http:GET:/missions").await.unwrap(), "the raced fill was refused");

    let again = tokio::spawn({
        let app = app.clone();
        async move { send(&app, "/missions", &[]).await }
    });
    started.notified().await;
    go.notify_one();
    let (_, headers, body) = again.await.unwrap();
    assert_eq!((x_cache(&headers), &body[..]), ("miss", &b"missions v2"[..]));
    assert!(cache.exists("http:GET:/missions").await.unwrap(), "an unraced fill is stored");
}

#[tokio::test]
async fn the_response_is_stored_in_the_binary_codec_whatever_the_cache_uses() {
    let redis = Redis::start();
    let cache = redis.cache("rc_codec", Serialization::Json).await;
    let body: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let app = Router::new()
        .route(
            "/blob",
            get({
                let body = body.clone();
                move || async move { ([(header::CONTENT_TYPE, "application/octet-stream")], body) }
            }),
        )
        .layer(ResponseCacheLayer::new(cache.clone()));
    let (_, _, first) = send(&app, "/blob", &[]).await;
    assert_eq!(first, body);

    let raw: Vec<u8> =
        redis.raw().await.get(format!("{}:http:GET:/blob", cache.config().key_prefix())).await.unwrap();
    assert_eq!(raw[2], 3, "the entry's header names postcard (format tag 3), not JSON");
    assert!(raw.windows(body.len()).any(|w| w == body), "the body is stored as its raw bytes");
    assert!(raw.len() < body.len() + 200, "{} bytes stored for a {}-byte body", raw.len(), body.len());

    let (_, headers, again) = send(&app, "/blob", &[]).await;
    assert_eq!((x_cache(&headers), &again[..]), ("hit", &body[..]));
    assert_eq!(headers[header::CONTENT_TYPE], "application/octet-stream");
}

#[tokio::test]
async fn vary_headers_declared_on_the_route_enter_the_key() {
    let redis = Redis::start();
    let cache = redis.cache("rc_vary", Serialization::Json).await;
    let runs = Runs::default();
    let greeting = {
        let runs = runs.clone();
        move |headers: HeaderMap| {
            let runs = runs.clone();
            async move {
                runs.next();
                let lang =
                    headers.get(header::ACCEPT_LANGUAGE).map_or("none", |v| v.to_str().unwrap()).to_owned();
                ([(header::VARY, "Accept-Language")], format!("hello in {lang}"))
            }
        }
    };
    let app = Router::new()
        .route("/hello", get(greeting))
        .layer(ResponseCacheLayer::new(cache.clone()).vary([header::ACCEPT_LANGUAGE]));

    for (lang, cached) in [("en", "miss"), ("fr", "miss"), ("en", "hit"), ("fr", "hit")] {
        let (_, headers, body) = send(&app, "/hello", &[("accept-language", lang)]).await;
        assert_eq!(body, format!("hello in {lang}"));
        assert_eq!(x_cache(&headers), cached, "{lang}");
        assert_eq!(headers[header::VARY], "Accept-Language", "the stored response keeps its Vary");
    }
    let (_, headers, body) = send(&app, "/hello", &[]).await;
    assert_eq!((x_cache(&headers), &body[..]), ("miss", &b"hello in none"[..]), "no header is a variant too");
    assert_eq!(runs.count(), 3);
    assert!(cache.exists("http:GET:/hello:accept-language=en").await.unwrap());
    assert!(cache.exists("http:GET:/hello:accept-language").await.unwrap());
}

#[tokio::test]
async fn responses_that_must_not_be_shared_are_not_cached() {
    let redis = Redis::start();
    let cache = redis.cache("rc_uncacheable", Serialization::Json).await;
    let runs = Runs::default();
    let with = |name: &'static str, value: &'static str| {
        let runs = runs.clone();
        get(move || {
            let runs = runs.clone();
            async move { ([(name, value)], format!("run {}", runs.next())) }
        })
    };
    let app = Router::new()
        .route("/undeclared-vary", with("vary", "accept-encoding"))
        .route("/vary-star", with("vary", "*"))
        .route("/no-store", with("cache-control", "no-store"))
        .route("/private", with("cache-control", "max-age=60, private"))
        .route("/cookie", with("set-cookie", "session=1"))
        .layer(ResponseCacheLayer::new(cache.clone()));
    for path in ["/undeclared-vary", "/vary-star", "/no-store", "/private", "/cookie"] {
        let before = runs.count();
        for _ in 0..2 {
            let (status, headers, _) = send(&app, path, &[]).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(x_cache(&headers), "none", "{path}");
        }
        assert_eq!(runs.count(), before + 2, "{path} ran for each request");
    }
    assert_eq!(cache.stats().await.unwrap().total_keys, 0, "nothing was stored");
}

/// A body sent in `chunks`, with the size hint given (none: a stream of unknown length).
struct Chunks {
    chunks: VecDeque<Bytes>,
    hint: Option<u64>,
}

impl HttpBody for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.chunks.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }

    fn size_hint(&self) -> SizeHint {
        self.hint.map_or_else(SizeHint::new, SizeHint::with_exact)
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// `len` bytes of [`pattern`] in 1000-byte chunks.
fn chunked(len: usize, hint: Option<u64>) -> Response {
    let data = pattern(len);
    let chunks = data.chunks(1000).map(Bytes::copy_from_slice).collect();
    Body::new(Chunks { chunks, hint }).into_response()
}

#[tokio::test]
async fn bodies_over_the_limit_or_streaming_reach_the_client_intact_and_uncached() {
    const LIMIT: usize = 4096;
    let redis = Redis::start();
    let config = redis.config("rc_limit").max_value_bytes(LIMIT).build().unwrap();
    let cache = Cache::new(config).await.unwrap();
    let runs = Runs::default();
    let counted = |make: fn() -> Response| {
        let runs = runs.clone();
        get(move || {
            runs.next();
            async move { make() }
        })
    };
    let app = Router::new()
        // One frame, its length known and one byte over: never buffered.
        .route("/over", counted(|| pattern(LIMIT + 1).into_response()))
        // A length hint within the limit that the body then outgrows: read, then handed on.
        .route("/outgrown", counted(|| chunked(LIMIT + 1, Some(100))))
        // Unknown length: a stream, never buffered.
        .route("/stream", counted(|| chunked(3000, None)))
        // Several frames of a known length within the limit: stored.
        .route("/chunked", counted(|| chunked(3000, Some(3000))))
        .layer(ResponseCacheLayer::new(cache.clone()));

    for (path, len) in [("/over", LIMIT + 1), ("/outgrown", LIMIT + 1), ("/stream", 3000)] {
        let before = runs.count();
        for _ in 0..2 {
            let (status, headers, body) = send(&app, path, &[]).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body.len(), len, "{path}");
            assert!(body[..] == pattern(len)[..], "{path}: every byte reaches the client");
            assert_eq!(x_cache(&headers), "none", "{path}");
        }
        assert_eq!(runs.count(), before + 2, "{path} is not cached");
    }
    let (_, headers, body) = send(&app, "/chunked", &[]).await;
    assert_eq!((x_cache(&headers), &body[..]), ("miss", &pattern(3000)[..]));
    let (_, headers, body) = send(&app, "/chunked", &[]).await;
    assert_eq!((x_cache(&headers), &body[..]), ("hit", &pattern(3000)[..]));
}

#[tokio::test]
async fn etags_revalidate_until_the_response_changes() {
    let redis = Redis::start();
    let cache = redis.cache("rc_etag", Serialization::Json).await;
    let runs = Runs::default();
    let app =
        missions(ResponseCacheLayer::new(cache.clone()).tags(["missions"]), runs.clone(), Duration::ZERO);

    let (status, headers, body) = send(&app, "/missions", &[]).await;
    let etag = headers[header::ETAG].to_str().unwrap().to_owned();
    println!("GET /missions -> {status} ETag {etag}");
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"missions v1"[..]));
    assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() == 34, "a strong tag: {etag}");

    let (status, headers, body) = send(&app, "/missions", &[("if-none-match", &etag)]).await;
    println!("GET /missions If-None-Match {etag} -> {status}");
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty(), "a 304 has no body");
    assert_eq!(headers[header::ETAG], etag.as_str());
    assert!(headers.get(header::CONTENT_TYPE).is_none());

    let (status, ..) = send(&app, "/missions", &[("if-none-match", &format!("\"other\", W/{etag}"))]).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED, "a list, and the weak form, match by weak comparison");
    let (status, _, body) = send(&app, "/missions", &[("if-none-match", "\"other\"")]).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"missions v1"[..]));

    cache.invalidate_tags(["missions"]).await.unwrap();
    let (status, headers, body) = send(&app, "/missions", &[("if-none-match", &etag)]).await;
    let fresh = headers[header::ETAG].to_str().unwrap();
    println!("after invalidation, GET /missions If-None-Match {etag} -> {status} ETag {fresh}");
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"missions v2"[..]));
    assert_ne!(fresh, etag);
    assert_eq!(runs.count(), 2);
}

#[tokio::test]
async fn a_cached_error_is_never_answered_as_not_modified() {
    let redis = Redis::start();
    let cache = redis.cache("rc_etag_404", Serialization::Json).await;
    let app = Router::new()
        .route("/gone", get(|| async { (StatusCode::NOT_FOUND, "no such mission") }))
        .layer(ResponseCacheLayer::new(cache.clone()));
    let (status, ..) = send(&app, "/gone", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Served from the cache now, ETag and all: `*` matches any current
    // representation, yet a 404 stays a 404 (RFC 9110 §13.2.1).
    let (status, headers, body) = send(&app, "/gone", &[("if-none-match", "*")]).await;
    assert_eq!(x_cache(&headers), "hit");
    assert_eq!((status, &body[..]), (StatusCode::NOT_FOUND, &b"no such mission"[..]));
    let etag = headers[header::ETAG].to_str().unwrap().to_owned();
    let (status, ..) = send(&app, "/gone", &[("if-none-match", &etag)]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_cache_fault_serves_the_handlers_own_response() {
    let mut redis = Redis::spawn();
    let config = redis.config("rc_fault").operation_timeout(Duration::from_millis(100)).build().unwrap();
    let cache = Cache::new(config).await.unwrap();
    let runs = Runs::default();
    let app = missions(ResponseCacheLayer::new(cache), runs.clone(), Duration::ZERO);
    let (_, headers, _) = send(&app, "/missions", &[]).await;
    assert_eq!(x_cache(&headers), "miss");

    redis.kill();
    for run in 2..=3 {
        let (status, _, body) = send(&app, "/missions", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("missions v{run}"), "the handler's own response");
    }
}
