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
