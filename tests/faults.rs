//! Faults of the machine rather than of the input: a disk that fills up in
//! the middle of a replay, and a store file damaged on disk. What must hold:
//! a clear error naming the store and what to do, never a panic or an
//! abort, nothing already stored lost, and, once the cause is gone, a
//! resumed run that ends exactly where an uninterrupted one does.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use osmvec_test_kit::*;

fn maldives_base() -> PathBuf {
    data("replication/maldives/base-2017-03-01T0749Z.osm.pbf")
}

fn maldives_feed() -> PathBuf {
    data("replication/maldives/minute")
}

fn replicate(store: &Path) -> Output {
    osmvec(&[
        "replicate",
        "--store",
        path_str(store),
        "--source",
        path_str(&maldives_feed()),
        "--until-caught-up",
        "--max-attempts",
        "1",
    ])
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A clean failure: exit status 1 with a message, not a panic (101) or a
/// signal (an abort in RocksDB's C++).
fn assert_clean_failure(out: &Output, what: &str) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: expected exit status 1, got {:?}:\n{err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{what}: a panic:\n{err}");
    assert!(err.contains("error:"), "{what}: no error message:\n{err}");
}

/// Bytes in use in the file system holding `dir` (statvfs).
fn fs_used_and_free(dir: &Path) -> (u64, u64) {
    let c = std::ffi::CString::new(path_str(dir)).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0, "statvfs");
    let bs = s.f_frsize as u64;
    ((s.f_blocks - s.f_bfree) as u64 * bs, s.f_bavail as u64 * bs)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dir_bytes(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

/// A small tmpfs of its own, unmounted on drop.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(dir: &Path, bytes: u64) -> Result<SmallFs, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "osmvec-test"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(SmallFs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn a_disk_filling_up_mid_replay_stops_cleanly_and_resumes_to_the_same_store() {
    let dir = tempdir();
    // The uninterrupted run, on an ordinary disk.
    let reference = dir.path().join("reference");
    osmvec_ok(&[
        "import",
        "--store",
        path_str(&reference),
        path_str(&maldives_base()),
    ]);
    let imported_bytes = dir_bytes(&reference);
    let out = replicate(&reference);
    assert!(out.status.success(), "{}", stderr(&out));
    let growth = dir_bytes(&reference).saturating_sub(imported_bytes);
    let reference_opl = export(&reference);
    let reference_stats = stats(&reference);
    assert_eq!(reference_stats["sequence"], 180);

    let small = match SmallFs::mount(&dir.path().join("small"), 128 << 20) {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!(
                "SKIPPED: this machine cannot mount a small file system for the disk-full test ({why}); \
                 it needs root (CI and ops/test.sh run as root on this project's machines)"
            );
            return;
        }
    };
    let store = small.dir.join("store");
    osmvec_ok(&[
        "import",
        "--store",
        path_str(&store),
        path_str(&maldives_base()),
    ]);
    // Leave room for about a third of what the replay writes, then fill the rest.
    let (_, free) = fs_used_and_free(&small.dir);
    let room = (growth / 3).max(64 << 10);
    let filler = small.dir.join("filler");
    std::fs::write(&filler, vec![0x5a; (free - room) as usize]).unwrap();
    eprintln!("replay grows the store by {growth} bytes; {room} bytes left free of {free}",);

    let out = replicate(&store);
    assert_clean_failure(&out, "replicate on a full disk");
    let err = stderr(&out);
    assert!(
        err.contains("is full") && err.contains("free space") && err.contains(path_str(&store)),
        "the error does not say that the disk is full, where, and what to do:\n{err}"
    );
    // `stats` is read-only, so it works on the full disk; what was stored
    // before the disk filled is there.
    let halfway = stats(&store)["sequence"].as_u64().unwrap_or(0);
    eprintln!("stopped at sequence {halfway}: {}", err.trim());
    assert!(
        (1..180).contains(&halfway),
        "the disk should fill in the middle of the replay, not at sequence {halfway}"
    );
    // Still full: a second try fails the same way and loses nothing.
    let out = replicate(&store);
    assert_clean_failure(&out, "a second replicate on the full disk");
    assert!(stats(&store)["sequence"].as_u64().unwrap_or(0) >= halfway);

    std::fs::remove_file(&filler).unwrap();
    let out = replicate(&store);
    assert!(
        out.status.success(),
        "after space was freed: {}",
        stderr(&out)
    );
    assert_eq!(stats(&store), reference_stats);
    assert_same_opl(&export(&store), &reference_opl, "resumed after a full disk");
}

/// The store's table files, largest first.
fn tables(store: &Path) -> Vec<PathBuf> {
    let mut t: Vec<PathBuf> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sst"))
        .collect();
    t.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).unwrap().len()));
    t
}

#[test]
fn a_flipped_byte_in_a_table_file_is_a_clear_error_not_a_panic() {
    let dir = tempdir();
    let pristine = dir.path().join("pristine");
    osmvec_ok(&[
        "import",
        "--store",
        path_str(&pristine),
        path_str(&maldives_base()),
    ]);
    let reference_opl = export(&pristine);
    let reference_stats = stats(&pristine);
    let largest = tables(&pristine)
        .into_iter()
        .next()
        .expect("the imported store has table files");
    let len = std::fs::metadata(&largest).unwrap().len();
    let name = largest.file_name().unwrap().to_str().unwrap().to_string();
    eprintln!("damaging {name} ({len} bytes)");

    let mut detected = 0;
    // Data blocks near the start, in the middle and near the end, the
    // index and filter blocks, and the footer (the last 53 bytes).
    for at in [
        len / 50,
        len / 3,
        len / 2,
        len * 9 / 10,
        len - 200,
        len - 20,
    ] {
        let store = dir.path().join(format!("flip{at}"));
        copy_dir(&pristine, &store);
        let table = store.join(&name);
        let mut bytes = std::fs::read(&table).unwrap();
        bytes[at as usize] ^= 0xff;
        std::fs::write(&table, bytes).unwrap();

        let mut failures = Vec::new();
        let feed = maldives_feed();
        for args in [
            vec!["stats", "--json"],
            vec!["export", "--format", "opl"],
            vec!["replicate", "--source"],
        ] {
            let mut full = vec![args[0], "--store", path_str(&store)];
            full.extend_from_slice(&args[1..]);
            if args[0] == "replicate" {
                full.extend_from_slice(&[path_str(&feed), "--until-caught-up", "--max-diffs", "3"]);
            }
            let out = osmvec(&full);
            if out.status.success() {
                // A byte the command never reads (a filter block, say) may
                // go unnoticed; what it printed must then be right.
                match args[0] {
                    "stats" => assert_eq!(
                        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
                        reference_stats,
                        "byte {at}: stats succeeded with wrong figures"
                    ),
                    "export" => assert_same_opl(
                        &String::from_utf8(out.stdout).unwrap(),
                        &reference_opl,
                        &format!("export with byte {at} of {name} flipped"),
                    ),
                    _ => {}
                }
                continue;
            }
            assert_clean_failure(&out, &format!("osmvec {} with byte {at} flipped", args[0]));
            let err = stderr(&out);
            assert!(
                err.contains("is damaged")
                    && err.contains(path_str(&store))
                    && err.contains("osmvec import"),
                "osmvec {} with byte {at} flipped: the error does not say that the store is damaged, which, and what to do:\n{err}",
                args[0]
            );
            failures.push(args[0]);
        }
        eprintln!("byte {at}: refused by {failures:?}");
        if failures.contains(&"export") {
            detected += 1;
        }
        std::fs::remove_dir_all(&store).unwrap();
    }
    // A full export reads every data block, index and footer: most flips
    // must be caught by their checksums.
    assert!(
        detected >= 4,
        "only {detected} of 6 flips were detected by export"
    );
}
