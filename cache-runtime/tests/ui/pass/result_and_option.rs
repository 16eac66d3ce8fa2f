use cache_runtime::cached;

#[derive(Debug)]
pub struct DbError;

#[cached(key_prefix = "agents")]
async fn get_agent(agent_id: u64) -> Result<String, DbError> {
    Ok(format!("agent {agent_id}"))
}

#[cached(prefix = "lookup")]
async fn find(name: &str) -> Option<String> {
    Some(name.to_owned())
}

#[cached(prefix = "lookup_none", cache_none = true)]
async fn find_caching_none(name: &'static str) -> Option<String> {
    None.filter(|_: &String| !name.is_empty())
}

fn main() {
    let _ = get_agent(1);
    let _ = find("x");
    let _ = find_caching_none("y");
}
