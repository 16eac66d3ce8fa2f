use cache_runtime::cached;

pub struct Handle;

#[cached]
async fn open(id: u32) -> Handle {
    let _ = id;
    Handle
}

fn main() {}
