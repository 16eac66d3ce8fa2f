use cache_runtime::cached;

pub struct Service;

impl Service {
    #[cached]
    async fn consume(self, id: u32) -> u32 {
        id
    }
}

fn main() {}
