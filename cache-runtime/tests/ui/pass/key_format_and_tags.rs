use cache_runtime::cached;

#[cached(prefix = "queue", key = "{priority}:{mission_id}", tags = ["queue:{priority}", "mission:{mission_id}", "{{literal}}"])]
async fn queued(priority: String, mission_id: u64, note: String) -> String {
    format!("{priority}{mission_id}{note}")
}

fn main() {
    // Only the arguments named in `key` are arguments of the companions.
    let _: String = queued_key("high".into(), 7);
    let _ = queued_invalidate("high".into(), 7);
    let _ = queued("high".into(), 7, "n".into());
}
