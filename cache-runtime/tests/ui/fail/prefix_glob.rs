use cache_runtime::cached;

#[cached(prefix = "missions*")]
async fn globbed(id: u32) -> u32 {
    id
}

fn main() {}
