use cache_runtime::cached;

#[cached(prefix = "a", key_prefix = "b")]
async fn twice(id: u32) -> u32 {
    id
}

fn main() {}
