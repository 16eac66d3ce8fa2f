//! The missions API of the design documents on axum: `#[cached]` reads, writes
//! that invalidate, whole-response caching, the management API under
//! `/api/cache`, and `/metrics`.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379/0 CACHE_ADMIN_TOKEN=s3cret cargo run --example service
//! curl localhost:8000/missions/m1
//! curl localhost:8000/api/cache/stats
//! ```

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use cache_runtime::http::{metrics_router, Invalidation, ManagementApi, ResponseCacheLayer};
use cache_runtime::{cached, Cache, CacheConfig, CacheError};
use serde::{Deserialize, Serialize};

/// A mission, as the database holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mission {
    pub id: String,
    pub name: String,
    pub status: String,
}

/// Stands in for the database: a map and 20 ms per query.
#[derive(Default)]
pub struct Db {
    missions: RwLock<HashMap<String, Mission>>,
    pub queries: std::sync::atomic::AtomicU64,
}

impl Db {
    async fn load(&self, id: &str) -> Option<Mission> {
        self.queries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.missions.read().unwrap().get(id).cloned()
    }

    fn store(&self, mission: Mission) {
        self.missions.write().unwrap().insert(mission.id.clone(), mission);
    }

    fn all(&self) -> Vec<Mission> {
        let mut all: Vec<Mission> = self.missions.read().unwrap().values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }
}

/// The application: its database and its cache.
pub struct AppState {
    pub db: Db,
    pub cache: Cache,
}

impl AppState {
    #[cached(cache = self.cache, prefix = "missions", ttl = 60, tags = ["missions", "mission:{id}"])]
    async fn mission(&self, id: String) -> Option<Mission> {
        self.db.load(&id).await
    }
}

async fn get_mission(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Mission>, StatusCode> {
    app.mission(id).await.map(Json).ok_or(StatusCode::NOT_FOUND)
}

#[derive(Deserialize)]
struct MissionUpdate {
    name: String,
    status: String,
}

async fn put_mission(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(update): Json<MissionUpdate>,
) -> Json<Mission> {
    let mission = Mission { id: id.clone(), name: update.name, status: update.status };
    app.db.store(mission.clone());
    // The write lands first, then the entries that could show the old mission go.
    if let Err(e) = app.cache.invalidate_tags([format!("mission:{id}"), "mission-list".to_owned()]).await {
        tracing::warn!(error = %e, "invalidation queued for replay");
    }
    Json(mission)
}

async fn list_missions(State(app): State<Arc<AppState>>) -> Json<Vec<Mission>> {
    Json(app.db.all())
}

/// The whole service, for `main` and for tests. The management API's admin
/// routes take the cache's `admin_token` (`CACHE_ADMIN_TOKEN`).
pub fn app(state: Arc<AppState>) -> Router {
    app_with(state, |api| api)
}

/// The service with its management API adjusted by `admin` (tests use it to
/// set a token or open the admin routes).
pub fn app_with(state: Arc<AppState>, admin: impl FnOnce(ManagementApi) -> ManagementApi) -> Router {
    let cache = state.cache.clone();
    let management = ManagementApi::new(cache.clone())
        .group("missions", Invalidation::tags(["missions"]))
        .group("agents", Invalidation::tags(["agents"]))
        .group("policies", Invalidation::tags(["policies"]))
        .group("llm-config", Invalidation::pattern("llm:*"))
        .id_field("mission_id", "mission:{}")
        .warmer({
            let state = state.clone();
            move |_cache| {
                let state = state.clone();
                async move {
                    let missions = state.db.all();
                    for m in &missions {
                        state.mission_refresh(m.id.clone()).await;
                    }
                    Ok::<_, CacheError>(missions.len() as u64)
                }
            }
        });
    let management = admin(management);
    let missions = Router::new()
        .route("/missions", get(list_missions))
        // The list goes with every mission (the `missions` group) and with any one mission's update.
        .layer(ResponseCacheLayer::new(cache.clone()).tags(["missions", "mission-list"]))
        .route("/missions/{id}", get(get_mission).put(put_mission))
        .with_state(state);
    missions.nest("/api/cache", management.router()).merge(metrics_router(cache))
}

/// Seeds the database with the design document's missions.
pub fn seed(db: &Db) {
    for (id, name) in
        [("m1", "Survey of the outer belt"), ("m2", "Relay maintenance"), ("mission_123", "Deep scan")]
    {
        db.store(Mission { id: id.into(), name: name.into(), status: "active".into() });
    }
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("cache_runtime=info").init();
    let config = CacheConfig::builder()
        .key_prefix("brain")
        .metrics_namespace("brain")
        .named_ttl("api_response", Duration::from_secs(900))
        .build()?
        .with_env()?;
    let cache = Cache::new(config).await?;
    let state = Arc::new(AppState { db: Db::default(), cache: cache.clone() });
    seed(&state.db);
    let addr = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("missions service on http://{addr} (mode {})", state.cache.mode().as_str());
    if state.cache.config().admin_token().is_none() {
        println!("no CACHE_ADMIN_TOKEN: the admin routes under /api/cache answer 403");
    }
    axum::serve(listener, app(state)).await?;
    Ok(())
}
