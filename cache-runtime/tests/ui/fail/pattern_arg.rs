use cache_runtime::cached;

#[cached]
async fn pair((a, b): (u32, u32)) -> u32 {
    a + b
}

fn main() {}
