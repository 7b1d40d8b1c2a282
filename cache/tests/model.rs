//! Property test: random sequences of put, get, pin, unpin, evict and reopen, checked after
//! every step against a plain model of what the store must hold. The budget is never exceeded
//! (in memory or on disk), pins survive (reopens included), and the eviction order is exactly
//! least-recently-used over unpinned chunks.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use pkgmesh_cache::{CacheError, ChunkStore};
use proptest::prelude::*;

/// One three-chunk blob (two full chunks and a small tail) and five one-chunk blobs.
fn blobs() -> Vec<TestBlob> {
    let mut blobs = vec![TestBlob::new(2 * CHUNK + 1000, 500)];
    for (i, len) in [30_000usize, 60_000, 100_000, 150_000, 200_000]
        .iter()
        .enumerate()
    {
        blobs.push(TestBlob::new(*len, 501 + i as u64));
    }
    blobs
}

const BUDGET: u64 = 700 * 1024;
const REASONS: [&str; 2] = ["installed", "deployment"];

#[derive(Debug, Clone)]
enum Op {
    Put(usize, u32),
    Get(usize, u32),
    Pin(usize, usize),
    Unpin(usize, usize),
    Evict(usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..6usize, 0..3u32).prop_map(|(b, i)| Op::Put(b, i)),
        4 => (0..6usize, 0..3u32).prop_map(|(b, i)| Op::Get(b, i)),
        2 => (0..6usize, 0..2usize).prop_map(|(b, r)| Op::Pin(b, r)),
        2 => (0..6usize, 0..2usize).prop_map(|(b, r)| Op::Unpin(b, r)),
        1 => (0..6usize).prop_map(Op::Evict),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    registered: BTreeSet<usize>,
    held: BTreeSet<(usize, u32)>,
    pins: BTreeMap<usize, BTreeSet<usize>>,
    /// Unpinned held chunks, least recently used first.
    lru: Vec<(usize, u32)>,
}

impl Model {
    fn pinned(&self, blob: usize) -> bool {
        self.pins.get(&blob).is_some_and(|r| !r.is_empty())
    }

    fn used(&self, blobs: &[TestBlob]) -> u64 {
        self.held
            .iter()
            .map(|(b, i)| blobs[*b].chunk(*i).len() as u64)
            .sum()
    }

    fn pinned_bytes(&self, blobs: &[TestBlob]) -> u64 {
        self.held
            .iter()
            .filter(|(b, _)| self.pinned(*b))
            .map(|(b, i)| blobs[*b].chunk(*i).len() as u64)
            .sum()
    }

    fn touch(&mut self, key: (usize, u32)) {
        if let Some(at) = self.lru.iter().position(|k| *k == key) {
            self.lru.remove(at);
            self.lru.push(key);
        }
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let blobs = blobs();
    let dir = fast_tempdir();
    let mut store = Some(open(dir.path(), BUDGET));
    let mut model = Model::default();
    for op in ops {
        let s: &ChunkStore = store.as_ref().unwrap();
        match op.clone() {
            Op::Put(b, i) => {
                let blob = &blobs[b];
                if i >= blob.chunk_count() {
                    continue;
                }
                s.register_blob(&blob.hashes).unwrap();
                model.registered.insert(b);
                let key = (b, i);
                let len = blob.chunk(i).len() as u64;
                let result = s.put_chunk(&blob.id(), i, blob.chunk(i));
                if model.held.contains(&key) {
                    result.unwrap();
                } else if model.pinned_bytes(&blobs) + len > BUDGET {
                    prop_assert!(
                        matches!(result, Err(CacheError::FullOfPinned { .. })),
                        "{:?}",
                        result
                    );
                } else {
                    result.unwrap();
                    while model.used(&blobs) + len > BUDGET {
                        let victim = model.lru.remove(0);
                        model.held.remove(&victim);
                    }
                    model.held.insert(key);
                    if !model.pinned(b) {
                        model.lru.push(key);
                    }
                }
            }
            Op::Get(b, i) => {
                let blob = &blobs[b];
                if i >= blob.chunk_count() {
                    continue;
                }
                let got = s.get_chunk(&blob.id(), i).unwrap();
                if model.held.contains(&(b, i)) {
                    prop_assert_eq!(got.as_deref(), Some(blob.chunk(i)));
                    model.touch((b, i));
                } else {
                    prop_assert!(got.is_none());
                }
            }
            Op::Pin(b, r) => {
                let result = s.pin(&blobs[b].id(), REASONS[r]);
                if model.registered.contains(&b) {
                    result.unwrap();
                    if !model.pinned(b) {
                        model.lru.retain(|k| k.0 != b);
                    }
                    model.pins.entry(b).or_default().insert(r);
                } else {
                    prop_assert!(
                        matches!(result, Err(CacheError::Unregistered { .. })),
                        "{:?}",
                        result
                    );
                }
            }
            Op::Unpin(b, r) => {
                let was = model.pins.get_mut(&b).is_some_and(|p| p.remove(&r));
                prop_assert_eq!(s.unpin(&blobs[b].id(), REASONS[r]).unwrap(), was);
                if was && !model.pinned(b) {
                    let mut mine: Vec<_> =
                        model.held.iter().filter(|k| k.0 == b).copied().collect();
                    mine.sort();
                    model.lru.extend(mine);
                }
            }
            Op::Evict(b) => {
                let result = s.evict_blob(&blobs[b].id());
                if !model.registered.contains(&b) {
                    prop_assert!(
                        matches!(result, Err(CacheError::Unregistered { .. })),
                        "{:?}",
                        result
                    );
                } else if model.pinned(b) {
                    prop_assert!(
                        matches!(result, Err(CacheError::Pinned { .. })),
                        "{:?}",
                        result
                    );
                } else {
                    let freed: u64 = model
                        .held
                        .iter()
                        .filter(|k| k.0 == b)
                        .map(|(_, i)| blobs[b].chunk(*i).len() as u64)
                        .sum();
                    prop_assert_eq!(result.unwrap(), freed);
                    model.held.retain(|k| k.0 != b);
                    model.lru.retain(|k| k.0 != b);
                    model.registered.remove(&b);
                    model.pins.remove(&b);
                }
            }
            Op::Reopen => {
                // Drop the old handle first: it holds the index's lock.
                drop(store.take());
                store = Some(open(dir.path(), BUDGET));
            }
        }
        check(store.as_ref().unwrap(), &model, &blobs, &op)?;
    }
    let on_disk: u64 = chunk_files(dir.path()).iter().map(|f| f.1).sum();
    prop_assert_eq!(on_disk, model.used(&blobs));
    prop_assert!(tmp_files(dir.path()).is_empty());
    Ok(())
}

fn check(
    store: &ChunkStore,
    model: &Model,
    blobs: &[TestBlob],
    op: &Op,
) -> Result<(), TestCaseError> {
    let stats = store.stats();
    prop_assert!(
        stats.used_bytes + stats.reserved_bytes <= BUDGET,
        "over budget after {:?}",
        op
    );
    prop_assert_eq!(stats.used_bytes, model.used(blobs), "used after {:?}", op);
    prop_assert_eq!(
        stats.pinned_bytes,
        model.pinned_bytes(blobs),
        "pinned after {:?}",
        op
    );
    let order: Vec<(usize, u32)> = store
        .eviction_order()
        .into_iter()
        .map(|(id, i)| (blobs.iter().position(|b| b.id() == id).unwrap(), i))
        .collect();
    prop_assert_eq!(&order, &model.lru, "LRU order after {:?}", op);
    for info in store.list() {
        let b = blobs.iter().position(|x| x.id() == info.id).unwrap();
        prop_assert!(model.registered.contains(&b));
        let want: Vec<String> = model
            .pins
            .get(&b)
            .map(|p| {
                let mut names: Vec<String> = p.iter().map(|r| REASONS[*r].to_string()).collect();
                names.sort();
                names
            })
            .unwrap_or_default();
        prop_assert_eq!(&info.pins, &want, "pins of blob {} after {:?}", b, op);
        let held: Vec<u32> = store.bitfield(&info.id).unwrap().iter_ones().collect();
        let want: Vec<u32> = model
            .held
            .iter()
            .filter(|k| k.0 == b)
            .map(|k| k.1)
            .collect();
        prop_assert_eq!(held, want);
    }
    prop_assert_eq!(store.list().len(), model.registered.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn budget_pins_and_lru_order_hold_for_any_sequence(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
