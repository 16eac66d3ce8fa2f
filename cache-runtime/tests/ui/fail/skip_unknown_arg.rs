use cache_runtime::cached;

#[cached(skip = [database])]
async fn load(id: u32) -> u32 {
    id
}

fn main() {}
