use cache_runtime::cached;

fn worth_keeping(v: &Vec<u32>) -> bool {
    !v.is_empty()
}

#[cached(condition = worth_keeping)]
async fn by_path(n: u32) -> Vec<u32> {
    (0..n).collect()
}

#[cached(condition = |v: &u64| *v > 10)]
async fn by_closure(n: u64) -> u64 {
    n
}

#[cached(condition = |s: &String| !s.is_empty())]
async fn on_ok_values(n: u64) -> Result<String, std::io::Error> {
    Ok(n.to_string())
}

fn main() {
    let _ = by_path(3);
    let _ = by_closure(3);
    let _ = on_ok_values(3);
}
