//! A tower layer that caches whole GET responses.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tower::{Layer, Service};

use crate::key::push_part;
use crate::Cache;

/// Caches GET responses by method, path and query, for the config's
/// `api_response_ttl` (else its default TTL).
#[derive(Clone)]
pub struct ResponseCacheLayer {
    cache: Cache,
    ttl: Duration,
    cache_authorized: bool,
}

impl ResponseCacheLayer {
    /// A layer over `cache`; requests with an `Authorization` header pass through uncached.
    pub fn new(cache: Cache) -> Self {
        let ttl = cache.config().named_ttl("api_response").unwrap_or(cache.config().default_ttl());
        ResponseCacheLayer { cache, ttl, cache_authorized: false }
    }

    /// Overrides the TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
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

#[derive(Serialize, Deserialize)]
struct Stored {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// Statuses a shared cache may keep without explicit freshness (RFC 9111 §3).
fn cacheable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 200 | 203 | 204 | 300 | 301 | 404 | 405 | 410 | 414 | 501)
}

fn forbids_storing(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(header::SET_COOKIE)
        || headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .map(str::trim)
                    .any(|d| d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("private"))
            })
        })
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "transfer-encoding" | "te" | "trailer" | "upgrade" | "content-length"
    )
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
        let mut inner = std::mem::replace(&mut self.inner, inner);
        let config = self.config.clone();
        let eligible = req.method() == Method::GET
            && (config.cache_authorized || !req.headers().contains_key(header::AUTHORIZATION))
            && !forbids_storing(req.headers());
        if !eligible {
            return Box::pin(inner.call(req));
        }
        let mut key = String::from("http:GET:");
        push_part(&mut key, req.uri().path_and_query().map_or("/", |pq| pq.as_str()));
        Box::pin(async move {
            // Taken before the read: a response computed before an invalidation is not stored after it.
            let fence = config.cache.fill_fence(std::time::Instant::now());
            // A cache fault never fails the request: it is served by the inner service.
            if let Ok(Some(stored)) = config.cache.get::<Stored>(&key).await {
                if let Some(response) = rebuild(stored) {
                    return Ok(response);
                }
            }
            let response = inner.call(req).await?;
            if !cacheable_status(response.status()) || forbids_storing(response.headers()) {
                return Ok(response);
            }
            let (mut parts, body) = response.into_parts();
            let bytes = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    tracing::warn!(error = %e, "response body failed: not cached");
                    return Ok(Response::from_parts(parts, Body::empty()));
                }
            };
            let stored = Stored {
                status: parts.status.as_u16(),
                headers: parts
                    .headers
                    .iter()
                    .filter(|(name, _)| !is_hop_by_hop(name))
                    .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                    .collect(),
                body: bytes.to_vec(),
            };
            match config.cache.fill(&key, &stored, config.ttl, fence).await {
                Ok(true) => {}
                Ok(false) => tracing::debug!("response not cached: invalidated while it was computed"),
                Err(e) => tracing::debug!(error = %e, "response not cached"),
            }
            parts.headers.insert("x-cache", HeaderValue::from_static("miss"));
            Ok(Response::from_parts(parts, Body::from(bytes)))
        })
    }
}

fn rebuild(stored: Stored) -> Option<Response<Body>> {
    let mut builder = Response::builder().status(StatusCode::from_u16(stored.status).ok()?);
    for (name, value) in stored.headers {
        builder = builder.header(HeaderName::try_from(name).ok()?, HeaderValue::from_bytes(&value).ok()?);
    }
    builder.header("x-cache", "hit").body(Body::from(stored.body)).ok()
}
