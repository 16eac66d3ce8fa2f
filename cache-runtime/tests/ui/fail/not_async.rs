use cache_runtime::cached;

#[cached(ttl = 60)]
fn not_async(id: u32) -> u32 {
    id
}

fn main() {}
