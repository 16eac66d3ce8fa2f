#![deny(warnings, missing_docs, unused_qualifications, unreachable_pub)]
//! Expansions add no warnings: unused companions, `mut` arguments, lifetimes.

use cache_runtime::cached;

struct Service;

impl Service {
    #[cached(prefix = "service")]
    async fn explicit_receiver(self: &Self, mut count: u32, name: &str) -> u32 {
        count += 1;
        count + name.len() as u32
    }

    #[cached(skip = [log])]
    async fn with_lifetime<'a>(&'a mut self, id: &'a str, log: &mut Vec<String>) -> String {
        log.push(id.to_owned());
        id.to_owned()
    }
}

#[cached(ttl = 10)]
async fn private_and_used(id: u64) -> Option<u64> {
    Some(id)
}

/// Lint levels written on the function reach its body.
#[expect(unused_variables)]
#[cached]
async fn expected_lint(id: u64) -> u64 {
    let unused = id;
    7
}

#[allow(unused_variables)]
#[cached]
async fn allowed_lint(id: u64) -> u64 {
    let unused = id;
    7
}

fn main() {
    let service = Service;
    let _ = service.explicit_receiver(1, "x");
    let mut service = Service;
    let mut log = Vec::new();
    let _ = async move { service.with_lifetime("a", &mut log).await };
    let _ = private_and_used(1);
    let _ = (expected_lint(1), allowed_lint(1));
}
