//! libFuzzer target: bytes → `read_osc` → `DiffApplier::commit` on a store
//! holding the imported Maldives base (the corpus is the Maldives minutely
//! diffs, so the fuzzer's ids hit real objects, ways and relations).
//!
//! Findings are panics (including overflow and debug assertions, on in
//! cargo-fuzz builds), aborts and hangs, plus two properties checked on
//! every input: a refused commit leaves the kept counts and the sequence as
//! they were, and after accepted diffs the kept object counts equal a scan
//! (checked every 64 accepted inputs: a scan of the store costs more than a
//! diff). Diffs accumulate in the one store, as on a daemon.

#![no_main]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use osmvec_graphstore::apply::DiffApplier;
use osmvec_graphstore::read::{ElementLimits, OscOptions, read_osc};
use osmvec_graphstore::{Store, TileConfig};

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("osmvec-fuzz-")
            .tempdir()
            .unwrap();
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data/replication/maldives/base-2017-03-01T0749Z.osm.pbf");
        let path = dir.path().join("store");
        osmvec_graphstore::import::import(&path, &[base], TileConfig::default(), &|_| {})
            .expect("import the Maldives base");
        let store = Store::open(&path).unwrap();
        Fixture { _dir: dir, store }
    })
}

static ACCEPTED: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let store = &fixture().store;
    // Smaller caps than a daemon's, so one input cannot take seconds; the
    // caps themselves are tested in the suite.
    let opts = OscOptions {
        max_decompressed_bytes: 16 << 20,
        max_changes: 100_000,
        limits: ElementLimits {
            max_event_bytes: 1 << 20,
            max_element_bytes: 4 << 20,
            ..ElementLimits::default()
        },
    };
    let gzip = data.starts_with(&[0x1f, 0x8b]);
    let mut changes = Vec::new();
    let read = read_osc("fuzz input", data, gzip, &opts, &mut |c| {
        changes.push(c);
        Ok(())
    });
    if let Err(e) = read {
        assert!(e.to_string().contains("fuzz input"), "{e}");
        return;
    }
    let counts = store.counts().unwrap();
    let state = store.replication_state().unwrap();
    let result = DiffApplier::new(store, "fuzz input").and_then(|mut a| {
        for c in changes {
            a.push(c)?;
        }
        a.commit(None, None, false)
    });
    match result {
        Err(e) => {
            assert_eq!(store.counts().unwrap(), counts, "a refused diff wrote: {e}");
            assert_eq!(store.replication_state().unwrap(), state);
        }
        Ok(_) => {
            if ACCEPTED.fetch_add(1, Ordering::Relaxed) % 64 == 0 {
                let c = store.counts().unwrap();
                assert_eq!(
                    store.recount().unwrap(),
                    (c.nodes as u64, c.ways as u64, c.relations as u64),
                    "kept counts differ from a scan"
                );
            }
        }
    }
});
