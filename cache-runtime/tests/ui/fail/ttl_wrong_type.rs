use cache_runtime::cached;

#[cached(ttl = [60])]
async fn listed(id: u32) -> u32 {
    id
}

fn main() {}
