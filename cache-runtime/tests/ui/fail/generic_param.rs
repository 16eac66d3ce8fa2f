use cache_runtime::cached;

#[cached]
async fn generic<T: serde::Serialize>(value: T) -> u32 {
    let _ = value;
    1
}

fn main() {}
