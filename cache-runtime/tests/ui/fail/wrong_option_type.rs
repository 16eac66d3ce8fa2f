use cache_runtime::cached;

#[cached(prefix = 5)]
async fn numbered(id: u32) -> u32 {
    id
}

fn main() {}
