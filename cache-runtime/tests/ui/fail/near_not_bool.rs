use cache_runtime::cached;

#[cached(near = "yes")]
async fn rules(id: u32) -> u32 {
    id
}

fn main() {}
