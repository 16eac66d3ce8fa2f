use cache_runtime::cached;

fn is_valid(s: &str) -> bool {
    !s.is_empty()
}

#[cached(condition = is_valid)]
async fn count(id: u32) -> u32 {
    id
}

fn main() {}
