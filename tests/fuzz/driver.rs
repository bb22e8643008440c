//! The time-bounded fuzz driver of `tests/fuzz.rs`, on proptest's runner.
//!
//! Every target is a function of bytes (`check`) that must not panic, and a corpus of seed
//! inputs in `tests/fuzz/corpus/<target>/`. [`run`] first replays the corpus, then feeds
//! `check` with inputs drawn from four proptest strategies until the time budget is spent:
//! corpus seeds changed by a few edits (bytes set, bits flipped, interesting integers written,
//! dictionary tokens inserted, ranges deleted or duplicated, truncation), two seeds spliced,
//! the target's own structure-aware generator, and plain random bytes. A panic is shrunk by
//! proptest, printed (hex and escaped) and saved under `target/fuzz-failures/<target>/`, from
//! where it can be copied into the corpus; then the test fails.
//!
//! `TWINSAN_FUZZ_SECS` (default 10) is each target's budget, `TWINSAN_FUZZ_SEED` (a u64)
//! replays a run; both are printed.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};

/// Default time budget of one target, in seconds.
const DEFAULT_SECS: f64 = 10.0;
/// Cases per proptest run; the deadline is checked between runs.
const BATCH: u32 = 256;

/// Integers that tend to sit on boundaries: lengths, counts, tags, sizes.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    16,
    47,
    48,
    63,
    64,
    127,
    128,
    255,
    256,
    511,
    512,
    1023,
    1024,
    4095,
    4096,
    8191,
    8192,
    8193,
    65535,
    65536,
    0x00ff_ffff,
    0x0100_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    0x0000_0001_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// One change to a seed.
#[derive(Debug, Clone)]
pub enum Edit {
    Set(Index, u8),
    Flip(Index, u8),
    /// Write `INTERESTING[n]` big-endian in 1, 2, 3, 4 or 8 bytes (truncated to fit).
    Int(Index, Index, Index),
    Insert(Index, Vec<u8>),
    /// Insert a dictionary token.
    Token(Index, Index),
    Delete(Index, u16),
    /// Copy a range of the input to another place (repeats a record or a field).
    Duplicate(Index, u16, Index),
    Truncate(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        2 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
        3 => (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(i, w, n)| Edit::Int(i, w, n)),
        1 => (any::<Index>(), vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Edit::Insert(i, b)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Edit::Token(i, t)),
        1 => (any::<Index>(), 1u16..64).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => (any::<Index>(), 1u16..256, any::<Index>())
            .prop_map(|(i, n, to)| Edit::Duplicate(i, n, to)),
        1 => any::<Index>().prop_map(Edit::Truncate),
    ]
}

/// A position in `0..=len`.
fn pos(i: &Index, len: usize) -> usize {
    i.index(len + 1)
}

/// Applies `edits` to `seed` (positions wrap to the current length).
pub fn apply(seed: &[u8], edits: &[Edit], dict: &[&[u8]]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        match e {
            Edit::Set(i, v) if !b.is_empty() => {
                let p = i.index(b.len());
                b[p] = *v;
            }
            Edit::Flip(i, bit) if !b.is_empty() => {
                let p = i.index(b.len());
                b[p] ^= 1 << bit;
            }
            Edit::Int(i, w, n) if !b.is_empty() => {
                let width = [1usize, 2, 3, 4, 8][w.index(5)];
                let v = INTERESTING[n.index(INTERESTING.len())].to_be_bytes();
                let p = i.index(b.len());
                let end = (p + width).min(b.len());
                b[p..end].copy_from_slice(&v[8 - width..8 - width + (end - p)]);
            }
            Edit::Insert(i, bytes) => {
                let p = pos(i, b.len());
                b.splice(p..p, bytes.iter().copied());
            }
            Edit::Token(i, t) if !dict.is_empty() => {
                let p = pos(i, b.len());
                let tok = dict[t.index(dict.len())];
                b.splice(p..p, tok.iter().copied());
            }
            Edit::Delete(i, n) if !b.is_empty() => {
                let p = i.index(b.len());
                let end = (p + *n as usize).min(b.len());
                b.drain(p..end);
            }
            Edit::Duplicate(i, n, to) if !b.is_empty() => {
                let p = i.index(b.len());
                let end = (p + *n as usize).min(b.len());
                let chunk = b[p..end].to_vec();
                let q = pos(to, b.len());
                b.splice(q..q, chunk);
            }
            Edit::Truncate(i) => {
                let p = pos(i, b.len());
                b.truncate(p);
            }
            _ => {}
        }
    }
    b
}

/// What a target is made of.
pub struct Target {
    /// Directory name under `tests/fuzz/corpus/` and in the report.
    pub name: &'static str,
    /// Tokens for `Edit::Token` (keys, separators, values).
    pub dict: &'static [&'static [u8]],
    /// The target's own generator of (mostly) valid inputs.
    pub structured: BoxedStrategy<Vec<u8>>,
    /// Longest plain random input.
    pub max_random: usize,
}

pub fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(name)
}

/// The seed files of a target, sorted by name.
pub fn load_corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, b)
        })
        .collect()
}

fn budget() -> Duration {
    let secs = match std::env::var("TWINSAN_FUZZ_SECS") {
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("TWINSAN_FUZZ_SECS={v:?} is not a number of seconds")),
        Err(_) => DEFAULT_SECS,
    };
    Duration::from_secs_f64(secs.max(0.0))
}

fn seed() -> u64 {
    match std::env::var("TWINSAN_FUZZ_SEED") {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("TWINSAN_FUZZ_SEED={v:?} is not a u64"))
        }
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        }
    }
}

thread_local! {
    /// Set while a target runs: panics are expected (proptest catches them) and recorded here
    /// instead of printed, so that shrinking does not print hundreds of backtraces.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "<non-string panic payload>".into());
                let at = info
                    .location()
                    .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_default();
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{msg}{at}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// Writes to the process's stderr directly: libtest captures `eprintln!` of passing tests,
/// and the execution counts should show in every run (nextest shows them through the
/// `success-output` override in .ci/nextest.toml).
fn report(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{line}");
}

fn hexdump(b: &[u8]) -> String {
    let mut s = String::new();
    for (n, chunk) in b.chunks(16).enumerate().take(256) {
        s.push_str(&format!("{:06x} ", n * 16));
        for x in chunk {
            s.push_str(&format!(" {x:02x}"));
        }
        s.push('\n');
    }
    if b.len() > 4096 {
        s.push_str(&format!("... ({} bytes in all)\n", b.len()));
    }
    s
}

/// Saves a failing input; returns where.
fn save_failure(name: &str, input: &[u8]) -> PathBuf {
    let dir = std::env::var_os("TWINSAN_FUZZ_FAILURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures"))
        .join(name);
    let _ = std::fs::create_dir_all(&dir);
    // FNV-1a: a stable name, so the same input is saved once.
    let h = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let path = dir.join(format!("crash-{h:016x}"));
    if let Err(e) = std::fs::write(&path, input) {
        report(&format!(
            "fuzz {name}: could not save {}: {e}",
            path.display()
        ));
    }
    path
}

fn fail(name: &str, what: &str, input: &[u8], panic: Option<String>) -> ! {
    let path = save_failure(name, input);
    let text: String = input
        .iter()
        .take(4096)
        .flat_map(|b| b.escape_ascii())
        .map(char::from)
        .collect();
    panic!(
        "fuzz target {name}: {what}\npanic: {}\ninput ({} bytes), saved as {}:\n{}escaped: \"{}\"\n\
         Add it to tests/fuzz/corpus/{name}/ once fixed.",
        panic.unwrap_or_else(|| "<none recorded>".into()),
        input.len(),
        path.display(),
        hexdump(input),
        text,
    );
}

/// Runs one target for the time budget; panics (failing the test) on the first input that
/// makes `check` panic.
pub fn run(target: Target, check: fn(&[u8])) {
    install_quiet_hook();
    let name = target.name;
    let corpus = load_corpus(name);
    assert!(!corpus.is_empty(), "fuzz target {name}: empty corpus");
    let budget = budget();
    let seed = seed();
    let started = Instant::now();

    // 1. Every seed as it is.
    QUIET.with(|q| q.set(true));
    for (path, input) in &corpus {
        LAST_PANIC.with(|p| p.borrow_mut().take());
        if std::panic::catch_unwind(|| check(input)).is_err() {
            QUIET.with(|q| q.set(false));
            let msg = LAST_PANIC.with(|p| p.borrow_mut().take());
            fail(
                name,
                &format!("corpus file {} panics", path.display()),
                input,
                msg,
            );
        }
    }

    // 2. Generated inputs until the budget is spent.
    let seeds: Vec<Vec<u8>> = corpus.iter().map(|(_, b)| b.clone()).collect();
    let dict = target.dict;
    let mutated =
        (select(seeds.clone()), vec(edit(), 1..8)).prop_map(move |(s, e)| apply(&s, &e, dict));
    let spliced = (
        select(seeds.clone()),
        select(seeds),
        any::<Index>(),
        any::<Index>(),
        vec(edit(), 0..4),
    )
        .prop_map(move |(a, b, i, j, e)| {
            let mut v = a[..pos(&i, a.len())].to_vec();
            v.extend_from_slice(&b[pos(&j, b.len())..]);
            apply(&v, &e, dict)
        });
    let strategy = prop_oneof![
        5 => mutated,
        1 => spliced,
        3 => target.structured,
        1 => vec(any::<u8>(), 0..target.max_random),
    ];
    let config = Config {
        cases: BATCH,
        failure_persistence: None,
        max_shrink_iters: 4096,
        max_shrink_time: 20_000,
        ..Config::default()
    };
    let execs = Cell::new(corpus.len() as u64);
    let fuzz_start = Instant::now();
    let mut batch = 0u64;
    while started.elapsed() < budget {
        // A runner counts its successes for good: a fresh one (and RNG) per batch.
        let mut rng_seed = [0u8; 32];
        rng_seed[..8].copy_from_slice(&seed.to_le_bytes());
        rng_seed[8..16].copy_from_slice(&batch.to_le_bytes());
        batch += 1;
        let mut runner = TestRunner::new_with_rng(
            config.clone(),
            TestRng::from_seed(RngAlgorithm::ChaCha, &rng_seed),
        );
        let result = runner.run(&strategy, |input| {
            execs.set(execs.get() + 1);
            check(&input);
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TestError::Fail(reason, input)) => {
                QUIET.with(|q| q.set(false));
                let msg = LAST_PANIC.with(|p| p.borrow_mut().take());
                fail(
                    name,
                    &format!(
                        "{reason} (seed {seed:#x}, after {} executions)",
                        execs.get()
                    ),
                    &input,
                    msg,
                );
            }
            Err(TestError::Abort(reason)) => {
                QUIET.with(|q| q.set(false));
                panic!("fuzz target {name}: proptest aborted: {reason}");
            }
        }
    }
    QUIET.with(|q| q.set(false));
    let secs = fuzz_start.elapsed().as_secs_f64().max(1e-9);
    let n = execs.get();
    report(&format!(
        "fuzz {name}: {n} executions in {secs:.1} s ({:.0}/s), {} corpus seeds, seed {seed:#x}",
        (n - corpus.len() as u64) as f64 / secs,
        corpus.len(),
    ));
}
