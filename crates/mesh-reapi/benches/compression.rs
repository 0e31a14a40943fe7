//! zstd on the wire ([`mesh_reapi::compression`]): what compressing a blob for a
//! `compressed-blobs/zstd/…` read and inflating an upload cost, beside the SHA-256 every blob
//! gets anyway, on 50 MiB of build-output-like text (object names, symbols, addresses). The
//! compressed size is printed first: the bytes that cross the wire instead of 50 MiB.
//!
//! ```text
//! cargo bench -p tonic-mesh-reapi --bench compression
//! ```

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mesh_reapi::{
    Digest,
    compression::{Deflater, Inflater},
};

/// The same generator as the compression tests use.
fn build_like(len: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while data.len() < len {
        data.extend_from_slice(
            format!(
                "obj/{:x}.o: symbol_{} at 0x{:08x}\n",
                i % 977,
                i,
                i * 2654435761 % (1 << 32)
            )
            .as_bytes(),
        );
        i += 1;
    }
    data.truncate(len);
    data
}

/// Compresses in 1 MiB pieces, as a ByteStream read does.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut deflater = Deflater::new().unwrap();
    let mut wire = Vec::new();
    for chunk in data.chunks(1 << 20) {
        wire.extend(deflater.compress(chunk).unwrap());
    }
    wire.extend(deflater.finish().unwrap());
    wire
}

/// Inflates in 1 MiB messages, as a ByteStream write does; returns the bytes produced.
fn inflate(wire: &[u8], size: u64) -> u64 {
    let mut inflater = Inflater::new(size).unwrap();
    let mut produced = 0u64;
    for message in wire.chunks(1 << 20) {
        let mut input = message;
        while let Some(piece) = inflater.step(&mut input).unwrap() {
            produced += piece.len() as u64;
        }
    }
    inflater.finish().unwrap();
    produced
}

fn bench(c: &mut Criterion) {
    let data = build_like(50 << 20);
    let wire = deflate(&data);
    println!(
        "50 MiB of build-like text: {} bytes compressed at level {} ({:.1}% of the blob)",
        wire.len(),
        mesh_reapi::compression::LEVEL,
        100.0 * wire.len() as f64 / data.len() as f64
    );
    let mut group = c.benchmark_group("50 MiB blob");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("sha-256 (every blob, the limit)", |b| {
        b.iter(|| Digest::of(&data))
    });
    group.bench_function("zstd compress (compressed read)", |b| {
        b.iter(|| deflate(&data))
    });
    group.bench_function("zstd inflate (compressed write)", |b| {
        b.iter(|| inflate(&wire, data.len() as u64))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
