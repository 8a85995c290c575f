//! Smoke tests of the binary's command line. Having an integration test in
//! this package also makes `cargo test --workspace` build the `osmvec`
//! binary itself, with the same dependency features as every other test
//! target, so CI compiles each dependency (RocksDB's C++ above all) once.

use std::process::Command;

fn osmvec(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_osmvec"))
        .args(args)
        .output()
        .expect("osmvec runs")
}

#[test]
fn version_and_help_list_the_commands() {
    let v = osmvec(&["--version"]);
    assert!(v.status.success());
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("osmvec "));
    let h = String::from_utf8(osmvec(&["--help"]).stdout).unwrap();
    for cmd in [
        "import",
        "stats",
        "export",
        "apply",
        "replicate",
        "train",
        "embed",
        "eval",
    ] {
        assert!(h.contains(cmd), "--help does not list {cmd}");
    }
}

#[test]
fn missing_store_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("osmvec-no-store-{}", std::process::id()));
    let out = osmvec(&["stats", "--store", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist") && err.contains("osmvec import"),
        "{err}"
    );
    assert!(!dir.exists(), "stats created a store");
}

/// Training, embedding and evaluation refuse clearly when what they need is
/// missing, and leave nothing half-written behind.
#[test]
fn model_commands_name_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let extract = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/extracts/liechtenstein-2013-08-03.osm.pbf"
    );
    let s = store.to_str().unwrap();
    assert!(osmvec(&["import", "--store", s, extract]).status.success());

    // No text model where we point: the error says how to install it.
    let ckpt = tmp.path().join("ckpt");
    let out = osmvec(&[
        "train",
        "--store",
        s,
        "--out",
        ckpt.to_str().unwrap(),
        "--steps",
        "1",
        "--text-model-dir",
        tmp.path().join("nowhere").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("all-MiniLM-L6-v2") && err.contains("ops/fetch-model.sh"),
        "{err}"
    );
    assert!(!ckpt.join("checkpoint.json").exists());

    // No checkpoint: embed names the directory and the command that makes one.
    let out = osmvec(&[
        "embed",
        "--store",
        s,
        "--checkpoint",
        ckpt.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no checkpoint in") && err.contains("osmvec train"),
        "{err}"
    );

    // A CUDA device in a CPU build is refused with the way to get one.
    let out = osmvec(&[
        "eval",
        "--store",
        s,
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    if !cfg!(feature = "cuda") {
        assert!(err.contains("--features cuda"), "{err}");
    }
}

/// Defect 8 of issue 14: `--poll-interval 1e20` panicked (exit 101, a
/// Duration overflow) instead of a clear error. Every duration flag of
/// `replicate` and `run` is checked: a usage error naming the flag, not a
/// panic, and nothing opened.
#[test]
fn absurd_durations_are_usage_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("nothing");
    let s = store.to_str().unwrap();
    for (flag, value) in [
        ("--poll-interval", "1e20"),
        ("--poll-interval", "-1"),
        ("--poll-interval", "NaN"),
        ("--retry-initial", "inf"),
        ("--retry-max", "1e300"),
        ("--fetch-timeout", "1e20"),
    ] {
        let arg = format!("{flag}={value}");
        let out = osmvec(&["replicate", "--store", s, "--source", s, &arg]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "replicate {flag} {value}: {err}"
        );
        assert!(err.contains(flag), "{err}");
    }
    for (flag, value, setting) in [
        ("--poll-interval", "1e20", "poll_interval_seconds"),
        ("--debounce", "1e15", "debounce_seconds"),
        ("--fetch-timeout", "1e20", "fetch_timeout_seconds"),
    ] {
        let out = osmvec(&[
            "run",
            "--store",
            s,
            "--source",
            s,
            "--checkpoint",
            s,
            flag,
            value,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "run {flag} {value}: {err}");
        assert!(err.contains(setting) && err.contains("one year"), "{err}");
    }
    assert!(!store.exists());
}
