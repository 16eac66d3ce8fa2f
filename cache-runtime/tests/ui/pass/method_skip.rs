use cache_runtime::{cached, Cache};

pub struct Db;

pub struct Service {
    cache: Cache,
}

impl Service {
    #[cached(cache = self.cache, skip = [db], prefix = "agents")]
    pub async fn agent(&self, db: &Db, id: u32) -> String {
        let _ = db;
        format!("{id}")
    }

    #[cached(skip(db))]
    async fn with_global(&mut self, db: &Db, id: u32) -> u32 {
        let _ = db;
        id
    }
}

fn main() {
    let service = Service { cache: Cache::local(Default::default()) };
    let _ = service.agent(&Db, 1);
    let _ = service.agent_key(1);
    let _ = service.agent_invalidate(1);
    let _ = service.agent_invalidate_all();
    let _ = service.agent_refresh(&Db, 1);
    let _ = Service::with_global_key(1);
    let _ = Service::with_global_invalidate_all();
}
