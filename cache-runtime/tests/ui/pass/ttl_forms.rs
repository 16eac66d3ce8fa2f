use std::time::Duration;

use cache_runtime::cached;

const FIVE_MINUTES: u64 = 5 * 60;

#[cached(ttl = FIVE_MINUTES)]
async fn by_const(id: u32) -> u32 {
    id
}

#[cached(ttl = Duration::from_millis(1500))]
async fn by_duration(id: u32) -> u32 {
    id
}

#[cached(ttl = "quantum_state")]
async fn by_name(id: u32) -> u32 {
    id
}

fn main() {
    let _ = (by_const(1), by_duration(1), by_name(1));
}
