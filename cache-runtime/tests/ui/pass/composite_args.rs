use std::collections::BTreeMap;

use cache_runtime::cached;

#[derive(serde::Serialize)]
pub struct Filter {
    region: String,
    limit: u32,
}

#[cached(prefix = "policies", tags = ["policies"])]
async fn evaluate(agent_id: u32, action: &str, context: BTreeMap<String, u32>, filter: Filter) -> bool {
    agent_id > 0 && !action.is_empty() && context.len() < filter.limit as usize && !filter.region.is_empty()
}

fn main() {
    let _ = evaluate(1, "launch", BTreeMap::new(), Filter { region: "eu".into(), limit: 1 });
}
