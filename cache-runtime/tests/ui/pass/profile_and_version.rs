use cache_runtime::cached;

#[cached(profile = "api_response", version = 2)]
async fn api_response(path: String) -> String {
    path
}

fn main() {
    let _ = api_response("/missions".into());
}
