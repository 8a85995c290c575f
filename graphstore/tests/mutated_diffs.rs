//! Mutation testing of diff application over real minutely diffs: each case
//! takes one of the 180 Maldives diffs, damages it in one to three ways
//! (flipped bytes, cuts, lost or repeated lines, junk numbers, foreign
//! markup, swapped actions, damaged gzip), and runs it through `read_osc` →
//! `DiffApplier::commit` on a fresh copy of the imported Maldives store.
//!
//! What must hold for every case: no panic; a refused diff names its input
//! (and, for an XML error, the line) and leaves the store bit for bit as it
//! was (`Store::digest`); an accepted diff leaves the kept object counts
//! equal to a scan, and applying it a second time changes nothing. The
//! seeds are fixed (OSMVEC_MUTATION_SEED and OSMVEC_MUTATION_CASES replay or
//! widen the campaign); a failing case is written to the target folder so
//! it can be replayed with `osmvec apply`. `ops/fuzz.sh` runs the same
//! pipeline under libFuzzer for as long as one likes.

use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use osmvec_graphstore::apply::DiffApplier;
use osmvec_graphstore::element::Change;
use osmvec_graphstore::read::{OscOptions, ReadError, read_osc};
use osmvec_graphstore::{Store, StoreError, TileConfig};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data")
        .join(rel)
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const JUNK_NUMBERS: &[&str] = &[
    "-1",
    "0",
    "",
    "-0",
    "1e309",
    "NaN",
    "inf",
    "4294967296",
    "9223372036854775808",
    "-9223372036854775809",
    "99999999999999999999999",
    "0x10",
    " 7",
    "1.5",
    "+3",
];

const FOREIGN: &[&str] = &[
    "<!DOCTYPE osmChange [<!ENTITY boom \"aaaaaaaaaa\">]>",
    "&boom;",
    "<node id=\"1\" version=\"1\" lat=\"4.2\" lon=\"73.5\"/>",
    "<node id=\"1\" version=\"1\"/>",
    "</modify>",
    "<delete>",
    "<create>",
    "<way id=\"2\" version=\"1\"><nd ref=\"1\"/></way>",
    "<relation id=\"3\" version=\"1\"><member type=\"blob\" ref=\"1\" role=\"\"/></relation>",
    "<tag k=\"amenity\" v=\"cafe\"/>",
    "<tag k=\"\" v=\"\"/>",
    "<unknown/>",
    "<![CDATA[x]]>",
    "<!-- comment -->",
    "<?xml version=\"1.0\"?>",
    "\u{0}",
    "\u{fffd}",
    "<osmChange version=\"0.6\">",
];

/// Damages `text` once; returns what was done, for the failure message.
fn mutate(text: &mut Vec<u8>, rng: &mut XorShift) -> String {
    let len = text.len();
    match rng.below(9) {
        0 => {
            let i = rng.below(len);
            let bit = 1u8 << rng.below(8);
            text[i] ^= bit;
            format!("flipped bit {bit:#x} at byte {i}")
        }
        1 => {
            let at = rng.below(len);
            text.truncate(at);
            format!("cut at byte {at}")
        }
        2..=4 => {
            let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
            let n = lines.len();
            let (a, b) = (rng.below(n), rng.below(n));
            let mut out: Vec<Vec<u8>> = lines.iter().map(|l| l.to_vec()).collect();
            let what = match rng.below(3) {
                0 => {
                    out.remove(a);
                    format!("removed line {}", a + 1)
                }
                1 => {
                    let l = out[a].clone();
                    out.insert(b, l);
                    format!("copied line {} before line {}", a + 1, b + 1)
                }
                _ => {
                    out.swap(a, b);
                    format!("swapped lines {} and {}", a + 1, b + 1)
                }
            };
            *text = out.join(&b'\n');
            what
        }
        5..=6 => {
            // A number inside an attribute value, replaced by junk.
            let quotes: Vec<usize> = text
                .windows(2)
                .enumerate()
                .filter(|(_, w)| w[0] == b'"' && (w[1].is_ascii_digit() || w[1] == b'-'))
                .map(|(i, _)| i + 1)
                .collect();
            if quotes.is_empty() {
                return "no number to replace".into();
            }
            let start = quotes[rng.below(quotes.len())];
            let end = start + text[start..].iter().position(|b| *b == b'"').unwrap_or(0);
            let junk = JUNK_NUMBERS[rng.below(JUNK_NUMBERS.len())];
            let old = String::from_utf8_lossy(&text[start..end]).into_owned();
            text.splice(start..end, junk.bytes());
            format!("replaced number {old:?} at byte {start} by {junk:?}")
        }
        7 => {
            let at = rng.below(len + 1);
            let snippet = FOREIGN[rng.below(FOREIGN.len())];
            text.splice(at..at, snippet.bytes());
            format!("inserted {snippet:?} at byte {at}")
        }
        _ => {
            let names = [&b"create"[..], b"modify", b"delete"];
            let from = names[rng.below(3)];
            let to = names[rng.below(3)];
            let hits: Vec<usize> = text
                .windows(from.len() + 1)
                .enumerate()
                .filter(|(_, w)| w[0] == b'<' && &w[1..] == from)
                .map(|(i, _)| i + 1)
                .collect();
            if hits.is_empty() {
                return format!("no <{} to rename", String::from_utf8_lossy(from));
            }
            let at = hits[rng.below(hits.len())];
            text.splice(at..at + from.len(), to.iter().copied());
            format!(
                "renamed <{} at byte {at} to <{}",
                String::from_utf8_lossy(from),
                String::from_utf8_lossy(to)
            )
        }
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[derive(Debug, Default)]
struct Tally {
    refused_by_reader: usize,
    refused_by_commit: usize,
    accepted: usize,
    accepted_changing: usize,
}

enum Outcome {
    Reader,
    Commit,
    Accepted { changed: bool },
}

fn opl(store: &Store) -> Vec<u8> {
    let mut out = Vec::new();
    store.export_opl(&mut out).unwrap();
    out
}

fn apply(store: &Store, name: &str, changes: Vec<Change>) -> Result<(), StoreError> {
    let mut a = DiffApplier::new(store, name)?;
    for c in changes {
        a.push(c)?;
    }
    a.commit(None, None, false).map(|_| ())
}

/// One case's checks; a violated property panics with the reason.
fn run_case(store: &Store, name: &str, input: &[u8], gzipped: bool) -> Outcome {
    let before = store.digest().unwrap();
    let mut changes = Vec::new();
    let read = read_osc(name, input, gzipped, &OscOptions::default(), &mut |c| {
        changes.push(c);
        Ok(())
    });
    if let Err(e) = read {
        let msg = e.to_string();
        assert!(
            msg.contains(name),
            "the error does not name the input: {msg}"
        );
        let xml_level = !matches!(e, ReadError::Io { .. } | ReadError::Compression { .. });
        assert!(
            !xml_level || msg.contains("line "),
            "an XML error without a line: {msg}"
        );
        assert_eq!(store.digest().unwrap(), before, "a refused read wrote");
        return Outcome::Reader;
    }
    let replay = changes.clone();
    if let Err(e) = apply(store, name, changes) {
        let msg = e.to_string();
        assert!(!msg.is_empty());
        assert_eq!(
            store.digest().unwrap(),
            before,
            "a refused commit wrote: {msg}"
        );
        return Outcome::Commit;
    }
    let counts = store.counts().unwrap();
    assert_eq!(
        store.recount().unwrap(),
        (
            counts.nodes as u64,
            counts.ways as u64,
            counts.relations as u64
        ),
        "kept counts differ from a scan"
    );
    let once = opl(store);
    apply(store, name, replay).expect("an accepted diff is accepted again");
    assert!(
        once == opl(store),
        "applying the diff twice changed objects"
    );
    Outcome::Accepted {
        changed: store.digest().unwrap() != before,
    }
}

#[test]
fn mutated_real_diffs_are_refused_cleanly_or_applied_consistently() {
    let seed: u64 = std::env::var("OSMVEC_MUTATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x05c0_ffee);
    let cases: usize = std::env::var("OSMVEC_MUTATION_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let dir = tempfile::tempdir().unwrap();
    let pristine_path = dir.path().join("pristine");
    osmvec_graphstore::import::import(
        &pristine_path,
        &[data("replication/maldives/base-2017-03-01T0749Z.osm.pbf")],
        TileConfig::default(),
        &|_| {},
    )
    .unwrap();
    let pristine = Store::open(&pristine_path).unwrap();
    let diffs: Vec<Vec<u8>> = (1..=180)
        .map(|s| {
            let p = data(&format!(
                "replication/maldives/minute/000/000/{s:03}.osc.gz"
            ));
            gunzip(&std::fs::read(p).unwrap())
        })
        .collect();

    let mut rng = XorShift(seed | 1);
    let mut tally = Tally::default();
    for case in 0..cases {
        let seq = 1 + rng.below(diffs.len());
        let mut text = diffs[seq - 1].clone();
        let mut what: Vec<String> = (0..1 + rng.below(3))
            .map(|_| mutate(&mut text, &mut rng))
            .collect();
        let gzipped = rng.below(4) == 0;
        let input = if gzipped {
            let mut z = gzip(&text);
            match rng.below(3) {
                0 => {
                    let i = rng.below(z.len());
                    z[i] ^= 0x55;
                    what.push(format!("gzip byte {i} xor 0x55"));
                }
                1 => {
                    let at = rng.below(z.len());
                    z.truncate(at);
                    what.push(format!("gzip cut at byte {at}"));
                }
                _ => what.push("gzipped".into()),
            }
            z
        } else {
            text
        };
        let name = format!("case {case} (sequence {seq})");
        let store_path = dir.path().join(format!("case{case}"));
        pristine.checkpoint(&store_path).unwrap();
        let store = Store::open(&store_path).unwrap();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            run_case(&store, &name, &input, gzipped)
        }));
        drop(store);
        match outcome {
            Ok(Outcome::Reader) => tally.refused_by_reader += 1,
            Ok(Outcome::Commit) => tally.refused_by_commit += 1,
            Ok(Outcome::Accepted { changed }) => {
                tally.accepted += 1;
                tally.accepted_changing += changed as usize;
            }
            Err(panic) => {
                let keep = Path::new(env!("CARGO_TARGET_TMPDIR"))
                    .join(format!("mutated-seed{seed}-case{case}.osc"));
                std::fs::write(&keep, &input).unwrap();
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!(
                    "{name}, seed {seed}: {why}\nmutations: {}\ninput kept at {} (gzip: {gzipped})",
                    what.join("; "),
                    keep.display()
                );
            }
        }
        std::fs::remove_dir_all(&store_path).unwrap();
    }
    eprintln!("{cases} cases, seed {seed}: {tally:?}");
    // The campaign must reach both sides: mutations that the reader refuses
    // and diffs that get applied and change the store.
    assert!(tally.refused_by_reader >= cases / 10, "{tally:?}");
    assert!(tally.accepted_changing >= cases / 20, "{tally:?}");
}
