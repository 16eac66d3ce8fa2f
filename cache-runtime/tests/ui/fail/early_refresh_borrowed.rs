use cache_runtime::cached;

struct Db;

#[cached(early_refresh = true, skip = [db])]
async fn rules(id: u32, db: &Db) -> u32 {
    let _ = db;
    id
}

struct Service;

impl Service {
    #[cached(soft_timeout = 1, cache = cache_runtime::get_cache())]
    async fn rate(&self, id: u32) -> u32 {
        id
    }
}

#[cached(soft_timeout = std::time::Duration::from_millis(200), fail_safe = false)]
async fn price(id: u32) -> u32 {
    id
}

#[cached(soft_timeout = "200ms")]
async fn quote(id: u32) -> u32 {
    id
}

fn main() {}
