//! The engine against the reference path (`GraphEncoder`): same
//! embeddings, same gradients, on random heterogeneous graphs with shared
//! tag vectors, empty graphs, absent types and sparse relations.

use super::*;
use crate::gat::EdgeType;
use crate::params::SplitMix64;

const DIMS: [usize; 3] = [12, 10, 8];
/// The shared (tag) part of every row; the rest is the node's own.
const SHARED: usize = 6;

fn small_config() -> GraphEncoderConfig {
    GraphEncoderConfig {
        in_dims: DIMS,
        hidden: 32,
        layers: 2,
        out_dim: 16,
        set2set_steps: 5,
        negative_slope: 0.2,
        context_dim: 32,
        relations: Relation::osm_default(),
    }
}

/// A random graph: `n` nodes per type whose shared parts come from a small
/// palette (so rows repeat, as tag vectors do), ~`deg` random edges per node.
fn random_graph(
    rng: &mut SplitMix64,
    n: [usize; 3],
    deg: usize,
    palette: &[Vec<f32>],
) -> TileGraph {
    let mut g = TileGraph::new(DIMS);
    for t in NodeType::ALL {
        for _ in 0..n[t.index()] {
            let mut f = palette[rng.next_below(palette.len() as u64) as usize].clone();
            f.extend((SHARED..DIMS[t.index()]).map(|_| rng.next_normal() as f32));
            g.add_node(t, &f).unwrap();
        }
    }
    let rels: Vec<Relation> = Relation::osm_default()
        .into_iter()
        .filter(|r| n[r.src.index()] > 0 && n[r.dst.index()] > 0)
        .collect();
    if rels.is_empty() {
        return g;
    }
    let total: usize = n.iter().sum();
    for _ in 0..total * deg {
        let r = rels[rng.next_below(rels.len() as u64) as usize];
        let s = rng.next_below(n[r.src.index()] as u64) as u32;
        let d = rng.next_below(n[r.dst.index()] as u64) as u32;
        g.add_edge(r, s, d).unwrap();
    }
    g
}

fn palette(rng: &mut SplitMix64, k: usize) -> Vec<Vec<f32>> {
    (0..k)
        .map(|_| (0..SHARED).map(|_| rng.next_normal() as f32).collect())
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (rows(a), rows(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn batch_set(rng: &mut SplitMix64) -> (Vec<TileGraph>, Vec<TileGraph>) {
    let pal = palette(rng, 5);
    let graphs = vec![
        random_graph(rng, [5, 3, 4], 3, &pal),
        TileGraph::new(DIMS),
        random_graph(rng, [0, 6, 0], 2, &pal),
        random_graph(rng, [1, 0, 0], 0, &pal),
        random_graph(rng, [20, 11, 9], 4, &pal),
        random_graph(rng, [0, 0, 7], 1, &pal),
    ];
    let contexts = vec![
        random_graph(rng, [9, 9, 9], 3, &pal),
        random_graph(rng, [2, 2, 2], 3, &pal),
        TileGraph::new(DIMS),
        random_graph(rng, [3, 0, 3], 3, &pal),
        random_graph(rng, [30, 20, 10], 2, &pal),
        random_graph(rng, [1, 1, 1], 1, &pal),
    ];
    (graphs, contexts)
}

#[test]
fn forward_matches_the_reference() {
    let dev = Device::Cpu;
    for seed in [1u64, 2, 3] {
        let enc = GraphEncoder::new(&small_config(), seed, &dev).unwrap();
        let engine = Engine::new(&enc, SHARED).unwrap();
        let mut rng = SplitMix64::new(seed * 10);
        let (graphs, contexts) = batch_set(&mut rng);

        let want = enc
            .region_vectors(&crate::GraphBatch::new(&graphs, &dev).unwrap())
            .unwrap();
        let got = engine
            .region_vectors(&engine.pack(&graphs).unwrap())
            .unwrap();
        assert!(max_diff(&want.vectors, &got.vectors) < 1e-5);
        assert!(max_diff(&want.type_weights, &got.type_weights) < 1e-6);
        assert_eq!(want.present, got.present);

        let want = enc.encode(&graphs, Some(&contexts)).unwrap();
        let got = engine.encode(&graphs, Some(&contexts)).unwrap();
        let diff = max_diff(&want.vectors, &got.vectors);
        assert!(diff < 1e-5, "seed {seed}: {diff}");
        assert_eq!(want.present, got.present);
        // The rows really carry signal (not all zero).
        assert!(rows(&got.vectors)[0].iter().any(|v| v.abs() > 1e-3));

        let want = enc.encode(&graphs, None).unwrap();
        let got = engine.encode(&graphs, None).unwrap();
        assert!(max_diff(&want.vectors, &got.vectors) < 1e-5);
    }
}

#[test]
fn shared_parts_are_stored_once() {
    let dev = Device::Cpu;
    let mut rng = SplitMix64::new(4);
    let pal = palette(&mut rng, 3);
    let g = random_graph(&mut rng, [30, 30, 30], 2, &pal);
    let b = PackedBatch::new(&[g.clone(), g], SHARED, &dev).unwrap();
    assert_eq!(b.num_nodes(), [60, 60, 60]);
    assert!(b.distinct_shared().iter().all(|&k| k <= 3 && k > 0));
    assert!(PackedBatch::new(&[TileGraph::new(DIMS)], 13, &dev).is_err());
    assert!(PackedBatch::new::<TileGraph>(&[], SHARED, &dev).is_err());
}

#[test]
fn all_empty_and_unknown_relations() {
    let dev = Device::Cpu;
    let enc = GraphEncoder::new(&small_config(), 1, &dev).unwrap();
    let engine = Engine::new(&enc, SHARED).unwrap();
    let none = engine
        .encode(&[TileGraph::new(DIMS), TileGraph::new(DIMS)], None)
        .unwrap();
    assert_eq!(none.present, vec![false, false]);
    assert!(rows(&none.vectors).iter().flatten().all(|&v| v == 0.0));

    let mut cfg = small_config();
    cfg.relations = vec![Relation::new(
        NodeType::Point,
        EdgeType::Near,
        NodeType::Point,
    )];
    let enc = GraphEncoder::new(&cfg, 1, &dev).unwrap();
    let engine = Engine::new(&enc, SHARED).unwrap();
    let mut g = TileGraph::new(DIMS);
    g.add_node(NodeType::Point, &[0.0; 12]).unwrap();
    g.add_node(NodeType::Polygon, &[0.0; 8]).unwrap();
    g.add_edge(
        Relation::new(NodeType::Point, EdgeType::Near, NodeType::Polygon),
        0,
        0,
    )
    .unwrap();
    assert!(engine.encode(&[g], None).is_err());
    assert!(engine.encode(&[TileGraph::new([1, 1, 1])], None).is_err());
}

/// A scalar loss of the embeddings with fixed random weights, so every
/// output coordinate gets a gradient.
fn loss_of(e: &GraphEmbeddings, probe: &Tensor) -> Tensor {
    e.vectors.mul(probe).unwrap().sum_all().unwrap()
}

#[test]
fn gradients_match_the_reference() {
    let dev = Device::Cpu;
    let enc = GraphEncoder::new(&small_config(), 7, &dev).unwrap();
    let mut rng = SplitMix64::new(70);
    let (graphs, contexts) = batch_set(&mut rng);
    let probe = crate::testutil::randn(71, (graphs.len(), 16));

    let reference = loss_of(&enc.encode(&graphs, Some(&contexts)).unwrap(), &probe);
    let g_ref = reference.backward().unwrap();
    let engine = Engine::training(&enc, SHARED).unwrap();
    let ours = loss_of(&engine.encode(&graphs, Some(&contexts)).unwrap(), &probe);
    let g_new = ours.backward().unwrap();
    let (a, b) = (
        reference.to_scalar::<f32>().unwrap(),
        ours.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() < 1e-4, "{a} vs {b}");

    let mut checked = 0;
    for (name, var) in enc.params().named_vars() {
        let r = g_ref.get(var.as_tensor());
        let n = g_new.get(var.as_tensor());
        match (r, n) {
            (None, None) => {}
            (Some(r), Some(n)) => {
                let r = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let n = n.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let scale = r.iter().map(|v| v.abs()).fold(0.0f32, f32::max).max(1e-3);
                let diff = r
                    .iter()
                    .zip(&n)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    diff / scale < 1e-3,
                    "{name}: max diff {diff} (scale {scale})"
                );
                checked += 1;
            }
            (r, n) => {
                // A weight the reference reaches only through exact zeros
                // (or vice versa) must have a zero gradient.
                let g = r.or(n).unwrap();
                let m = g
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(m < 1e-6, "{name}: gradient only on one side ({m})");
            }
        }
    }
    assert!(checked > 100, "only {checked} weights compared");
}

#[test]
fn op_gradients_match_finite_differences() {
    // The fused ops alone, against central differences in f64 terms.
    let dev = Device::Cpu;
    let csr =
        Arc::new(index::EdgeCsr::new(&[0, 1, 2, 0, 3, 3], &[1, 1, 0, 2, 2, 1], 4, 3).unwrap());
    let rows = Arc::new(index::SharedIndex::new(vec![1, 0, 1, 2]));
    let op = ops::SegmentAttention {
        csr,
        rows: Some(rows),
        col_src: 1,
        col_dst: 0,
        slope: 0.2,
    };
    let table = candle_core::Var::from_tensor(&crate::testutil::randn(1, (3, 5))).unwrap();
    let ls = candle_core::Var::from_tensor(&crate::testutil::randn(2, (4, 2))).unwrap();
    let ld = candle_core::Var::from_tensor(&crate::testutil::randn(3, (3, 2))).unwrap();
    let probe = crate::testutil::randn(4, (3, 5));
    let f = |t: &Tensor, s: &Tensor, d: &Tensor| -> Tensor {
        t.apply_op3(s, d, op.clone())
            .unwrap()
            .mul(&probe)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let loss = f(table.as_tensor(), ls.as_tensor(), ld.as_tensor());
    let grads = loss.backward().unwrap();
    for v in [&table, &ls, &ld] {
        let g = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for k in 0..base.len() {
            let eval = |delta: f32| {
                let mut x = base.clone();
                x[k] += delta;
                let t = Tensor::from_vec(x, v.as_tensor().shape(), &dev).unwrap();
                let (a, b, c) = if std::ptr::eq(v, &table) {
                    (t, ls.as_tensor().clone(), ld.as_tensor().clone())
                } else if std::ptr::eq(v, &ls) {
                    (table.as_tensor().clone(), t, ld.as_tensor().clone())
                } else {
                    (table.as_tensor().clone(), ls.as_tensor().clone(), t)
                };
                f(&a, &b, &c).to_scalar::<f32>().unwrap() as f64
            };
            let h = 1e-2f32;
            let fd = (eval(h) - eval(-h)) / (2.0 * h as f64);
            assert!(
                (fd - g[k] as f64).abs() < 2e-3,
                "element {k}: fd {fd} vs {}",
                g[k]
            );
        }
    }
}

/// Throughput of the engine against the reference at the real model's
/// shapes (run with `--ignored --nocapture`; a benchmark, not a test).
#[test]
#[ignore]
fn throughput_against_reference() {
    let dev = Device::Cpu;
    let cfg = GraphEncoderConfig::new(391);
    let enc = GraphEncoder::new(&cfg, 1, &dev).unwrap();
    let engine = Engine::new(&enc, 384).unwrap();
    let mut rng = SplitMix64::new(7);
    let pal: Vec<Vec<f32>> = (0..200)
        .map(|_| (0..384).map(|_| rng.next_normal() as f32 * 0.05).collect())
        .collect();
    let make = |rng: &mut SplitMix64, n: [usize; 3]| {
        let mut g = TileGraph::new([391; 3]);
        for t in NodeType::ALL {
            for _ in 0..n[t.index()] {
                let mut f = pal[rng.next_below(pal.len() as u64) as usize].clone();
                f.extend((0..7).map(|_| rng.next_normal() as f32));
                g.add_node(t, &f).unwrap();
            }
        }
        let rels = Relation::osm_default();
        let total: usize = n.iter().sum();
        for _ in 0..total * 4 {
            let r = rels[rng.next_below(rels.len() as u64) as usize];
            let s = rng.next_below(n[r.src.index()] as u64) as u32;
            let d = rng.next_below(n[r.dst.index()] as u64) as u32;
            g.add_edge(r, s, d).unwrap();
        }
        g
    };
    let graphs: Vec<TileGraph> = (0..256).map(|_| make(&mut rng, [20, 20, 20])).collect();
    let ctx: Vec<TileGraph> = (0..4).map(|_| make(&mut rng, [90, 80, 86])).collect();
    let idx: Vec<u32> = (0..256).map(|i| (i % 4) as u32).collect();
    let time = |f: &dyn Fn()| {
        f();
        let t = std::time::Instant::now();
        let mut n = 0;
        while t.elapsed().as_secs_f64() < 3.0 {
            f();
            n += 1;
        }
        t.elapsed().as_secs_f64() / n as f64
    };
    let only_engine = std::env::var_os("OSMVEC_ENGINE_ONLY").is_some();
    let reference = if only_engine {
        f64::NAN
    } else {
        time(&|| {
            let cb = crate::GraphBatch::new(&ctx, &dev).unwrap();
            let c = enc.region_vectors(&cb).unwrap().vectors;
            let c = c
                .index_select(&Tensor::new(idx.as_slice(), &dev).unwrap(), 0)
                .unwrap();
            let fb = crate::GraphBatch::new(&graphs, &dev).unwrap();
            enc.forward(&fb, Some(&c)).unwrap();
        })
    };
    let ours = time(&|| {
        let c = engine
            .region_vectors(&engine.pack(&ctx).unwrap())
            .unwrap()
            .vectors;
        let c = c
            .index_select(&Tensor::new(idx.as_slice(), &dev).unwrap(), 0)
            .unwrap();
        engine
            .forward(&engine.pack(&graphs).unwrap(), Some(&c))
            .unwrap();
    });
    println!(
        "256 graphs of 60 nodes + 4 contexts: reference {:.3} s ({:.0} tiles/s), engine {:.3} s ({:.0} tiles/s), {:.1}x",
        reference,
        256.0 / reference,
        ours,
        256.0 / ours,
        reference / ours
    );
}
