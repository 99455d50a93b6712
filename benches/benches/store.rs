//! Chunk store ingest: chunking + hashing + compression + commit, through the
//! real scanner into a real redb file, for source-like text and for
//! incompressible binaries.

use std::sync::atomic::AtomicBool;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use mariesync::scan::{ScanProgress, Scanner, Scope};
use mariesync::store::{Store, WorkspaceRecord, WorkspaceState};
use mariesync_benches::workspace_gen::{self as workspace_gen, Spec};
use mariesync_protocol::{DeviceKey, WorkspaceId};

struct Fresh {
    _dir: tempfile::TempDir,
    store: Store,
    workspace: u32,
}

fn fresh_store() -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("bench.redb")).unwrap();
    let workspace = store
        .add_workspace(&WorkspaceRecord {
            id: WorkspaceId([1; 16]),
            name: "bench".into(),
            path: "/".into(),
            state: WorkspaceState::Active,
            next_sequence: 1,
            created_ms: 0,
        })
        .unwrap();
    Fresh {
        _dir: dir,
        store,
        workspace,
    }
}

fn ingest(c: &mut Criterion) {
    let text_dir = tempfile::tempdir().unwrap();
    let text_bytes = workspace_gen::generate(
        text_dir.path(),
        &Spec {
            files: 4000,
            text_bytes: 64 << 20,
            binaries: 0,
            binary_bytes: 0,
            seed: 1,
        },
        2,
    )
    .unwrap();
    let binary_dir = tempfile::tempdir().unwrap();
    let binary_bytes = workspace_gen::generate(
        binary_dir.path(),
        &Spec {
            files: 0,
            text_bytes: 0,
            binaries: 4,
            binary_bytes: 32 << 20,
            seed: 2,
        },
        2,
    )
    .unwrap();

    let mut group = c.benchmark_group("ingest");
    group.sample_size(10);
    for (name, dir, bytes) in [
        ("source_text", text_dir.path(), text_bytes),
        ("incompressible", binary_dir.path(), binary_bytes),
    ] {
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(name, |b| {
            b.iter_batched(
                fresh_store,
                |fresh| {
                    let progress = ScanProgress::default();
                    let cancel = AtomicBool::new(false);
                    let scanner = Scanner {
                        store: &fresh.store,
                        workspace: fresh.workspace,
                        root: dir,
                        device: DeviceKey(1),
                        device_id: "12D3KooWbench",
                        progress: &progress,
                        cancel: &cancel,
                        allow_empty: false,
                        clean_temp_files: false,
                        on_durable: &|| {},
                    };
                    let report = scanner.run(&Scope::Full).unwrap();
                    assert!(report.hashed_bytes >= bytes);
                    fresh
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// Storing fetched chunks: 64 MiB of incompressible chunks of 160 KiB,
/// committed durably as answers of 2 MiB arrive, one commit each or in
/// groups (what a receiver does with a peer's answers).
fn commit_fetched(c: &mut Criterion) {
    use mariesync::store::{EncodedChunk, encode_chunk_with};
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let chunks: Vec<EncodedChunk> = (0..400)
        .map(|_| {
            let raw: Vec<u8> = (0..160 * 1024)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            encode_chunk_with(blake3::hash(&raw).into(), &raw, false)
        })
        .collect();
    let bytes: u64 = chunks.iter().map(|c| c.stored.len() as u64).sum();
    let mut group = c.benchmark_group("commit_fetched");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes));
    for per_commit in [13usize, 52] {
        group.bench_function(format!("{}_chunks_per_commit", per_commit), |b| {
            b.iter_batched(
                fresh_store,
                |fresh| {
                    for group in chunks.chunks(per_commit) {
                        let group: Vec<EncodedChunk> = group
                            .iter()
                            .map(|c| EncodedChunk {
                                hash: c.hash,
                                raw_len: c.raw_len,
                                stored: c.stored.clone(),
                            })
                            .collect();
                        fresh.store.commit_fetched_chunks(&group).unwrap();
                    }
                    fresh
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, ingest, commit_fetched);
criterion_main!(benches);
