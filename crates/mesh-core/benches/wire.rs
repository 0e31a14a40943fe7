//! The per-datagram costs on the membership task's hot path: sealing and opening the
//! envelope (plain and encrypted), and encoding/decoding a node state.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mesh_core::{
    Keyring, NodeId, NodeState, SecretKey,
    wire::{Envelope, Kind, MAX_DATAGRAM},
};

fn envelope(c: &mut Criterion) {
    let body = vec![0x5a; MAX_DATAGRAM - 44];
    let plain = Envelope::plain();
    let mut rotated = Keyring::new(SecretKey::from_bytes([1; 32]));
    rotated.install(SecretKey::from_bytes([2; 32]));
    let encrypted = Envelope::with_keyring(Keyring::new(SecretKey::from_bytes([1; 32])), "prod")
        .expect("short label");
    // During a rotation the receiver may try an old key first.
    let mut receiver_ring = Keyring::new(SecretKey::from_bytes([3; 32]));
    receiver_ring.install(SecretKey::from_bytes([1; 32]));
    let receiver = Envelope::with_keyring(receiver_ring, "prod").expect("short label");

    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Bytes(body.len() as u64));
    for (name, envelope) in [("plain", &plain), ("encrypted", &encrypted)] {
        let mut out = Vec::with_capacity(MAX_DATAGRAM);
        group.bench_function(format!("seal/{name}"), |b| {
            b.iter(|| {
                envelope
                    .seal(Kind::Foca, black_box(&body), &mut out)
                    .unwrap()
            });
        });
        envelope.seal(Kind::Foca, &body, &mut out).unwrap();
        let mut scratch = [0; MAX_DATAGRAM];
        group.bench_function(format!("open/{name}"), |b| {
            b.iter(|| {
                envelope.open(black_box(&out), &mut scratch).unwrap();
            });
        });
    }
    let mut out = Vec::new();
    encrypted.seal(Kind::Foca, &body, &mut out).unwrap();
    let mut scratch = [0; MAX_DATAGRAM];
    group.bench_function("open/encrypted-second-key", |b| {
        b.iter(|| {
            receiver.open(black_box(&out), &mut scratch).unwrap();
        });
    });
    group.bench_function("open/forged", |b| {
        let mut forged = out.clone();
        forged[40] ^= 1;
        b.iter(|| {
            encrypted
                .open(black_box(&forged), &mut scratch)
                .unwrap_err()
        });
    });
    group.finish();
}

fn node_state(c: &mut Criterion) {
    let mut state = NodeState::new(
        NodeId::new("build-worker-17").unwrap(),
        1_763_800_000_000_000_000,
        4_242,
    );
    state.grpc_endpoint = Some("http://10.42.17.3:50051".into());
    state.pending = 37;
    state.max_concurrency = 64;
    for (k, v) in [
        ("OSFamily", "linux"),
        ("ISA", "x86-64"),
        ("pool", "default"),
        (
            "container-image",
            "docker://gcr.io/build/rbe-ubuntu22-04@sha256:0123456789abcdef",
        ),
    ] {
        state.tags.insert(k.into(), v.into());
    }
    let bytes = state.encode().unwrap();
    let mut group = c.benchmark_group("node_state");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("encode", |b| b.iter(|| black_box(&state).encode().unwrap()));
    group.bench_function("decode", |b| {
        b.iter(|| NodeState::decode(black_box(&bytes)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, envelope, node_state);
criterion_main!(benches);
