//! The short fuzz run CI can afford: every committed corpus file of every fuzz target, plus a few
//! thousand deterministic mutations of them (bit flips, truncations, splices, boundary
//! integers), through the same bodies cargo-fuzz runs (`fuzz/bodies`), on stable and in a debug
//! build. A product panic, a hang, or garbage that a decoder accepts fails the test with the
//! target and the input that did it.
//!
//! The long runs are cargo-fuzz's (nightly, sanitizers): see /tmp/h/fuzz-report.md or
//! SECURITY.md for the commands. Files cargo-fuzz adds to the corpus are named by their SHA-1
//! and ignored by git; this test skips them too, so it replays what is committed.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pkgmesh_fuzz_bodies::{seeds, FuzzTarget, Verdict, TARGETS};
use pkgmesh_tests::workspace_root;

/// Mutations per target for decoders that work in memory, and for the ZIP target, which writes
/// and extracts a file per input.
const MUTATIONS: usize = 4000;
const DISK_MUTATIONS: usize = 800;

/// Far more than a run needs (a few seconds); only a hang gets near it.
const TARGET_DEADLINE: Duration = Duration::from_secs(180);

fn corpus_dir(target: &str) -> PathBuf {
    workspace_root().join("fuzz/corpus").join(target)
}

/// libFuzzer names what it finds by the SHA-1 of the input: 40 hex digits.
fn is_libfuzzer_name(name: &str) -> bool {
    name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The committed corpus of one target, sorted by name so mutations are reproducible.
fn committed_corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} unreadable: {e}", dir.display()));
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|entry| entry.expect("a corpus directory entry"))
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| !is_libfuzzer_name(name))
        .map(|name| {
            let bytes = std::fs::read(dir.join(&name)).expect("a corpus file is readable");
            (name, bytes)
        })
        .collect();
    files.sort();
    files
}

/// SplitMix64: a fixed, dependency-free stream, so every run mutates the same way.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Values that sit on the edges decoders get wrong: zero, all ones, sign bits, the frame limit.
const BOUNDARY_U32: [u32; 8] = [0, 1, 0x7f, 0x80, 0xffff, 0x0010_0000, 0x0010_0001, u32::MAX];

/// One mutation of `input`; `other` is another corpus file of the same target, for splices.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> (&'static str, Vec<u8>) {
    let mut out = input.to_vec();
    match rng.below(7) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                if !out.is_empty() {
                    let at = rng.below(out.len());
                    out[at] ^= 1 << rng.below(8);
                }
            }
            ("bit flips", out)
        }
        1 => {
            out.truncate(rng.below(out.len() + 1));
            ("truncation", out)
        }
        2 => {
            let cut = rng.below(out.len() + 1);
            let from = rng.below(other.len() + 1);
            out.truncate(cut);
            out.extend_from_slice(&other[from..]);
            ("splice", out)
        }
        3 => {
            if !out.is_empty() {
                let at = rng.below(out.len());
                out[at] = [0x00, 0xff, 0x7f, 0x80, b'"', b'\\', b'/', b'.'][rng.below(8)];
            }
            ("boundary byte", out)
        }
        4 => {
            let value = BOUNDARY_U32[rng.below(BOUNDARY_U32.len())];
            let bytes = if rng.below(2) == 0 {
                value.to_be_bytes()
            } else {
                value.to_le_bytes()
            };
            let at = rng.below(out.len().saturating_sub(3) + 1);
            for (i, b) in bytes.iter().enumerate() {
                if let Some(slot) = out.get_mut(at + i) {
                    *slot = *b;
                }
            }
            ("boundary integer", out)
        }
        5 => {
            // A duplicated range: repeated keys, entries, frames.
            if !out.is_empty() {
                let start = rng.below(out.len());
                let end = (start + 1 + rng.below(64)).min(out.len());
                let copy = out[start..end].to_vec();
                let at = rng.below(out.len() + 1);
                out.splice(at..at, copy);
            }
            ("duplicated range", out)
        }
        _ => {
            if !out.is_empty() {
                let start = rng.below(out.len());
                let end = (start + 1 + rng.below(64)).min(out.len());
                out.drain(start..end);
            }
            ("deleted range", out)
        }
    }
}

/// Inputs that are no valid anything: every decoder must refuse each with a message.
fn garbage() -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = Rng(0x5eed);
    let noise: Vec<u8> = (0..512).map(|_| rng.next() as u8).collect();
    vec![
        ("empty", Vec::new()),
        ("three NULs", vec![0; 3]),
        ("64 x 0xff", vec![0xff; 64]),
        ("512 random bytes", noise),
        ("unbalanced brackets", b"{{{{[[[[\"\"\"".to_vec()),
    ]
}

#[derive(Default, Debug)]
struct Tally {
    corpus: usize,
    corpus_accepted: usize,
    mutations: usize,
    mutations_refused: usize,
    foreign: usize,
}

/// Runs one target over its corpus, its mutations, the other targets' corpora and the garbage.
/// `current` always names the input being run, so a panic or hang can be reported with it.
fn replay(
    target: &FuzzTarget,
    own: &[(String, Vec<u8>)],
    foreign: &[(String, Vec<u8>)],
    current: &Mutex<String>,
) -> Tally {
    let mut tally = Tally::default();
    let run = |label: String, input: &[u8]| {
        *current.lock().expect("the progress note") = label;
        (target.run)(input)
    };
    for (name, bytes) in own {
        tally.corpus += 1;
        if run(format!("corpus file {name}"), bytes) == Verdict::Accepted {
            tally.corpus_accepted += 1;
        }
    }
    let budget = if target.touches_disk {
        DISK_MUTATIONS
    } else {
        MUTATIONS
    };
    let mut rng = Rng(0x9e37_79b9 ^ target.name.len() as u64);
    for i in 0..budget {
        let (name, base) = &own[i % own.len()];
        let other = &own[rng.below(own.len())].1;
        let (how, input) = mutate(&mut rng, base, other);
        tally.mutations += 1;
        if let Verdict::Refused(_) = run(format!("mutation #{i} ({how}) of {name}"), &input) {
            tally.mutations_refused += 1;
        }
    }
    for (name, bytes) in foreign {
        tally.foreign += 1;
        run(format!("foreign corpus file {name}"), bytes);
    }
    for (name, bytes) in garbage() {
        let verdict = run(format!("garbage: {name}"), &bytes);
        if target.name == "config_parser" && bytes.is_empty() {
            // An empty config file is a valid one: every setting takes its default.
            continue;
        }
        assert!(
            matches!(verdict, Verdict::Refused(ref message) if !message.trim().is_empty()),
            "{} accepted garbage ({name}): {verdict:?}",
            target.name
        );
    }
    tally
}

/// Named inputs: (file name, bytes).
type Corpus = Vec<(String, Vec<u8>)>;

#[test]
fn corpus_and_mutations_replay_through_every_fuzz_target() {
    let corpora: Vec<(&FuzzTarget, Corpus)> = TARGETS
        .iter()
        .map(|target| (target, committed_corpus(target.name)))
        .collect();
    for (target, files) in &corpora {
        assert!(
            !files.is_empty(),
            "{} has no committed corpus in {}",
            target.name,
            corpus_dir(target.name).display()
        );
    }

    let (done_tx, done_rx) = mpsc::channel();
    let mut running = Vec::new();
    for (target, own) in &corpora {
        // The ZIP target gets only ZIP-shaped strangers: the others are tiny and prove nothing.
        let foreign: Vec<(String, Vec<u8>)> = corpora
            .iter()
            .filter(|(other, _)| other.name != target.name && !target.touches_disk)
            .flat_map(|(other, files)| {
                files
                    .iter()
                    .map(move |(name, bytes)| (format!("{}/{name}", other.name), bytes.clone()))
            })
            .collect();
        let current = Arc::new(Mutex::new(String::from("not started")));
        let target: &'static FuzzTarget = target;
        let own = own.clone();
        let note = Arc::clone(&current);
        let done = done_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("replay-{}", target.name))
            .spawn(move || {
                let tally = replay(target, &own, &foreign, &note);
                let _ = done.send(target.name);
                tally
            })
            .expect("a replay thread starts");
        running.push((target, current, handle));
    }
    drop(done_tx);

    // Threads either finish or panic (the sender is dropped either way); a hang is what never
    // answers before the deadline.
    for _ in 0..running.len() {
        if let Err(e) = done_rx.recv_timeout(TARGET_DEADLINE) {
            let stuck: Vec<String> = running
                .iter()
                .filter(|(_, _, handle)| !handle.is_finished())
                .map(|(target, current, _)| {
                    format!(
                        "{} on {}",
                        target.name,
                        current.lock().map(|c| c.clone()).unwrap_or_default()
                    )
                })
                .collect();
            if stuck.is_empty() {
                break;
            }
            panic!("no fuzz target finished within {TARGET_DEADLINE:?} ({e}); still running: {stuck:?}");
        }
    }

    let mut failures = Vec::new();
    for (target, current, handle) in running {
        match handle.join() {
            Ok(tally) => {
                println!("{:<17} {tally:?}", target.name);
                if tally.corpus_accepted == 0 {
                    failures.push(format!(
                        "{}: no corpus file was accepted, so the fuzzer never reaches past the \
                         first refusal",
                        target.name
                    ));
                }
                if tally.mutations_refused == 0 {
                    failures.push(format!("{}: no mutation was refused", target.name));
                }
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!(
                    "{} panicked on {}: {message}",
                    target.name,
                    current.lock().map(|c| c.clone()).unwrap_or_default()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "fuzz replay failures:\n{}",
        failures.join("\n")
    );
}

/// Regenerates the committed seed corpus from real inputs: encoded messages, the example
/// manifest and configs, ZIPs made by the `zip` command. Run by hand after a wire change:
/// `cargo test -p pkgmesh-tests --test fuzz_corpus -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand when the seeds should change"]
fn write_seed_corpus() {
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let root = workspace_root();
    let mut written = 0;
    for seed in seeds::all(&root, scratch.path()) {
        let dir = corpus_dir(seed.target);
        std::fs::create_dir_all(&dir).expect("the corpus directory");
        let path: PathBuf = dir.join(format!("seed-{}", seed.name));
        std::fs::write(&path, &seed.bytes).expect("a seed file is written");
        written += 1;
    }
    assert!(written > 0);
    assert!(Path::new(&corpus_dir("zip_checker")).is_dir());
}
