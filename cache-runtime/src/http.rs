//! HTTP for operators and services: the management API of both design documents
//! as an axum [`Router`](axum::Router), a Prometheus `/metrics` route, and a
//! tower layer caching whole GET responses.
//!
//! ```no_run
//! # async fn demo(cache: cache_runtime::Cache) {
//! use cache_runtime::http::{Invalidation, ManagementApi};
//!
//! let app = axum::Router::new()
//!     .nest("/api/cache", ManagementApi::new(cache.clone())
//!         .group("missions", Invalidation::tags(["missions"]))
//!         .id_field("mission_id", "mission:{}")
//!         .admin_token("s3cret")
//!         .router())
//!     .merge(cache_runtime::http::metrics_router(cache));
//! # let _ = app; }
//! ```

mod api;
mod response_cache;

pub use api::{metrics_router, Invalidation, ManagementApi};
pub use response_cache::{ResponseCache, ResponseCacheLayer};
