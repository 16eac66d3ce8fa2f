use cache_runtime::cached;

pub struct Db;

#[cached(skip = [db], tags = ["db:{db}"])]
async fn load(db: &Db, id: u32) -> u32 {
    let _ = db;
    id
}

fn main() {}
