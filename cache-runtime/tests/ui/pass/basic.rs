use cache_runtime::cached;

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Mission {
    id: String,
}

/// Docs and visibility are kept.
#[cached(ttl = 300, prefix = "missions", tags = ["missions", "queue"])]
pub async fn get_mission(mission_id: String) -> Mission {
    Mission { id: mission_id }
}

#[cached]
async fn no_options() -> u32 {
    7
}

fn main() {
    let _ = get_mission("m1".into());
    let _ = get_mission_invalidate("m1".into());
    let _ = get_mission_invalidate_all();
    let _: String = get_mission_key("m1".into());
    let _ = get_mission_refresh("m1".into());
    let _ = no_options();
}

mod inner {
    use cache_runtime::cached;

    /// Visibility is kept: this is callable from the parent module.
    #[cached(prefix = "inner")]
    pub async fn visible(id: u32) -> u32 {
        id
    }
}

#[allow(dead_code)]
fn uses_inner() {
    let _ = inner::visible(1);
    let _ = inner::visible_invalidate(1);
}
