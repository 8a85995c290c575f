//! Engine v2 on a real extract (Liechtenstein 2013) with a trained
//! checkpoint: every tile's embedding equals the reference path's, caches
//! far smaller than the store change nothing (and never panic), and
//! context-dirty pruning re-embeds only what a full re-embed would change.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use osmvec_graphstore::Store;
use osmvec_graphstore::TileConfig;
use osmvec_graphstore::apply::apply_changes;
use osmvec_graphstore::element::{Action, Change, Element, ElementType};
use osmvec_graphstore::graph::{coarse_parent, sample_features};
use osmvec_graphstore::import::import;
use osmvec_graphstore::tiles::TileId;
use osmvec_model::Device;
use osmvec_pipeline::checkpoint::Model;
use osmvec_pipeline::embed::{EmbedConfig, EmbedReport, embed_tiles};
use osmvec_pipeline::inputs::{CacheLimits, EncodePath, Inputs, encode_batch_training};
use osmvec_pipeline::tags::TagVectors;
use osmvec_pipeline::train::{TrainConfig, default_model_dir, train};

fn extract() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/extracts/liechtenstein-2013-08-03.osm.pbf")
}

/// An imported store and a checkpoint trained on it for two steps.
fn store_and_checkpoint(dir: &Path) -> (PathBuf, PathBuf) {
    let store = dir.join("store");
    let ckpt = dir.join("ckpt");
    import(&store, &[extract()], TileConfig::default(), &|_| {}).expect("import");
    train(
        &Store::open(&store).unwrap(),
        &TrainConfig {
            out: ckpt.clone(),
            steps: 2,
            batch_size: 16,
            learning_rate: 1e-3,
            warmup_steps: 1,
            seed: 5,
            degree: 10,
            major_version: 1,
            save_every: 0,
            model_dir: default_model_dir(),
            device: Device::Cpu,
            reference: false,
            tag_texts: Default::default(),
            dropout: 0.0,
        },
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect("train");
    (store, ckpt)
}

fn fine_tiles(store: &Store) -> Vec<TileId> {
    let fine = store.tile_config().fine_zoom;
    store
        .tiles()
        .unwrap()
        .into_keys()
        .filter(|t| t.z == fine)
        .collect()
}

fn rows(t: &osmvec_model::Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn engine_embeds_every_tile_as_the_reference_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (store_dir, ckpt) = store_and_checkpoint(tmp.path());
    let store = Store::open(&store_dir).unwrap();
    let model = Model::load(&ckpt, &Device::Cpu).unwrap();
    let coarse = store.tile_config().coarse_zoom;
    let mut tiles = fine_tiles(&store);
    tiles.sort_by_key(|t| (coarse_parent(*t, coarse), *t));
    assert!(tiles.len() > 500, "{} tiles", tiles.len());

    let vectors = || TagVectors::new(default_model_dir(), Device::Cpu);
    let mut engine = Inputs::new(vectors(), false);
    let mut reference = Inputs::new(vectors(), false);
    reference.path = EncodePath::Reference;
    let (mut worst, mut worst_training, mut compared) = (0f32, 0f32, 0usize);
    for chunk in tiles.chunks(48) {
        let be = engine.batch(&store, &model, chunk).unwrap();
        let ge = engine.encode(&model, &be).unwrap();
        let br = reference.batch(&store, &model, chunk).unwrap();
        let gr = reference.encode(&model, &br).unwrap();
        assert_eq!(ge.present, gr.present);
        worst = worst.max(max_diff(&rows(&ge.vectors), &rows(&gr.vectors)));
        // The training engine (live weights, autograd) computes the same.
        let gt = encode_batch_training(&model, &br).unwrap();
        worst_training = worst_training.max(max_diff(&rows(&gt.vectors), &rows(&gr.vectors)));
        compared += ge.present.iter().filter(|p| **p).count();
    }
    eprintln!(
        "{compared} tiles: engine vs reference max |difference| {worst:e}, training engine {worst_training:e}; contexts encoded {} cached {}",
        engine.contexts_encoded, engine.contexts_cached
    );
    assert!(compared > 500);
    assert!(worst < 1e-5, "engine differs from the reference by {worst}");
    assert!(
        worst_training < 1e-5,
        "training engine differs by {worst_training}"
    );
    // Contexts were reused across batches (tiles grouped by parent).
    assert!(engine.contexts_cached > 0);
    assert_eq!(reference.contexts_cached, 0);
}

/// More coarse tiles than the caches hold, a parent's children split over
/// batches (the order that made the old cache panic with `built above`),
/// tag and feature caches a few entries long: the same vectors as with
/// the default limits.
#[test]
fn caches_smaller_than_the_store_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (store_dir, ckpt) = store_and_checkpoint(tmp.path());
    let store = Store::open(&store_dir).unwrap();
    let model = Model::load(&ckpt, &Device::Cpu).unwrap();
    let mut tiles = fine_tiles(&store);
    // Interleave parents: consecutive tiles have different parents.
    tiles.sort_by_key(|t| (t.y % 8, t.x % 8, *t));
    let coarse: std::collections::BTreeSet<TileId> = tiles
        .iter()
        .map(|t| coarse_parent(*t, store.tile_config().coarse_zoom))
        .collect();
    let limits = CacheLimits {
        fine_graphs: 3,
        coarse_graphs: 2,
        context_vectors: 2,
    };
    assert!(
        coarse.len() > limits.coarse_graphs * 2,
        "{} coarse tiles",
        coarse.len()
    );
    let embed_all = |inputs: &mut Inputs| -> HashMap<TileId, Vec<f32>> {
        let mut out = HashMap::new();
        for chunk in tiles.chunks(5) {
            let b = inputs.batch(&store, &model, chunk).unwrap();
            let g = inputs.encode(&model, &b).unwrap();
            for ((t, p), row) in chunk.iter().zip(&g.present).zip(rows(&g.vectors)) {
                if *p {
                    out.insert(*t, row);
                }
            }
        }
        out
    };
    let mut small = Inputs::with_limits(
        TagVectors::new(default_model_dir(), Device::Cpu),
        false,
        limits,
    );
    small.vectors.max_sets = 7;
    small.vectors.max_texts = 11;
    small.features.max_features = 40;
    let a = embed_all(&mut small);
    let b = embed_all(&mut Inputs::new(
        TagVectors::new(default_model_dir(), Device::Cpu),
        false,
    ));
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .map(|(t, v)| {
            v.iter()
                .zip(&b[t])
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        })
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "{worst}");
    let (_, c, v) = small.cached();
    assert!(c <= limits.coarse_graphs && v <= limits.context_vectors);
    // Training caches fine graphs too: same bound.
    let mut training = Inputs::with_limits(
        TagVectors::new(default_model_dir(), Device::Cpu),
        true,
        limits,
    );
    for chunk in tiles.chunks(5).take(20) {
        let b = training.batch(&store, &model, chunk).unwrap();
        encode_batch_training(&model, &b).unwrap();
        assert!(training.cached().0 <= limits.fine_graphs.max(chunk.len()));
    }
}

fn embeddings(store_dir: &Path) -> BTreeMap<TileId, Vec<f32>> {
    Store::open(store_dir)
        .unwrap()
        .tile_embeddings()
        .unwrap()
        .into_iter()
        .map(|(t, e)| (t, e.vector))
        .collect()
}

/// `embed` on a store directory, opened for the call (the test opens it
/// between calls).
fn embed(store: &Path, a: &EmbedConfig) -> EmbedReport {
    osmvec_pipeline::embed::embed(&Store::open(store).unwrap(), a, &mut |_| {}).unwrap()
}

fn embed_args(ckpt: &Path, all: bool) -> EmbedConfig {
    EmbedConfig {
        checkpoint: ckpt.to_path_buf(),
        all,
        batch_size: 64,
        model_dir: default_model_dir(),
        device: Device::Cpu,
        reference: false,
    }
}

/// Re-tags a node (version + 1) as one diff.
fn retag(store_dir: &Path, id: i64, key: &str, value: &str) {
    let store = Store::open(store_dir).unwrap();
    let mut n = store.get_node(id).unwrap().expect("node");
    n.meta.version += 1;
    n.tags.push((key.into(), value.into()));
    apply_changes(
        &store,
        "retag.osc",
        [Change {
            action: Action::Modify,
            element: Element::Node(n),
        }],
        None,
        None,
    )
    .unwrap();
}

#[test]
fn pruning_re_embeds_only_what_changed_and_equals_a_full_re_embed() {
    let tmp = tempfile::tempdir().unwrap();
    let (store_dir, ckpt) = store_and_checkpoint(tmp.path());
    let first = embed(&store_dir, &embed_args(&ckpt, true));
    assert!(first.embedded > 500);
    let model = Model::load(&ckpt, &Device::Cpu).unwrap();
    let cap = model.meta.config.graphs.coarse_max_nodes;

    // The densest coarse tile, a point in it outside its context sample and
    // a point inside it.
    let (coarse, outside, inside) = {
        let store = Store::open(&store_dir).unwrap();
        let z = store.tile_config().coarse_zoom;
        let busiest = store
            .tiles()
            .unwrap()
            .into_iter()
            .filter(|(t, _)| t.z == z)
            .max_by_key(|(_, n)| *n)
            .unwrap();
        let keys = store.features_in_tile(busiest.0).unwrap();
        assert!(
            keys.len() > cap,
            "the densest coarse tile has {} features",
            keys.len()
        );
        let sample = sample_features(keys.clone(), cap);
        let node = |in_sample: bool| {
            keys.iter()
                .find(|k| k.0 == ElementType::Node && sample.contains(k) == in_sample)
                .map(|k| k.1)
                .expect("a point")
        };
        (busiest.0, node(false), node(true))
    };

    // 1. An edit outside the context sample: the coarse mark changes no child.
    retag(&store_dir, outside, "bench", "yes");
    let r: EmbedReport = embed(&store_dir, &embed_args(&ckpt, false));
    let children = Store::open(&store_dir)
        .unwrap()
        .children_with_features(coarse)
        .unwrap()
        .len();
    eprintln!(
        "outside the sample: {:?}, {} tiles embedded of {children} children",
        r.context, r.tiles
    );
    assert!(r.context.coarse_marks >= 1);
    assert!(r.context.children_pruned >= children, "{:?}", r.context);
    assert!(r.tiles >= 1 && r.tiles < children, "{} tiles", r.tiles);
    let pruned = embeddings(&store_dir);
    embed(&store_dir, &embed_args(&ckpt, true));
    let full = embeddings(&store_dir);
    assert_eq!(
        pruned.keys().collect::<Vec<_>>(),
        full.keys().collect::<Vec<_>>()
    );
    let worst = pruned
        .iter()
        .map(|(t, v)| {
            v.iter()
                .zip(&full[t])
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        })
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-6,
        "pruned embeddings differ from a full re-embed by {worst}"
    );

    // 2. An edit inside the sample: every child of the coarse tile again.
    retag(&store_dir, inside, "bench", "yes");
    let r = embed(&store_dir, &embed_args(&ckpt, false));
    eprintln!(
        "inside the sample: {:?}, {} tiles embedded",
        r.context, r.tiles
    );
    assert!(r.context.children_marked >= children, "{:?}", r.context);
    assert!(r.tiles >= children);
    let dirty = embeddings(&store_dir);
    embed(&store_dir, &embed_args(&ckpt, true));
    let full = embeddings(&store_dir);
    let worst = dirty
        .iter()
        .map(|(t, v)| {
            v.iter()
                .zip(&full[t])
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        })
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "{worst}");

    // The same batch in both paths of one small run: `tiles_to_embed` and
    // `embed_tiles` work through the public API too.
    let store = Store::open(&store_dir).unwrap();
    let mut inputs = Inputs::new(TagVectors::new(default_model_dir(), Device::Cpu), false);
    let tile = *fine_tiles(&store).first().unwrap();
    let mut rep = EmbedReport::default();
    embed_tiles(&store, &model, &mut inputs, &[tile], &[], &mut rep).unwrap();
    assert_eq!(rep.tiles, 1);
}
