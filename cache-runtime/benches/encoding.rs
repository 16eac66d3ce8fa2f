//! Key building and encode/decode in each format, for a small and a 10 KiB value.

use std::hint::black_box;

use cache_runtime::__private::{KeyBuilder, Spec};
use cache_runtime::codec::{decode, encode};
use cache_runtime::{Cache, CacheConfig, Serialization};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
struct Mission {
    id: String,
    name: String,
    status: String,
    priority: u8,
    crew: Vec<String>,
    progress: f64,
    tags: Vec<String>,
}

fn small() -> Mission {
    Mission {
        id: "mission_123".into(),
        name: "Survey of the outer belt".into(),
        status: "active".into(),
        priority: 3,
        crew: vec!["ada".into(), "grace".into(), "linus".into()],
        progress: 0.42,
        tags: vec!["missions".into(), "queue".into(), "high".into()],
    }
}

fn large() -> Mission {
    let mut m = small();
    m.crew = (0..400).map(|i| format!("crew-member-{i:05}")).collect();
    m
}

#[derive(Serialize)]
struct Filter<'a> {
    region: &'a str,
    limit: u32,
    statuses: &'a [&'a str],
}

const SPEC: Spec = Spec::named("get_mission").with_prefix("missions");

fn keys(c: &mut Criterion) {
    let cache = Cache::local(CacheConfig::default());
    let mut g = c.benchmark_group("key");
    g.bench_function("scalar_args", |b| {
        b.iter(|| {
            let mut k = KeyBuilder::new(&cache, &SPEC);
            k.arg(black_box("mission_123"));
            k.arg(black_box(&42u64));
            k.finish()
        })
    });
    g.bench_function("composite_arg", |b| {
        let filter = Filter { region: "eu-west", limit: 50, statuses: &["active", "queued"] };
        b.iter(|| {
            let mut k = KeyBuilder::new(&cache, &SPEC);
            k.arg(black_box(&filter));
            k.finish()
        })
    });
    g.finish();
}

fn codecs(c: &mut Criterion) {
    for (size, value) in [("small", small()), ("10KiB", large())] {
        let mut g = c.benchmark_group(format!("codec_{size}"));
        for format in [Serialization::Json, Serialization::MsgPack, Serialization::Binary] {
            let bytes = encode(format, &value).unwrap();
            g.throughput(Throughput::Bytes(bytes.len() as u64));
            g.bench_with_input(BenchmarkId::new("encode", format), &value, |b, v| {
                b.iter(|| encode(format, black_box(v)).unwrap())
            });
            g.bench_with_input(BenchmarkId::new("decode", format), &bytes, |b, bytes| {
                b.iter(|| decode::<Mission>(black_box(bytes)).unwrap())
            });
        }
        g.finish();
    }
}

criterion_group!(benches, keys, codecs);
criterion_main!(benches);
