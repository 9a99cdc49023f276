//! Maglev table build time (M = 65537), so a regression shows in `cargo bench -p lb-user`.
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lb::dataplane::maglev::{build, Member};
use lb_common::MAGLEV_SIZE;

fn pool(n: u32) -> Vec<Member> {
    (0..n)
        .map(|i| Member {
            id: i,
            identity: (u64::from(0x0a02_0000 + i) << 16) | 4443,
            weight: 1 + i % 2,
        })
        .collect()
}

fn maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    for n in [10, 100, 1000] {
        let members = pool(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &members, |b, members| {
            b.iter(|| build(black_box(members), MAGLEV_SIZE, 0))
        });
    }
    group.finish();
}

criterion_group!(benches, maglev_build);
criterion_main!(benches);
