//! `osmvec bench-cycle`: what one daemon embedding cycle costs as the
//! backlog grows (issue: a backlog must cost each cycle what the cycle
//! does). Filler marks on tiles without features, newer than every real
//! mark, make the backlog as large as asked; each cycle then takes the
//! oldest `per_cycle` real marks (`tiles_to_embed`) and embeds them
//! (`embed_pipelined`), as `osmvec run` does. Beside it, the scan the loop
//! used to make every cycle (read and sort every mark) is timed on the same
//! store. Run it on a copy: it writes marks and embeddings.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use osmvec_graphstore::Store;
use osmvec_graphstore::tiles::TileId;
use osmvec_model::Device;
use serde::Serialize;

use osmvec_pipeline::checkpoint::Model;
use osmvec_pipeline::embed::{EmbedReport, embed_pipelined, tiles_to_embed};
use osmvec_pipeline::inputs::Inputs;
use osmvec_pipeline::tags::TagVectors;

#[derive(Debug, Clone)]
pub struct CycleBenchArgs {
    pub store: PathBuf,
    pub checkpoint: PathBuf,
    /// Filler marks added before the cycles.
    pub filler: u64,
    /// Mark every tile with features dirty first (as an import does).
    pub mark_all: bool,
    pub cycles: usize,
    pub per_cycle: usize,
    pub batch_size: usize,
    pub model_dir: PathBuf,
    pub device: Device,
}

#[derive(Debug, Clone, Serialize)]
pub struct CycleBenchReport {
    pub marks: u64,
    pub filler: u64,
    pub cycles: usize,
    pub tiles_per_cycle: Vec<usize>,
    pub cycle_seconds: Vec<f64>,
    /// Seconds to read the oldest marks of one cycle.
    pub take_seconds: Vec<f64>,
    pub median_cycle_seconds: f64,
    /// Reading and sorting every mark once: what each cycle cost before.
    pub full_scan_seconds: f64,
}

pub fn bench_cycle(a: &CycleBenchArgs) -> Result<CycleBenchReport> {
    let store = Store::open(&a.store)?;
    let model = Model::load(&a.checkpoint, &a.device)?;
    let fine = store.tile_config().fine_zoom;
    if a.mark_all {
        let tiles: Vec<TileId> = store.tiles()?.into_keys().collect();
        store.mark_tiles_dirty(&tiles, 0)?;
    }
    // Filler: a band of fine tiles at the top of the map (no features there),
    // marked at a sequence newer than any real mark.
    let side = 1u32 << fine;
    let filler: Vec<TileId> = (0..a.filler)
        .map(|i| TileId {
            z: fine,
            x: (i % side as u64) as u32,
            y: (i / side as u64) as u32,
        })
        .collect();
    store.mark_tiles_dirty(&filler, u64::MAX / 2)?;
    drop(filler);
    let marks = store.dirty_count()?;
    let t = Instant::now();
    let mut all = store.dirty_marks()?;
    all.sort_by_key(|(t, m)| (m.since_sequence, *t));
    let full_scan_seconds = t.elapsed().as_secs_f64();
    drop(all);

    let mut inputs = Inputs::new(
        TagVectors::new(a.model_dir.clone(), a.device.clone()),
        false,
    );
    let mut report = CycleBenchReport {
        marks,
        filler: a.filler,
        cycles: a.cycles,
        tiles_per_cycle: Vec::new(),
        cycle_seconds: Vec::new(),
        take_seconds: Vec::new(),
        median_cycle_seconds: 0.0,
        full_scan_seconds,
    };
    for _ in 0..a.cycles {
        let t0 = Instant::now();
        let (work, seen, _) = tiles_to_embed(&store, &model, &mut inputs, a.per_cycle, true)?;
        report.take_seconds.push(t0.elapsed().as_secs_f64());
        let by_tile: HashMap<TileId, _> = seen.into_iter().collect();
        let mut er = EmbedReport::default();
        embed_pipelined(
            &store,
            &model,
            &mut inputs,
            &work,
            a.batch_size,
            &by_tile,
            None,
            &mut er,
        )?;
        inputs.clear();
        report.cycle_seconds.push(t0.elapsed().as_secs_f64());
        report.tiles_per_cycle.push(work.len());
    }
    let mut s = report.cycle_seconds.clone();
    s.sort_by(f64::total_cmp);
    report.median_cycle_seconds = s.get(s.len() / 2).copied().unwrap_or(0.0);
    Ok(report)
}

/// How two stores' tile embeddings differ (`osmvec compare-embeddings`):
/// the same tiles, and the largest difference of any vector component.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingComparison {
    pub tiles_a: usize,
    pub tiles_b: usize,
    pub compared: usize,
    pub only_in_a: usize,
    pub only_in_b: usize,
    pub max_abs_difference: f64,
    pub max_cosine_distance: f64,
}

pub fn compare_embeddings(a: &std::path::Path, b: &std::path::Path) -> Result<EmbeddingComparison> {
    let ea: HashMap<TileId, Vec<f32>> = Store::open(a)?
        .tile_embeddings()?
        .into_iter()
        .map(|(t, e)| (t, e.vector))
        .collect();
    let eb: HashMap<TileId, Vec<f32>> = Store::open(b)?
        .tile_embeddings()?
        .into_iter()
        .map(|(t, e)| (t, e.vector))
        .collect();
    let mut out = EmbeddingComparison {
        tiles_a: ea.len(),
        tiles_b: eb.len(),
        compared: 0,
        only_in_a: 0,
        only_in_b: eb.keys().filter(|t| !ea.contains_key(t)).count(),
        max_abs_difference: 0.0,
        max_cosine_distance: 0.0,
    };
    for (t, va) in &ea {
        let Some(vb) = eb.get(t) else {
            out.only_in_a += 1;
            continue;
        };
        out.compared += 1;
        let d = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max);
        out.max_abs_difference = out.max_abs_difference.max(d);
        let c = osmvec_pipeline::embed::cosine_distance(va, vb) as f64;
        out.max_cosine_distance = out.max_cosine_distance.max(c);
    }
    Ok(out)
}
