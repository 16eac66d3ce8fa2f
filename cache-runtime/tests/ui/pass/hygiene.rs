#![deny(unused_qualifications)]
#![no_implicit_prelude]

extern crate cache_runtime as renamed;
extern crate std;

// Generated code writes absolute paths: local modules named like std's don't interfere.
#[allow(dead_code)]
mod core {}
#[allow(dead_code)]
mod serde {}

#[renamed::cached(crate = "::renamed", prefix = "hygiene")]
async fn renamed_runtime(id: u32) -> std::string::String {
    std::format!("{id}")
}

fn main() {
    let _ = renamed_runtime(1);
    let _ = renamed_runtime_invalidate_all();
}
