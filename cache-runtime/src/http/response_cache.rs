//! A tower layer that caches whole GET responses through the cache-aside
//! engine of [`Cache::get_with`](crate::Cache::get_with).
//!
//! A response is an entry like any other: it lives under the cache's prefix,
//! carries the layer's tags, is filled under the fence taken before its read,
//! and concurrent misses of one key run the handler once. It is stored in the
//! binary codec whatever the cache's serialization: the body is bytes, which
//! JSON would write as an array of numbers.
//!
//! Key schema, relative to the cache's prefix:
//! `http:GET:{path and query}[:{vary header}={value}|:{vary header}…]`, the path
//! and query as one key part (`key.rs`: readable when short, `%`-escaped, a
//! `#` and a hash when longer than 64 bytes), then one part per header
//! declared with [`ResponseCacheLayer::vary`], in declaration order: its name
//! and `=` and its value as a key part, or the name alone when the request
//! does not send it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tower::{Layer, Service};

use crate::detached::Attached;
use crate::engine::{get_or_compute_as, Cacheable, Call, Sharing, Tags};
use crate::key::push_part;
use crate::schema::Key;
use crate::spec::{Spec, TtlSpec};
use crate::{Cache, IntoTtl, Serialization};

/// Caches GET responses by path and query (and the request headers declared
/// with [`vary`](Self::vary)), for the config's `api_response_ttl` (else its
/// default TTL), with a strong `ETag` answered by `304 Not Modified`.
///
/// A response is stored only if its status is one a shared cache may keep
/// without explicit freshness (200, 203, 204, 300, 301, 404, 405, 410, 414,
/// 501), it has no `Set-Cookie` and no `Cache-Control: no-store` or `private`,
/// its `Vary` names only declared headers (`Vary: *` never is), and its body
/// has a known length within the cache's `max_value_bytes`. Anything else
/// reaches the client as the handler made it, streaming bodies unbuffered.
///
/// ```no_run
/// # async fn demo(cache: cache_runtime::Cache) {
/// use axum::{http::header, routing::get, Router};
/// use cache_runtime::http::ResponseCacheLayer;
///
/// let app: Router = Router::new()
///     .route("/missions", get(|| async { "[]" }))
///     .layer(ResponseCacheLayer::new(cache.clone()).tags(["missions"]).vary([header::ACCEPT_LANGUAGE]));
/// // Later, after a mission changed:
/// cache.invalidate_tags(["missions"]).await.ok();
/// # let _ = app; }
/// ```
#[derive(Clone)]
pub struct ResponseCacheLayer {
    cache: Cache,
    ttl: Duration,
    tags: Arc<[String]>,
    vary: Arc<[HeaderName]>,
    cache_authorized: bool,
}

impl ResponseCacheLayer {
    /// A layer over `cache`; requests with an `Authorization` header pass through uncached.
    pub fn new(cache: Cache) -> Self {
        let ttl = cache.config().named_ttl("api_response").unwrap_or(cache.config().default_ttl());
        ResponseCacheLayer { cache, ttl, tags: Arc::new([]), vary: Arc::new([]), cache_authorized: false }
    }

    /// Overrides the TTL: seconds as an integer, or a `Duration`.
    pub fn ttl(mut self, ttl: impl IntoTtl) -> Self {
        self.ttl = ttl.into_ttl();
        self
    }

    /// Tags every response this layer stores, so [`Cache::invalidate_tags`]
    /// drops them with the data they were computed from.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags = self.tags.iter().cloned().chain(tags.into_iter().map(Into::into)).collect();
        self
    }

    /// The request headers responses may vary on: each enters the key, so
    /// every variant is an entry of its own. A response whose `Vary` names a
    /// header not declared here is not stored.
    ///
    /// Declared up front rather than learned from the first response, so the
    /// key is known before the read: one lookup and one flight per variant,
    /// no per-URL list of header names that could itself go stale or race an
    /// invalidation, and a variant count bounded by what the route declares.
    pub fn vary<I>(mut self, headers: I) -> Self
    where
        I: IntoIterator<Item = HeaderName>,
    {
        let mut vary: Vec<HeaderName> = self.vary.to_vec();
        for name in headers {
            if !vary.contains(&name) {
                vary.push(name);
            }
        }
        self.vary = vary.into();
        self
    }

    /// Also caches requests that carry `Authorization` (shared by every caller: only
    /// for responses that don't depend on who asks). Never put a layer with this on
    /// in front of the management API: an admin's key listing would be served to
    /// callers without the token.
    pub fn cache_authorized(mut self, on: bool) -> Self {
        self.cache_authorized = on;
        self
    }

    /// The key of `req`'s response (see the module's key schema).
    fn key(&self, req: &Request<Body>) -> Key {
        self.cache.inner.schema.entry_key_with(|key| self.push_key(key, req))
    }

    fn push_key(&self, key: &mut String, req: &Request<Body>) {
        key.push_str("http:GET:");
        push_part(key, req.uri().path_and_query().map_or("/", |pq| pq.as_str()));
        for name in self.vary.iter() {
            key.push(':');
            push_part(key, name.as_str());
            let mut values = req.headers().get_all(name).iter();
            let Some(first) = values.next() else { continue };
            key.push('=');
            // Repeated lines mean what their comma-joined list means (RFC 9110 §5.3).
            let mut joined = first.as_bytes().to_vec();
            for more in values {
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(more.as_bytes());
            }
            match std::str::from_utf8(&joined) {
                Ok(text) => push_part(key, text),
                Err(_) => push_part(key, &joined),
            }
        }
    }
}

impl<S> Layer<S> for ResponseCacheLayer {
    type Service = ResponseCache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResponseCache { inner, config: self.clone() }
    }
}

/// The service [`ResponseCacheLayer`] wraps around an inner service.
#[derive(Clone)]
pub struct ResponseCache<S> {
    inner: S,
    config: ResponseCacheLayer,
}

/// A cached response: stored in postcard, where the `Vec<u8>`s are a length
/// and the raw bytes.
#[derive(Clone, Serialize, Deserialize)]
struct StoredResponse {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// What the engine hands back for one request.
#[derive(Clone)]
enum Fetched {
    /// A stored response: read from the cache, shared by the flight's leader, or computed here.
    Stored(StoredResponse),
    /// The handler's response can't be stored. The call that ran the handler
    /// has it aside; a caller that waited for that call runs its own request.
    Uncacheable,
}

/// Selects caching of [`Fetched::Stored`] only.
struct WholeResponse;

impl Cacheable<WholeResponse> for Fetched {
    type Value = StoredResponse;

    fn stored(&self) -> Option<&StoredResponse> {
        match self {
            Fetched::Stored(stored) => Some(stored),
            Fetched::Uncacheable => None,
        }
    }

    fn from_cached(v: StoredResponse) -> Self {
        Fetched::Stored(v)
    }
}

/// Statuses a shared cache may keep without explicit freshness (RFC 9111 §3).
fn cacheable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 200 | 203 | 204 | 300 | 301 | 404 | 405 | 410 | 414 | 501)
}

fn forbids_storing(headers: &HeaderMap) -> bool {
    headers.contains_key(header::SET_COOKIE)
        || list_items(headers, &header::CACHE_CONTROL)
            .any(|d| d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("private"))
}

/// The items of a comma-separated header, every line of it, trimmed (unreadable lines skipped).
fn list_items<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

/// Whether every header the response's `Vary` names was declared (and so is in the key).
fn vary_is_keyed(headers: &HeaderMap, declared: &[HeaderName]) -> bool {
    list_items(headers, &header::VARY)
        .all(|item| item != "*" && declared.iter().any(|name| name.as_str().eq_ignore_ascii_case(item)))
}

/// Not stored: meaningful for one connection only, recomputed, or this layer's own.
fn is_not_kept(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "x-cache"
    )
}

/// A strong validator: the body's xxh3-128, so equal bodies get equal tags in every process.
fn etag_of(body: &[u8]) -> String {
    format!("\"{:032x}\"", xxhash_rust::xxh3::xxh3_128(body))
}

/// The request's `If-None-Match` lines against `etag`, by the weak comparison RFC 9110 §13.1.2 asks for.
fn none_match_hits(if_none_match: &[HeaderValue], etag: &[u8]) -> bool {
    let opaque = |tag: &[u8]| tag.strip_prefix(b"W/").map_or(tag, |t| t).to_vec();
    let ours = opaque(etag);
    if_none_match.iter().any(|line| {
        let mut rest = line.as_bytes();
        loop {
            rest = rest.trim_ascii_start();
            rest = rest.strip_prefix(b",").unwrap_or(rest).trim_ascii_start();
            if rest.is_empty() {
                return false;
            }
            if rest.starts_with(b"*") {
                return true;
            }
            let start = if rest.starts_with(b"W/\"") { 2 } else { 0 };
            if rest.get(start) != Some(&b'"') {
                return false;
            }
            let Some(len) = rest[start + 1..].iter().position(|&b| b == b'"') else {
                return false;
            };
            let end = start + 1 + len + 1;
            if opaque(&rest[..end]) == ours {
                return true;
            }
            rest = &rest[end..];
        }
    })
}

impl<S> Service<Request<Body>> for ResponseCache<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call; the fresh one waits for the next.
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        let config = self.config.clone();
        let eligible = req.method() == Method::GET
            && (config.cache_authorized || !req.headers().contains_key(header::AUTHORIZATION))
            && !forbids_storing(req.headers());
        if !eligible {
            let mut inner = inner;
            return Box::pin(inner.call(req));
        }
        Box::pin(serve(config, inner, req))
    }
}

/// One eligible request: through the engine, so misses of one key run the
/// handler once, fills are fenced and a cache fault serves the handler's own
/// response.
async fn serve<S>(
    config: ResponseCacheLayer,
    inner: S,
    req: Request<Body>,
) -> Result<Response<Body>, Infallible>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let key = config.key(&req);
    let if_none_match: Vec<HeaderValue> =
        req.headers().get_all(header::IF_NONE_MATCH).iter().cloned().collect();
    let spec = Spec {
        ttl: Some(TtlSpec::Fixed(config.ttl)),
        // Its `miss` takes the request: a Redis hit must not call it for tags.
        near: Some(false),
        fail_safe: Some(false),
        ..Spec::named("http")
    };
    let cache = &config.cache;
    let call = Call { cache, spec: &spec, key };
    let limit = cache.config().max_value_bytes();
    // Taken by whichever path runs the handler; still here if this call did not.
    let mut request = Some((inner, req));
    // The response of a handler run whose result can't be stored.
    let passed = std::sync::Mutex::new(None);
    let miss = || {
        let tags = Tags::Owned(config.tags.to_vec());
        let run = request.take();
        let passed = &passed;
        let declared = &config.vary;
        (tags, async move {
            let Some((mut inner, req)) = run else { return Fetched::Uncacheable };
            let Ok(response) = inner.call(req).await;
            match storable(response, declared, limit).await {
                Ok(stored) => Fetched::Stored(stored),
                Err(response) => {
                    *passed.lock().unwrap_or_else(|e| e.into_inner()) = Some(response);
                    Fetched::Uncacheable
                }
            }
        })
    };
    let fetched = get_or_compute_as::<WholeResponse, Fetched, _, _, _, _>(
        Serialization::Binary,
        call,
        |_| true,
        Sharing::cloned(),
        Sharing::none(),
        Attached,
        miss,
    )
    .await;
    let ran_here = request.is_none();
    match fetched {
        Fetched::Stored(stored) => Ok(rebuild(stored, &if_none_match, if ran_here { "miss" } else { "hit" })),
        Fetched::Uncacheable => {
            if let Some(response) = passed.into_inner().unwrap_or_else(|e| e.into_inner()) {
                return Ok(response);
            }
            match request {
                Some((mut inner, req)) => inner.call(req).await,
                // Not reached: a handler run here leaves its response either
                // stored (`Fetched::Stored`) or in `passed`.
                None => Ok(Response::builder()
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .body(Body::empty())
                    .unwrap_or_default()),
            }
        }
    }
}

/// The stored form of `response`, or `response` itself, its body intact, when
/// it must not or can't be stored.
async fn storable(
    response: Response<Body>,
    declared: &[HeaderName],
    limit: usize,
) -> Result<StoredResponse, Response<Body>> {
    if !cacheable_status(response.status())
        || forbids_storing(response.headers())
        || !vary_is_keyed(response.headers(), declared)
    {
        return Err(response);
    }
    let (parts, body) = response.into_parts();
    let bytes = match buffer(body, limit).await {
        Ok(bytes) => bytes,
        Err(body) => return Err(Response::from_parts(parts, body)),
    };
    let mut headers: Vec<(String, Vec<u8>)> = parts
        .headers
        .iter()
        .filter(|(name, _)| !is_not_kept(name))
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect();
    if !parts.headers.contains_key(header::ETAG) {
        headers.push((header::ETAG.as_str().to_owned(), etag_of(&bytes).into_bytes()));
    }
    Ok(StoredResponse { status: parts.status.as_u16(), headers, body: bytes.to_vec() })
}

/// Reads `body` whole if it has a known length within `limit`. A body of
/// unknown length (a stream) is handed back unread; one that turns out longer
/// than `limit`, ends in trailers or fails is handed back with what was read
/// put back in front, so the client gets every byte and frame the handler sent.
async fn buffer(mut body: Body, limit: usize) -> Result<Bytes, Body> {
    let hint = body.size_hint();
    if hint.exact().is_none() || hint.lower() > limit as u64 {
        return Err(body);
    }
    let mut read: Vec<Bytes> = Vec::new();
    let mut len = 0;
    loop {
        let pending = match body.frame().await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    len += data.len();
                    read.push(data);
                    if len <= limit {
                        continue;
                    }
                    None
                }
                Err(trailers) => Some(Ok(trailers)),
            },
            Some(Err(e)) => Some(Err(e)),
        };
        return Err(Body::new(Replay { read: read.into_iter(), pending, rest: body }));
    }
    Ok(match read.len() {
        1 => read.swap_remove(0),
        _ => read.concat().into(),
    })
}

/// A body handed on after part of it was read: the chunks read, the frame
/// that stopped the reading (trailers or an error), then the rest.
struct Replay {
    read: std::vec::IntoIter<Bytes>,
    pending: Option<Result<Frame<Bytes>, axum::Error>>,
    rest: Body,
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Some(chunk) = self.read.next() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(frame) = self.pending.take() {
            return Poll::Ready(Some(frame));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self.read.as_slice().iter().map(|c| c.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(read + rest.lower());
        if let Some(upper) = rest.upper() {
            hint.set_upper(read + upper);
        }
        hint
    }
}

/// The response `stored` describes, or a `304 Not Modified` when the request's
/// `If-None-Match` names its `ETag`.
fn rebuild(
    stored: StoredResponse,
    if_none_match: &[HeaderValue],
    cache_status: &'static str,
) -> Response<Body> {
    let mut headers = HeaderMap::with_capacity(stored.headers.len() + 1);
    for (name, value) in stored.headers {
        // Written from a `HeaderMap`, so they parse; a foreign entry's odd header is dropped.
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::from_bytes(&value)) {
            headers.append(name, value);
        }
    }
    headers.insert("x-cache", HeaderValue::from_static(cache_status));
    // A precondition applies only where the response would be a 2xx (RFC 9110
    // §13.2.1): a cached 404 is served as a 404, never as "not modified".
    let success = (200..300).contains(&stored.status);
    let not_modified = success
        && headers.get(header::ETAG).is_some_and(|etag| none_match_hits(if_none_match, etag.as_bytes()));
    let (status, body) = if not_modified {
        // What RFC 9110 §15.4.5 has a 304 repeat; the rest describes a body it doesn't have.
        let keep = [
            header::ETAG,
            header::CACHE_CONTROL,
            header::VARY,
            header::EXPIRES,
            header::CONTENT_LOCATION,
            header::DATE,
            HeaderName::from_static("x-cache"),
        ];
        let mut kept = HeaderMap::with_capacity(keep.len());
        for name in keep {
            for value in headers.get_all(&name) {
                kept.append(name.clone(), value.clone());
            }
        }
        headers = kept;
        (StatusCode::NOT_MODIFIED, Body::empty())
    } else {
        (StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK), Body::from(stored.body))
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}
