use cache_runtime::cached;

#[cached(ttl = 0)]
async fn never_kept(id: u32) -> u32 {
    id
}

fn main() {}
