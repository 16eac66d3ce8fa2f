//! `#[cached]` on methods: the receiver and skipped handles stay out of the key.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cache_runtime::{cached, Cache, KeyTtl};
use serde::{Deserialize, Serialize};
use support::{both_modes, Redis};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Agent {
    id: u32,
    model: String,
}

/// Stands in for a database connection: not serialisable, so it must be skipped.
struct Db {
    queries: AtomicU32,
}

impl Db {
    async fn load(&self, id: u32) -> Agent {
        self.queries.fetch_add(1, Ordering::SeqCst);
        Agent { id, model: format!("model-{id}") }
    }
}

struct AgentService {
    cache: Cache,
    db: Db,
}

impl AgentService {
    fn new(cache: Cache) -> Self {
        AgentService { cache, db: Db { queries: AtomicU32::new(0) } }
    }

    /// Reads an agent through the cache.
    #[cached(cache = self.cache, ttl = Duration::from_secs(600), prefix = "agents", tags = ["agents"])]
    pub async fn get_agent(&self, id: u32) -> Agent {
        self.db.load(id).await
    }

    #[cached(cache = self.cache, prefix = "agents_via", skip = [db])]
    async fn get_agent_via(&self, db: &Db, id: u32) -> Agent {
        db.load(id).await
    }

    fn queries(&self) -> u32 {
        self.db.queries.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn methods_cache_without_the_receiver_in_the_key() {
    let redis = Redis::start();
    for cache in both_modes(&redis, "methods").await {
        let service = AgentService::new(cache.clone());
        let a = service.get_agent(1).await;
        assert_eq!(service.get_agent(1).await, a);
        assert_eq!(service.queries(), 1, "{:?}", cache.mode());
        // A second service over the same cache shares the entry: the receiver is not in the key.
        let other = AgentService::new(cache.clone());
        assert_eq!(other.get_agent(1).await, a);
        assert_eq!(other.queries(), 0);
        assert_eq!(service.get_agent_key(1), "agents:v2:1");
        assert!(service.get_agent_invalidate(1).await.unwrap());
        service.get_agent(1).await;
        assert_eq!(service.queries(), 2);
        let KeyTtl::Expires(ttl) = cache.ttl("agents:v2:1").await.unwrap() else { panic!("no ttl") };
        assert!(ttl > Duration::from_secs(590));
    }
}

#[tokio::test]
async fn a_skipped_database_handle_is_not_part_of_the_key() {
    let redis = Redis::start();
    for cache in both_modes(&redis, "skip").await {
        let service = AgentService::new(cache.clone());
        let db = Db { queries: AtomicU32::new(0) };
        service.get_agent_via(&db, 3).await;
        service.get_agent_via(&service.db, 3).await;
        assert_eq!(db.queries.load(Ordering::SeqCst) + service.queries(), 1);
        assert_eq!(service.get_agent_via_key(3), "agents_via:v2:3");
        assert_eq!(service.get_agent_via_invalidate_all().await.unwrap(), 1);
        let fresh = service.get_agent_via_refresh(&db, 3).await;
        assert_eq!(fresh.id, 3);
        assert_eq!(db.queries.load(Ordering::SeqCst), 2);
    }
}

#[cached(ttl = "quantum_state", prefix = "quantum")]
async fn quantum_state(seed: u64) -> u64 {
    seed * 2
}

#[cached(profile = "api_response")]
async fn api_response(path: String) -> String {
    format!("GET {path}")
}

#[tokio::test]
async fn the_global_cache_named_ttls_and_profiles() {
    let redis = Redis::start();
    let config = redis
        .config("global")
        .named_ttl("quantum_state", Duration::from_secs(300))
        .named_ttl("api_response", Duration::from_secs(900))
        .build()
        .unwrap();
    let cache = cache_runtime::init(config).await.unwrap();
    assert_eq!(quantum_state(21).await, 42);
    let KeyTtl::Expires(ttl) = cache.ttl(&quantum_state_key(21)).await.unwrap() else { panic!("not stored") };
    assert!(ttl > Duration::from_secs(295) && ttl <= Duration::from_secs(300), "{ttl:?}");

    assert_eq!(api_response("/missions".into()).await, "GET /missions");
    let key = api_response_key("/missions".into());
    assert!(key.starts_with("api_response:"), "the profile names the prefix: {key}");
    let KeyTtl::Expires(ttl) = cache.ttl(&key).await.unwrap() else { panic!("not stored") };
    assert!(ttl > Duration::from_secs(895), "{ttl:?}");
}
