use cache_runtime::cached;

#[cached(tags = ["mission:{mision_id}"])]
async fn get_mission(mission_id: u32) -> u32 {
    mission_id
}

fn main() {}
