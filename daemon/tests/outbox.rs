//! The outbox on real data: a Monaco diff applied with the outbox on queues
//! one change record per changed feature in the diff's own write batch;
//! embedding queues each tile once, with drift against the previous vector.

use std::path::Path;

use osmvec_graphstore::apply::DiffApplier;
use osmvec_graphstore::import::import;
use osmvec_graphstore::outbox::OutboxItem;
use osmvec_graphstore::read::OscOptions;
use osmvec_graphstore::{Store, TileConfig};
use osmvec_model::Device;
use osmvec_pipeline::checkpoint::{Model, ModelConfig};
use osmvec_pipeline::embed::{EmbedReport, embed_tiles};
use osmvec_pipeline::inputs::Inputs;
use osmvec_pipeline::tags::TagVectors;
use osmvec_pipeline::train::default_model_dir;

fn data(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data")
        .join(p)
}

#[test]
fn changes_and_tiles_are_queued_with_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    import(
        &dir,
        &[data("extracts/monaco-2015-04-27.osm.pbf")],
        TileConfig::default(),
        &|_| {},
    )
    .unwrap();
    let store = Store::open(&dir).unwrap();
    store.set_outbox_enabled(true).unwrap();

    let diff = data("diffs/derived/monaco-2015-04-27_2015-07-07.osc.gz");
    let mut applier = DiffApplier::new(&store, "monaco diff").unwrap();
    applier
        .read_osc(
            "monaco diff",
            std::fs::File::open(&diff).unwrap(),
            true,
            &OscOptions::default(),
        )
        .unwrap();
    let report = applier.commit(None, None, true).unwrap();
    assert!(!report.events.is_empty());
    let entries = store.outbox_entries(None, usize::MAX).unwrap();
    let changes: Vec<_> = entries
        .iter()
        .filter_map(|e| match &e.item {
            OutboxItem::Change(c) => Some(c),
            OutboxItem::Tile(_) | OutboxItem::Job(_) => None,
        })
        .collect();
    assert_eq!(changes.len(), report.events.len());
    for (c, e) in changes.iter().zip(&report.events) {
        assert_eq!(
            (c.osm_type.as_str(), c.id, c.version),
            (e.osm_type, e.id, e.version)
        );
        assert_eq!(c.tiles, e.tiles);
    }
    assert!(changes.iter().any(|c| c.action == "deleted"));
    assert!(changes.iter().any(|c| c.action == "created"));

    // Embed every tile twice with one (untrained) model: each tile is queued
    // once, and the second pass reports zero drift against the first.
    let model = Model::new(
        ModelConfig::new(5, 10),
        Default::default(),
        "1.0".into(),
        &Device::Cpu,
    )
    .unwrap();
    let mut inputs = Inputs::new(TagVectors::new(default_model_dir(), Device::Cpu), false);
    let tiles: Vec<_> = store
        .tiles()
        .unwrap()
        .into_keys()
        .filter(|t| t.z == 15)
        .collect();
    let mut r = EmbedReport::default();
    for _ in 0..2 {
        embed_tiles(&store, &model, &mut inputs, &tiles, &[], &mut r).unwrap();
    }
    let queued: Vec<_> = store
        .outbox_entries(None, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|e| matches!(e.item, OutboxItem::Tile(_)))
        .collect();
    assert_eq!(queued.len(), tiles.len());
    for (t, e) in store.tile_embeddings().unwrap() {
        let d = e.drift.unwrap_or_else(|| panic!("tile {t}: no drift"));
        assert!(d.abs() < 1e-5, "tile {t}: drift {d} between identical runs");
    }
    // Acknowledging everything empties the outbox.
    let all: Vec<(Vec<u8>, u64)> = store
        .outbox_entries(None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| (e.key, e.id))
        .collect();
    assert_eq!(store.outbox_ack(&all).unwrap(), all.len());
    assert_eq!(store.outbox_len().unwrap(), 0);
}
