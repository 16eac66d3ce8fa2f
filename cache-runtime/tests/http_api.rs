//! The example service on a loopback port, driven over HTTP: every management
//! endpoint, response caching, `/metrics`, and the deployment files' metric names.

mod support;

#[allow(dead_code)]
#[path = "../examples/service.rs"]
mod service;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cache_runtime::http::ManagementApi;
use cache_runtime::{Cache, CacheConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{unique_prefix, Redis};

struct Running {
    base: String,
    state: Arc<service::AppState>,
    http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.server.abort();
    }
}

const TOKEN: &str = "s3cret";

/// The service with the admin token configured as users do: in the cache's config.
async fn start(redis: &Redis) -> Running {
    start_with(redis, Some(TOKEN), |api| api).await
}

async fn start_with(
    redis: &Redis,
    token: Option<&str>,
    admin: impl FnOnce(ManagementApi) -> ManagementApi,
) -> Running {
    let mut config = CacheConfig::builder()
        .redis_url(redis.url())
        .key_prefix(unique_prefix("svc"))
        .metrics_namespace("brain")
        .named_ttl("api_response", std::time::Duration::from_secs(900));
    if let Some(token) = token {
        config = config.admin_token(token);
    }
    let cache = Cache::new(config.build().unwrap()).await.unwrap();
    let state = Arc::new(service::AppState { db: service::Db::default(), cache });
    service::seed(&state.db);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = service::app_with(state.clone(), admin);
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Running { base, state, http: reqwest::Client::new(), server }
}

impl Running {
    /// A call as the operator: with the admin token.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(Some(TOKEN), method, path, body).await
    }

    async fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.parse().unwrap(), url);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn raw_post(&self, path: &str, body: &'static str) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap())
    }

    fn queries(&self) -> u64 {
        self.state.db.queries.load(Ordering::SeqCst)
    }

    async fn scrape(&self) -> String {
        self.http.get(format!("{}/metrics", self.base)).send().await.unwrap().text().await.unwrap()
    }
}

fn metric(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the scrape"))
}

#[tokio::test]
async fn missions_are_cached_and_invalidated_over_http() {
    let redis = Redis::start();
    let app = start(&redis).await;
    let (status, first) = app.call("GET", "/missions/m1", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["id"], "m1");
    app.call("GET", "/missions/m1", None).await;
    assert_eq!(app.queries(), 1, "the second read is a hit");
    let (status, _) = app.call("GET", "/missions/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, updated) =
        app.call("PUT", "/missions/m1", Some(json!({"name": "Renamed", "status": "done"}))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["status"], "done");
    let (_, after) = app.call("GET", "/missions/m1", None).await;
    assert_eq!(after["name"], "Renamed", "no stale read after the update");

    // Whole responses: the second GET /missions comes from the cache.
    let first = app.http.get(format!("{}/missions", app.base)).send().await.unwrap();
    assert_eq!(first.headers()["x-cache"], "miss");
    let second = app.http.get(format!("{}/missions", app.base)).send().await.unwrap();
    assert_eq!(second.headers()["x-cache"], "hit");
    assert_eq!(second.json::<Value>().await.unwrap().as_array().unwrap().len(), 3);
    let authorized = app.http.get(format!("{}/missions", app.base)).bearer_auth("user").send().await.unwrap();
    assert!(authorized.headers().get("x-cache").is_none(), "requests with Authorization bypass the cache");

    // An update drops the cached list through its tag.
    app.call("PUT", "/missions/m2", Some(json!({"name": "Relay rebuilt", "status": "done"}))).await;
    let after = app.http.get(format!("{}/missions", app.base)).send().await.unwrap();
    assert_eq!(after.headers()["x-cache"], "miss");
    let list = after.json::<Value>().await.unwrap();
    assert_eq!(list[1]["name"], "Relay rebuilt", "no stale list after the update");
    let (status, _) = app.call("POST", "/api/cache/invalidate/missions", None).await;
    assert_eq!(status, StatusCode::OK);
    let again = app.http.get(format!("{}/missions", app.base)).send().await.unwrap();
    assert_eq!(again.headers()["x-cache"], "miss", "the missions group drops the cached list too");
}

#[tokio::test]
async fn every_management_endpoint() {
    let redis = Redis::start();
    let app = start(&redis).await;
    let cache = &app.state.cache;
    app.call("GET", "/missions/m1", None).await;
    app.call("GET", "/missions/m2", None).await;

    let (status, stats) = app.call("GET", "/api/cache/stats", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((stats["connected"].clone(), stats["mode"].clone()), (json!(true), json!("redis")));
    assert_eq!(stats["cache_keys"], stats["total_keys"]);
    assert_eq!(stats["total_keys"], 2);
    assert!(stats["redis_version"].as_str().is_some() && stats["used_memory_human"].as_str().is_some());

    let (status, health) = app.call("GET", "/api/cache/health", None).await;
    assert_eq!(
        (status, health["status"].clone(), health["connected"].clone()),
        (StatusCode::OK, json!("healthy"), json!(true))
    );

    // invalidate: by id field, tags, pattern, key
    let (status, body) = app.call("POST", "/api/cache/invalidate", Some(json!({"mission_id": "m1"}))).await;
    assert_eq!(
        (status, body["success"].clone(), body["keys_deleted"].clone()),
        (StatusCode::OK, json!(true), json!(1))
    );
    let (_, body) = app.call("POST", "/api/cache/invalidate", Some(json!({"tags": ["missions"]}))).await;
    assert_eq!(body["keys_deleted"], 1);
    cache.set("llm:model", &"gpt").await.unwrap();
    cache.set("missions:queue:1", &1).await.unwrap();
    let (_, body) =
        app.call("POST", "/api/cache/invalidate", Some(json!({"pattern": "missions:queue:*"}))).await;
    assert_eq!(body["message"], "Pattern 'missions:queue:*' invalidated (1 keys deleted)");
    cache.set("plain", &1).await.unwrap();
    let (_, body) = app.call("POST", "/api/cache/invalidate", Some(json!({"key": "plain"}))).await;
    assert_eq!(body["keys_deleted"], 1);

    // bad input is a 400 with a message, and deletes nothing
    for bad in [
        json!({"pattern": "*"}),
        json!({"colour": "red"}),
        json!({}),
        json!({"tags": "missions"}),
        json!({"key": "a", "pattern": "b"}),
    ] {
        let (status, body) = app.call("POST", "/api/cache/invalidate", Some(bad.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{bad}: {body}");
    }
    let (status, body) = app.raw_post("/api/cache/invalidate", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["message"].as_str().unwrap().contains("invalid JSON"));
    assert!(cache.exists("llm:model").await.unwrap());

    // groups
    let (status, body) = app.call("POST", "/api/cache/invalidate/llm-config", None).await;
    assert_eq!((status, body["keys_deleted"].clone()), (StatusCode::OK, json!(1)));
    for group in ["missions", "agents", "policies"] {
        let (status, _) = app.call("POST", &format!("/api/cache/invalidate/{group}"), None).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _) = app.call("POST", "/api/cache/invalidate/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // keys: ttl and delete
    cache.set("missions:mission_123", &"x").ttl(245).await.unwrap();
    let (_, ttl) = app.call("GET", "/api/cache/keys/missions:mission_123/ttl", None).await;
    assert_eq!((ttl["key"].clone(), ttl["exists"].clone()), (json!("missions:mission_123"), json!(true)));
    assert!(ttl["ttl"].as_i64().unwrap() > 240);
    let (_, body) = app.call("DELETE", "/api/cache/keys/missions:mission_123", None).await;
    assert_eq!(body["message"], "Key 'missions:mission_123' deleted");
    let (_, ttl) = app.call("GET", "/api/cache/keys/missions:mission_123/ttl", None).await;
    assert_eq!((ttl["ttl"].clone(), ttl["exists"].clone()), (json!(-2), json!(false)));

    // warm, metrics, hit rate
    let (status, body) = app.call("POST", "/api/cache/warm", None).await;
    assert_eq!((status, body["entries_loaded"].clone()), (StatusCode::OK, json!(3)));
    let queries = app.queries();
    app.call("GET", "/missions/mission_123", None).await;
    assert_eq!(app.queries(), queries, "warmed entries are hits");
    let (_, metrics) = app.call("GET", "/api/cache/metrics/cache", None).await;
    assert!(metrics["hits"].as_u64().unwrap() >= 1);
    let (_, rate) = app.call("GET", "/api/cache/metrics/cache/hit-rate", None).await;
    assert!(["good", "acceptable", "poor"].contains(&rate["rating"].as_str().unwrap()));

    // keys listing: admin only, paged
    let url = format!("{}/api/cache/metrics/cache/keys?count=2", app.base);
    assert_eq!(app.http.get(&url).send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.http.get(&url).bearer_auth("wrong").send().await.unwrap().status(), StatusCode::FORBIDDEN);
    let mut all = Vec::new();
    let mut cursor = 0;
    loop {
        let page: Value = app
            .http
            .get(format!("{url}&cursor={cursor}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        all.extend(page["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_owned()));
        cursor = page["cursor"].as_u64().unwrap();
        if cursor == 0 {
            break;
        }
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 3, "{all:?}");
    let bad = app.http.get(format!("{url}&colour=red")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    // clear
    let (_, body) = app.call("POST", "/api/cache/clear", None).await;
    assert_eq!(body["success"], true);
    let (_, stats) = app.call("GET", "/api/cache/stats", None).await;
    assert_eq!(stats["total_keys"], 0);
}

#[tokio::test]
async fn metrics_move_and_the_deployment_files_name_real_metrics() {
    let redis = Redis::start();
    let app = start(&redis).await;
    let before = app.scrape().await;
    app.call("GET", "/missions/m1", None).await;
    app.call("GET", "/missions/m1", None).await;
    app.call("POST", "/api/cache/invalidate", Some(json!({"tags": ["missions"]}))).await;
    app.state.cache.refresh_gauges().await.unwrap();
    let after = app.scrape().await;
    assert_eq!(metric(&after, "brain_cache_hits_total"), metric(&before, "brain_cache_hits_total") + 1.0);
    assert_eq!(metric(&after, "brain_cache_misses_total"), metric(&before, "brain_cache_misses_total") + 1.0);
    assert!(metric(&after, "brain_cache_operations_total{operation=\"get\",status=\"success\"}") >= 2.0);
    assert!(metric(&after, "brain_cache_memory_bytes") > 0.0);
    assert!(after.contains("brain_cache_operation_duration_seconds_bucket"));
    assert!(after.contains("brain_cache_ttl_seconds{key_type=\"api_response\"} 900"));

    // Every metric the alert rules and the dashboard query exists in this scrape.
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let alerts: yaml_serde::Value = yaml_serde::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let rules = alerts["groups"][0]["rules"].as_sequence().unwrap();
    let names: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    assert!(names.contains(&"CacheHitRateLow") && names.contains(&"CacheConnectionFailed"));
    let mut exprs: Vec<String> = rules.iter().map(|r| r["expr"].as_str().unwrap().to_owned()).collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/cache-dashboard.json")).unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert_eq!(panels.len(), 4);
    exprs.extend(panels.iter().map(|p| p["targets"][0]["expr"].as_str().unwrap().to_owned()));
    for expr in &exprs {
        for name in
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("brain_"))
        {
            let base = name.trim_end_matches("_bucket");
            assert!(
                after.contains(&format!("\n{base}")) || after.contains(&format!("\n{name}")),
                "{name} (from `{expr}`) is not exported"
            );
        }
    }
    let compose: yaml_serde::Value =
        yaml_serde::from_str(&std::fs::read_to_string(format!("{root}/docker-compose.yml")).unwrap())
            .unwrap();
    assert_eq!(compose["services"]["redis"]["image"], "redis:7-alpine");
    let redis_conf = std::fs::read_to_string(format!("{root}/config/redis.conf")).unwrap();
    for line in [
        "maxmemory 512mb",
        "maxmemory-policy allkeys-lru",
        "lazyfree-lazy-eviction yes",
        "activerehashing yes",
        "tcp-keepalive",
    ] {
        assert!(redis_conf.contains(line), "redis.conf lacks {line}");
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Admin {
    Configured,
    Unconfigured,
    OptedOut,
}

#[derive(Clone, Copy, Debug)]
enum Credential {
    Missing,
    Wrong,
    InQuery,
    Right,
}

/// Every route of the service's cache API: method, path, body, and whether it
/// changes the cache or reveals key names.
fn routes() -> Vec<(&'static str, &'static str, Option<Value>, bool)> {
    vec![
        ("GET", "/api/cache/stats", None, false),
        ("GET", "/api/cache/health", None, false),
        ("GET", "/api/cache/metrics/cache", None, false),
        ("GET", "/api/cache/metrics/cache/hit-rate", None, false),
        ("GET", "/metrics", None, false),
        ("POST", "/api/cache/clear", None, true),
        ("POST", "/api/cache/invalidate", Some(json!({"invalidate_all": true})), true),
        ("POST", "/api/cache/invalidate", Some(json!({"tags": ["missions"]})), true),
        ("POST", "/api/cache/invalidate", Some(json!({"mission_id": "k0"})), true),
        ("POST", "/api/cache/invalidate/missions", None, true),
        ("POST", "/api/cache/warm", None, true),
        ("DELETE", "/api/cache/keys/missions:k0", None, true),
        ("GET", "/api/cache/keys/missions:k0/ttl", None, true),
        ("GET", "/api/cache/metrics/cache/keys", None, true),
    ]
}

fn expected(admin: Admin, credential: Credential, admin_route: bool) -> StatusCode {
    match (admin_route, admin, credential) {
        (false, _, _) | (true, Admin::OptedOut, _) | (true, Admin::Configured, Credential::Right) => {
            StatusCode::OK
        }
        (true, Admin::Unconfigured, _) | (true, Admin::Configured, Credential::Wrong) => {
            StatusCode::FORBIDDEN
        }
        (true, Admin::Configured, Credential::Missing | Credential::InQuery) => StatusCode::UNAUTHORIZED,
    }
}

async fn plant(cache: &Cache) -> usize {
    for i in 0..5 {
        cache.set(&format!("missions:k{i}"), &i).tags(["missions", &format!("mission:k{i}")]).await.unwrap();
    }
    cache.set("llm:x", &"model").await.unwrap();
    6
}

async fn live_keys(cache: &Cache) -> usize {
    let mut n = 0;
    for key in ["missions:k0", "missions:k1", "missions:k2", "missions:k3", "missions:k4", "llm:x"] {
        n += usize::from(cache.exists(key).await.unwrap());
    }
    n
}

#[tokio::test]
async fn the_admin_routes_need_the_token_and_refused_calls_delete_nothing() {
    let redis = Redis::start();
    for admin in [Admin::Configured, Admin::Unconfigured, Admin::OptedOut] {
        let app = match admin {
            Admin::Configured => start(&redis).await,
            Admin::Unconfigured => start_with(&redis, None, |api| api).await,
            Admin::OptedOut => start_with(&redis, None, ManagementApi::allow_unauthenticated_admin).await,
        };
        let cache = &app.state.cache;
        let planted = plant(cache).await;
        for credential in [Credential::Missing, Credential::Wrong, Credential::InQuery, Credential::Right] {
            for (method, path, body, admin_route) in routes() {
                let want = expected(admin, credential, admin_route);
                if want == StatusCode::OK {
                    continue; // refused calls first, against untouched keys
                }
                let (token, path) = match credential {
                    Credential::Missing => (None, path.to_owned()),
                    Credential::Wrong => (Some("not-the-token"), path.to_owned()),
                    Credential::InQuery => (None, format!("{path}?token={TOKEN}")),
                    Credential::Right => (Some(TOKEN), path.to_owned()),
                };
                let (status, reply) = app.call_as(token, method, &path, body.clone()).await;
                assert_eq!(status, want, "{admin:?} {credential:?} {method} {path}: {reply}");
                let message = reply["message"].as_str().unwrap_or_default();
                assert!(
                    !message.is_empty() && !message.contains(TOKEN),
                    "{admin:?} {method} {path}: {reply}"
                );
                if admin == Admin::Unconfigured {
                    assert!(message.contains("CACHE_ADMIN_TOKEN"), "says how to configure one: {message}");
                }
            }
        }
        assert_eq!(live_keys(cache).await, planted, "{admin:?}: a refused call deleted something");

        // Control: the same calls, allowed, do act.
        for credential in [Credential::Missing, Credential::Wrong, Credential::InQuery, Credential::Right] {
            for (method, path, body, admin_route) in routes() {
                if expected(admin, credential, admin_route) != StatusCode::OK {
                    continue;
                }
                plant(cache).await;
                let token = match credential {
                    Credential::Wrong => Some("not-the-token"),
                    Credential::Right => Some(TOKEN),
                    Credential::Missing | Credential::InQuery => None,
                };
                let (status, reply) = app.call_as(token, method, path, body.clone()).await;
                assert_eq!(status, StatusCode::OK, "{admin:?} {credential:?} {method} {path}: {reply}");
                if path == "/api/cache/clear" {
                    assert_eq!(live_keys(cache).await, 0, "{admin:?}: an allowed clear clears");
                }
            }
        }
    }
}

#[tokio::test]
async fn a_401_names_the_header_and_a_query_token_is_not_read() {
    let redis = Redis::start();
    let app = start(&redis).await;
    let resp = app.http.post(format!("{}/api/cache/clear?token={TOKEN}", app.base)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let body: Value = resp.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("Authorization: Bearer"), "{body}");
}

#[tokio::test]
async fn patterns_that_match_everything_need_invalidate_all() {
    let redis = Redis::start();
    let app = start(&redis).await;
    let cache = &app.state.cache;
    let planted = plant(cache).await;
    for pattern in ["*", "?*", "*:*", "[^x]*", "**", "*?", "[!-~]*", "*[^:]"] {
        let (status, body) =
            app.call("POST", "/api/cache/invalidate", Some(json!({"pattern": pattern}))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{pattern}: {body}");
        assert!(body["message"].as_str().unwrap().contains("invalidate_all"), "{body}");
    }
    assert_eq!(live_keys(cache).await, planted, "nothing deleted without confirmation");
    let (status, body) =
        app.call("POST", "/api/cache/invalidate", Some(json!({"pattern": "missions:k*"}))).await;
    assert_eq!((status, body["keys_deleted"].clone()), (StatusCode::OK, json!(5)), "targeted patterns pass");
    let (status, body) = app
        .call("POST", "/api/cache/invalidate", Some(json!({"pattern": "*:*", "invalidate_all": true})))
        .await;
    assert_eq!((status, body["keys_deleted"].clone()), (StatusCode::OK, json!(1)), "{body}");
    assert_eq!(live_keys(cache).await, 0);
}

#[tokio::test]
async fn health_scans_nothing() {
    // A server of our own: nothing else may SCAN it while the counter is read.
    let redis = Redis::spawn();
    let app = start(&redis).await;
    let mut raw = redis.raw().await;
    let stat = |info: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_scan:calls="))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before: String = redis::cmd("INFO").arg("commandstats").query_async(&mut raw).await.unwrap();
    for _ in 0..20 {
        let (status, body) = app.call_as(None, "GET", "/api/cache/health", None).await;
        assert_eq!((status, body["status"].clone()), (StatusCode::OK, json!("healthy")));
    }
    let after: String = redis::cmd("INFO").arg("commandstats").query_async(&mut raw).await.unwrap();
    assert_eq!(stat(&after), stat(&before), "20 health probes ran SCAN");
    // Control: stats does scan, so the counter can move.
    app.call_as(None, "GET", "/api/cache/stats", None).await;
    let control: String = redis::cmd("INFO").arg("commandstats").query_async(&mut raw).await.unwrap();
    assert!(stat(&control) > stat(&after));
}
