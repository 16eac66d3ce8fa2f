use cache_runtime::cached;

#[cached]
async fn describe(value: impl std::fmt::Display) -> String {
    value.to_string()
}

fn main() {}
