//! The management API.
//!
//! Routes that change the cache or reveal key names are admin routes: they need
//! `Authorization: Bearer <token>`, compared in constant time. Without a token
//! configured they answer 403 until the app either configures one or opts out
//! by name ([`ManagementApi::allow_unauthenticated_admin`]). The open routes
//! (`stats`, `health`, the metrics) expose counts and versions, never key names.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tracing::{Instrument, Span};

use crate::glob::matches_everything;
use crate::key::push_part;
use crate::stats;
use crate::{Cache, CacheError, KeyTtl};

type Warmer =
    Arc<dyn Fn(Cache) -> Pin<Box<dyn Future<Output = Result<u64, CacheError>> + Send>> + Send + Sync>;

/// What `POST invalidate/{group}` (or an id field) deletes.
#[derive(Debug, Clone)]
pub enum Invalidation {
    /// Every entry carrying one of these tags.
    Tags(Vec<String>),
    /// Every key matching this glob (relative to the cache's prefix).
    Pattern(String),
}

impl Invalidation {
    /// Invalidation by tags.
    pub fn tags<I: IntoIterator<Item = S>, S: Into<String>>(tags: I) -> Self {
        Invalidation::Tags(tags.into_iter().map(Into::into).collect())
    }

    /// Invalidation by a glob pattern.
    pub fn pattern(pattern: impl Into<String>) -> Self {
        Invalidation::Pattern(pattern.into())
    }

    fn describe(&self) -> String {
        match self {
            Invalidation::Tags(tags) => format!("Tags {tags:?}"),
            Invalidation::Pattern(p) => format!("Pattern '{p}'"),
        }
    }

    async fn run(&self, cache: &Cache) -> Result<u64, CacheError> {
        match self {
            Invalidation::Tags(tags) => cache.invalidate_tags(tags).await,
            Invalidation::Pattern(pattern) => cache.delete_pattern(pattern).await,
        }
    }
}

/// Builds the management [`Router`]; mount it anywhere with `Router::nest`.
pub struct ManagementApi {
    cache: Cache,
    groups: BTreeMap<String, Invalidation>,
    id_fields: BTreeMap<String, String>,
    warmer: Option<Warmer>,
    admin: Admin,
}

/// Who may call the admin routes.
#[derive(Clone)]
enum Admin {
    Token(Arc<str>),
    Unconfigured,
    Anyone,
}

struct Shared {
    api: ManagementApi,
}

impl ManagementApi {
    /// An API over `cache` with no groups, id fields or warmer yet; its admin
    /// token is the cache's `admin_token` (settings file or `CACHE_ADMIN_TOKEN`).
    pub fn new(cache: Cache) -> Self {
        let admin = match cache.config().admin_token() {
            Some(token) => Admin::Token(token.into()),
            None => Admin::Unconfigured,
        };
        ManagementApi { cache, groups: BTreeMap::new(), id_fields: BTreeMap::new(), warmer: None, admin }
    }

    /// Registers `POST invalidate/{name}`.
    pub fn group(mut self, name: impl Into<String>, what: Invalidation) -> Self {
        self.groups.insert(name.into(), what);
        self
    }

    /// Lets `POST invalidate` take `{"<field>": id}`: the tag `template` with `{}`
    /// replaced by the id (escaped as in `#[cached]` tags) is invalidated.
    pub fn id_field(mut self, field: impl Into<String>, template: impl Into<String>) -> Self {
        self.id_fields.insert(field.into(), template.into());
        self
    }

    /// What `POST warm` runs; it returns how many entries it loaded.
    pub fn warmer<F, Fut>(mut self, warm: F) -> Self
    where
        F: Fn(Cache) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<u64, CacheError>> + Send + 'static,
    {
        self.warmer = Some(Arc::new(move |cache| Box::pin(warm(cache))));
        self
    }

    /// The bearer token the admin routes require, over the cache's `admin_token`.
    /// It is never logged or echoed.
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin = Admin::Token(token.into().into());
        self
    }

    /// Lets anyone who can reach the API clear and invalidate the cache, warm it
    /// and list its keys: only for an API that is reachable by operators alone
    /// (a loopback or internal-only listener).
    pub fn allow_unauthenticated_admin(mut self) -> Self {
        self.admin = Admin::Anyone;
        self
    }

    /// The routes, relative. Open: `stats`, `health`, `metrics/cache`,
    /// `metrics/cache/hit-rate`, `ready` (503 while start-up warmers run). Admin: `invalidate`, `invalidate/{group}`,
    /// `warm`, `clear`, `keys/{key}` (DELETE), `keys/{key}/ttl`, `metrics/cache/keys`.
    pub fn router(self) -> Router {
        let admin = self.admin.clone();
        let shared = Arc::new(Shared { api: self });
        let admin_routes = Router::new()
            .route("/invalidate", post(invalidate))
            .route("/invalidate/{group}", post(invalidate_group))
            .route("/warm", post(warm))
            .route("/clear", post(clear))
            .route("/keys/{key}", delete(delete_key))
            .route("/keys/{key}/ttl", get(key_ttl))
            .route("/metrics/cache/keys", get(list_keys))
            .route_layer(middleware::from_fn_with_state(admin, require_admin));
        Router::new()
            .route("/stats", get(stats))
            .route("/health", get(health))
            .route("/ready", get(ready))
            .route("/metrics/cache", get(cache_metrics))
            .route("/metrics/cache/hit-rate", get(hit_rate))
            .merge(admin_routes)
            .with_state(shared)
    }
}

/// `GET /metrics`: the cache's metrics in the Prometheus text format.
pub fn metrics_router(cache: Cache) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let cache = cache.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    cache.metrics().render(),
                )
            }
        }),
    )
}

/// A failed call, as JSON with a fitting status.
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        let status = match &e {
            CacheError::InvalidArgument(_) | CacheError::Config { .. } => StatusCode::BAD_REQUEST,
            CacheError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // Queued, not applied: accepted for processing, and not done.
            CacheError::Deferred(_) => StatusCode::ACCEPTED,
            e if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError { status, message: e.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "success": false, "message": self.message }))).into_response()
    }
}

type Reply = Result<Json<Value>, ApiError>;

fn deleted(keys_deleted: u64, message: String) -> Reply {
    Ok(Json(json!({ "success": true, "keys_deleted": keys_deleted, "message": message })))
}

async fn stats(State(s): State<Arc<Shared>>) -> Reply {
    let st = s.api.cache.stats().await?;
    // Both design documents' field names, so either's dashboards and scripts work.
    Ok(Json(json!({
        "connected": st.connected,
        "mode": st.mode,
        "redis_version": st.redis_version,
        "cache_keys": st.total_keys,
        "total_keys": st.total_keys,
        "redis_memory_used": st.used_memory_human,
        "used_memory_human": st.used_memory_human,
        "redis_memory_peak": st.peak_memory_human,
        "used_memory_bytes": st.used_memory_bytes,
        "connected_clients": st.connected_clients,
        "local_cache_size": st.local_cache_size,
        "hits": st.hits,
        "misses": st.misses,
        "hit_rate": st.hit_rate,
        "errors": st.errors,
        "breaker": st.breaker,
        "pending_invalidations": st.pending_invalidations,
    })))
}

/// One PING and in-memory counters: cheap enough for a probe every few seconds.
/// For an orchestrator's readiness probe: 503 while start-up warmers run.
async fn ready(State(s): State<Arc<Shared>>) -> (axum::http::StatusCode, Json<Value>) {
    let ready = s.api.cache.is_ready();
    let status = if ready { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": ready })))
}

async fn health(State(s): State<Arc<Shared>>) -> Reply {
    let health = s.api.cache.health().await;
    let m = s.api.cache.metrics();
    let (hits, misses) = (m.hits_total(), m.misses_total());
    let hit_rate = stats::hit_rate(hits, misses);
    Ok(Json(json!({
        "status": health.status,
        "connected": health.connected,
        "mode": health.mode,
        "breaker": health.breaker,
        "latency_ms": health.latency_ms,
        "error": health.error,
        "ready": health.ready,
        "stats": { "hits": hits, "misses": misses, "hit_rate": hit_rate, "errors": m.errors_total() },
    })))
}

/// `{"pattern"}`, `{"tags"}`, `{"key"}`, a registered id field, or
/// `{"invalidate_all": true}`: exactly one, nothing else.
async fn invalidate(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let span = tracing::info_span!("cache.api", operation = "invalidate", arguments = tracing::field::Empty);
    invalidate_by(&s, body, &span).instrument(span.clone()).await
}

/// The work of [`invalidate`]; `span` learns how many selectors the body gave.
async fn invalidate_by(s: &Shared, body: Bytes, span: &Span) -> Reply {
    let fields: Map<String, Value> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let everything = match fields.get("invalidate_all") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::bad_request(format!("`invalidate_all` must be true or false, not {other}")))
        }
    };
    let selectors: Vec<(&String, &Value)> =
        fields.iter().filter(|(k, _)| k.as_str() != "invalidate_all").collect();
    span.record("arguments", selectors.len() + usize::from(everything));
    let cache = &s.api.cache;
    match selectors.as_slice() {
        [] if everything => {
            let n = cache.clear().await?;
            deleted(n, format!("All cache entries invalidated ({n} keys deleted)"))
        }
        [(field, value)] => match (field.as_str(), value) {
            ("pattern", Value::String(pattern)) => {
                if matches_everything(pattern.as_bytes()) && !everything {
                    return Err(ApiError::bad_request(format!(
                        "pattern '{pattern}' matches every key: send \"invalidate_all\": true to confirm"
                    )));
                }
                let n = cache.delete_pattern(pattern).await?;
                deleted(n, format!("Pattern '{pattern}' invalidated ({n} keys deleted)"))
            }
            ("tags", Value::Array(tags)) => {
                let tags: Vec<&str> = tags
                    .iter()
                    .map(|t| {
                        t.as_str().ok_or_else(|| ApiError::bad_request("`tags` must be a list of strings"))
                    })
                    .collect::<Result<_, _>>()?;
                let n = cache.invalidate_tags(&tags).await?;
                deleted(n, format!("Tags {tags:?} invalidated ({n} keys deleted)"))
            }
            ("key", Value::String(key)) => {
                let n = u64::from(cache.delete(key).await?);
                deleted(n, format!("Key '{key}' invalidated ({n} keys deleted)"))
            }
            (field, value) if s.api.id_fields.contains_key(field) => {
                let id = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "`{field}` must be a string or number, not {other}"
                        )))
                    }
                };
                let mut part = String::new();
                push_part(&mut part, id.as_str());
                let tag = s.api.id_fields[field].replace("{}", &part);
                let n = cache.invalidate_tags([&tag]).await?;
                deleted(n, format!("{field} '{id}' invalidated ({n} keys deleted)"))
            }
            ("pattern" | "tags" | "key", other) => {
                Err(ApiError::bad_request(format!("`{field}` has the wrong type: {other}")))
            }
            (field, _) => Err(ApiError::bad_request(format!(
                "unknown field `{field}`; expected pattern, tags, key, invalidate_all{}",
                s.api.id_fields.keys().map(|f| format!(", {f}")).collect::<String>()
            ))),
        },
        [] => Err(ApiError::bad_request("give one of pattern, tags, key or a registered id field")),
        _ => Err(ApiError::bad_request("give exactly one of pattern, tags, key or a registered id field")),
    }
}

async fn invalidate_group(
    State(s): State<Arc<Shared>>,
    Path(group): Path<String>,
) -> Result<Json<Value>, Response> {
    let Some(what) = s.api.groups.get(&group) else {
        let known: Vec<&String> = s.api.groups.keys().collect();
        let body =
            json!({ "success": false, "message": format!("no group `{group}`; registered: {known:?}") });
        return Err((StatusCode::NOT_FOUND, Json(body)).into_response());
    };
    let span = tracing::info_span!("cache.api", operation = "invalidate_group", arguments = 1);
    let n = what.run(&s.api.cache).instrument(span).await.map_err(|e| ApiError::from(e).into_response())?;
    Ok(Json(json!({
        "success": true,
        "keys_deleted": n,
        "message": format!("{group} invalidated: {} ({n} keys deleted)", what.describe()),
    })))
}

async fn warm(State(s): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let Some(warmer) = &s.api.warmer else {
        return Err(ApiError {
            status: StatusCode::NOT_IMPLEMENTED,
            message: "no warmer is registered".into(),
        });
    };
    let started = Instant::now();
    let span = tracing::info_span!("cache.api", operation = "warm", arguments = 0);
    let loaded = warmer(s.api.cache.clone()).instrument(span).await?;
    let took = started.elapsed();
    s.api.cache.metrics().observe_warmup(took);
    Ok(Json(json!({
        "success": true,
        "entries_loaded": loaded,
        "duration_seconds": took.as_secs_f64(),
        "message": "Cache warming completed",
    })))
}

async fn clear(State(s): State<Arc<Shared>>) -> Reply {
    let span = tracing::info_span!("cache.api", operation = "clear", arguments = 0);
    let n = s.api.cache.clear().instrument(span).await?;
    deleted(n, format!("Cache cleared ({n} keys deleted)"))
}

async fn delete_key(State(s): State<Arc<Shared>>, Path(key): Path<String>) -> Reply {
    let span = tracing::info_span!("cache.api", operation = "delete_key", arguments = 1);
    let existed = s.api.cache.delete(&key).instrument(span).await?;
    let message = if existed { format!("Key '{key}' deleted") } else { format!("Key '{key}' did not exist") };
    Ok(Json(json!({ "success": true, "keys_deleted": u64::from(existed), "message": message })))
}

async fn key_ttl(State(s): State<Arc<Shared>>, Path(key): Path<String>) -> Reply {
    let ttl = s.api.cache.ttl(&key).await?;
    Ok(Json(json!({ "key": key, "ttl": ttl.as_redis_secs(), "exists": ttl != KeyTtl::Missing })))
}

async fn cache_metrics(State(s): State<Arc<Shared>>) -> Reply {
    let st = s.api.cache.stats().await?;
    Ok(Json(json!({
        "hits": st.hits,
        "misses": st.misses,
        "errors": st.errors,
        "hit_rate": st.hit_rate,
        "decode_failures": st.decode_failures,
        "type_mismatches": st.type_mismatches,
        "fills_refused": st.fills_refused,
        "oversized": st.oversized,
        "total_keys": st.total_keys,
        "local_cache_size": st.local_cache_size,
        "local_cache_bytes": st.local_cache_bytes,
        "mode": st.mode,
        "breaker": st.breaker,
        "breaker_opened": st.breaker_opened,
    })))
}

async fn hit_rate(State(s): State<Arc<Shared>>) -> Reply {
    let m = s.api.cache.metrics();
    let (hits, misses) = (m.hits_total(), m.misses_total());
    let rate = stats::hit_rate(hits, misses);
    // The thresholds of the BRAiN document: good above 80%, poor below 60%.
    let rating = match rate {
        r if r > 0.8 => "good",
        r if r >= 0.6 => "acceptable",
        _ => "poor",
    };
    Ok(Json(json!({ "hits": hits, "misses": misses, "hit_rate": rate, "rating": rating })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysQuery {
    #[serde(default)]
    cursor: u64,
    #[serde(default = "default_count")]
    count: usize,
    #[serde(default = "default_pattern")]
    pattern: String,
}

fn default_count() -> usize {
    100
}

fn default_pattern() -> String {
    "*".into()
}

async fn list_keys(
    State(s): State<Arc<Shared>>,
    query: Result<Query<KeysQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (keys, next) = s.api.cache.scan_keys(&q.pattern, q.cursor, q.count.clamp(1, 10_000)).await?;
    Ok(Json(json!({ "keys": keys, "cursor": next, "done": next == 0 })))
}

/// Lets a request through to an admin route, or answers 401 (no credentials)
/// or 403 (wrong ones, or no token configured). A token in the query string
/// is never accepted: it would end up in access logs and browser history.
async fn require_admin(State(admin): State<Admin>, request: Request, next: Next) -> Response {
    let refuse = |status, message: &str| ApiError { status, message: message.into() }.into_response();
    let token = match &admin {
        Admin::Anyone => return next.run(request).await,
        Admin::Unconfigured => {
            return refuse(
                StatusCode::FORBIDDEN,
                "no admin token is configured: set CACHE_ADMIN_TOKEN or `admin_token` in the settings \
                 file, or call ManagementApi::admin_token (ManagementApi::allow_unauthenticated_admin \
                 opts out)",
            )
        }
        Admin::Token(token) => token,
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => next.run(request).await,
        Some(_) => refuse(StatusCode::FORBIDDEN, "wrong admin token"),
        None => {
            let mut response = refuse(
                StatusCode::UNAUTHORIZED,
                "this route needs the admin token: send Authorization: Bearer <token> \
                 (a token in the query string is not read)",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            response
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
