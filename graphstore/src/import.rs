//! Bootstrap import of extracts (`osmvec import`).
//!
//! Two phases: raw objects and reverse indexes are written as the files are
//! decoded, then every feature, the tile index and the dirty marks are
//! derived from the stored objects. An import marker in `meta` is set before
//! the first write and cleared in the last batch, so an interrupted import is
//! detected instead of being mistaken for a consistent store.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use rocksdb::WriteBatch;
use serde::Serialize;

use crate::codec::{self, pair_key, put_uvarint};
use crate::derive::{derive_node, derive_relation, derive_way};
use crate::element::{Element, ElementType, FileHeader};
use crate::error::{Result, StoreError};
use crate::feature::{Feature, RelationFeature, TileConfig};
use crate::read::{self, ReadError};
use crate::store::{Counts, KeyValue, Store, cf, meta};
use crate::tiles::TileId;

/// Progress reports for a progress bar.
#[derive(Debug, Clone)]
pub enum ImportProgress<'a> {
    /// Objects read so far from `file`.
    Reading { file: &'a Path, objects: u64 },
    /// Features derived so far, out of roughly `total` objects.
    Deriving { done: u64, total: u64 },
}

#[derive(Debug, Clone, Serialize)]
pub struct FileSummary {
    pub path: PathBuf,
    pub nodes: u64,
    pub ways: u64,
    pub relations: u64,
    pub replication_timestamp: Option<String>,
    pub replication_sequence: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportSummary {
    pub files: Vec<FileSummary>,
    /// Objects written (new or replacing a lower version).
    pub written: u64,
    /// Objects skipped because the store had a higher version.
    pub kept_newer: u64,
    pub counts: Counts,
    pub fine_tiles: u64,
    pub coarse_tiles: u64,
    /// Features too large to index at some zoom (see `max_tiles_per_feature`).
    pub oversize_features: u64,
    pub seconds: f64,
}

/// Imports `files` into the store at `path`, creating it with `tiles` if it
/// does not exist. On an input error a store that existed is left as it was
/// (every file is validated before the first write), and a store created by
/// this call is removed.
pub fn import(
    path: &Path,
    files: &[PathBuf],
    tiles: TileConfig,
    progress: &(dyn Fn(ImportProgress) + Sync),
) -> Result<ImportSummary> {
    let start = Instant::now();
    for f in files {
        if !f.is_file() {
            return Err(StoreError::Read(ReadError::Io {
                file: f.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            }));
        }
    }
    let existed = path.join("CURRENT").exists();
    if existed {
        // Validate first: a bad file must not leave half its objects behind.
        let store = Store::open(path)?;
        drop(store);
        for f in files {
            let mut n = 0u64;
            read::read_extract(f, &mut |batch: Vec<Element>| {
                n += batch.len() as u64;
                progress(ImportProgress::Reading {
                    file: f,
                    objects: n,
                });
                Ok(())
            })?;
        }
    }
    let result = (|| {
        let store = Store::open_or_create(path, tiles)?;
        run(&store, files, existed, progress)
    })();
    if result.is_err() && !existed {
        let _ = std::fs::remove_dir_all(path);
    }
    let mut summary = result?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Reads one file into the store (raw objects and reverse indexes), batch
/// by batch; counts what it read. Returns the file's summary and header,
/// and adds to `written` / `kept_newer`.
fn read_file(
    store: &Store,
    f: &PathBuf,
    check_existing: bool,
    counts: &mut Counts,
    (written, kept_newer): (&mut u64, &mut u64),
    progress: &(dyn Fn(ImportProgress) + Sync),
) -> Result<(FileSummary, FileHeader)> {
    let mut fs = FileSummary {
        path: f.clone(),
        nodes: 0,
        ways: 0,
        relations: 0,
        replication_timestamp: None,
        replication_sequence: None,
    };
    let mut store_err: Option<StoreError> = None;
    let mut seen = 0u64;
    let header = read::read_extract(f, &mut |batch: Vec<Element>| {
        seen += batch.len() as u64;
        for e in &batch {
            match e {
                Element::Node(_) => fs.nodes += 1,
                Element::Way(_) => fs.ways += 1,
                Element::Relation(_) => fs.relations += 1,
            }
        }
        match write_raw(store, &batch, check_existing, counts) {
            Ok((w, k)) => {
                *written += w;
                *kept_newer += k;
            }
            Err(e) => {
                let msg = e.to_string();
                store_err = Some(e);
                return Err(ReadError::consumer(msg));
            }
        }
        progress(ImportProgress::Reading {
            file: f,
            objects: seen,
        });
        Ok(())
    });
    let header = match (header, store_err) {
        (_, Some(e)) => return Err(e),
        (Err(e), None) => return Err(e.into()),
        (Ok(h), None) => h,
    };
    fs.replication_timestamp = header
        .replication_timestamp
        .map(crate::store::format_timestamp);
    fs.replication_sequence = header.replication_sequence;
    Ok((fs, header))
}

/// The replication state after an import: the oldest header timestamp is
/// the safe start (a change applied twice is a no-op; a change missed is
/// lost). A sequence number is only meaningful if every file agrees on it.
fn imported_state(
    store: &Store,
    headers: &[FileHeader],
    existed: bool,
) -> Result<(Option<u64>, Option<i64>)> {
    let (old_seq, old_ts) = store.replication_state()?;
    let ts = headers
        .iter()
        .filter_map(|h| h.replication_timestamp)
        .chain(old_ts)
        .min();
    let seqs: HashSet<Option<u64>> = headers.iter().map(|h| h.replication_sequence).collect();
    let seq = if seqs.len() == 1
        && (!existed || old_seq.is_none() || old_seq == headers[0].replication_sequence)
    {
        headers[0].replication_sequence
    } else {
        None
    };
    Ok((seq, ts))
}

fn run(
    store: &Store,
    files: &[PathBuf],
    existed: bool,
    progress: &(dyn Fn(ImportProgress) + Sync),
) -> Result<ImportSummary> {
    let mut b = WriteBatch::default();
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    b.put_cf(
        store.cf(cf::META),
        meta::IMPORT_IN_PROGRESS,
        names.join(", ").as_bytes(),
    );
    store.write(b, true)?;

    let mut counts = store.counts()?;
    let (mut written, mut kept_newer) = (0u64, 0u64);
    let mut summaries = Vec::new();
    let mut headers: Vec<FileHeader> = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let (fs, header) = read_file(
            store,
            f,
            existed || i > 0,
            &mut counts,
            (&mut written, &mut kept_newer),
            progress,
        )?;
        headers.push(header);
        summaries.push(fs);
    }

    let derived = derive_all(store, &mut counts, progress)?;
    let (seq, ts) = imported_state(store, &headers, existed)?;
    let mut b = WriteBatch::default();
    store.put_counts(&mut b, &counts);
    store.put_replication_state(&mut b, seq, ts);
    b.delete_cf(store.cf(cf::META), meta::IMPORT_IN_PROGRESS);
    store.write(b, true)?;
    // The imported data into table files now, not at the next open: that
    // open would otherwise rewrite the whole import from the log (on a
    // nearly full disk it fails there), and the log would hold it twice.
    store.flush()?;
    let fine = store.tile_config().fine_zoom;
    Ok(ImportSummary {
        files: summaries,
        written,
        kept_newer,
        counts,
        fine_tiles: derived.tiles.keys().filter(|t| t.z == fine).count() as u64,
        coarse_tiles: derived.tiles.keys().filter(|t| t.z != fine).count() as u64,
        oversize_features: derived.oversize,
        seconds: 0.0,
    })
}

/// Writes one batch of raw objects with their reverse-index entries. When
/// the store may already hold an object, the higher version wins and the
/// replaced object's index entries are removed.
fn write_raw(
    store: &Store,
    batch: &[Element],
    check_existing: bool,
    counts: &mut Counts,
) -> Result<(u64, u64)> {
    let mut b = WriteBatch::default();
    let (nodes_cf, ways_cf, rels_cf) = (
        store.cf(cf::NODES),
        store.cf(cf::WAYS),
        store.cf(cf::RELATIONS),
    );
    let (nw_cf, mr_cf) = (store.cf(cf::NODE_WAYS), store.cf(cf::MEMBER_RELATIONS));
    let mut existing: Vec<Option<Vec<u8>>> = vec![None; batch.len()];
    if check_existing {
        // One multi-get per column family; results back at their element.
        for name in [cf::NODES, cf::WAYS, cf::RELATIONS] {
            let (at, keys): (Vec<usize>, Vec<[u8; 8]>) = batch
                .iter()
                .enumerate()
                .filter(|(_, e)| {
                    name == match e {
                        Element::Node(_) => cf::NODES,
                        Element::Way(_) => cf::WAYS,
                        Element::Relation(_) => cf::RELATIONS,
                    }
                })
                .map(|(i, e)| (i, codec::id_key(e.id())))
                .unzip();
            store.multi_get(name, &keys, false, |i, v| {
                existing[at[i]] = v.map(<[u8]>::to_vec);
                Ok(())
            })?;
        }
    }
    let (mut written, mut kept) = (0u64, 0u64);
    for (e, old) in batch.iter().zip(existing) {
        let id = e.id();
        let key = codec::id_key(id);
        if let Some(old) = &old {
            let mut r = codec::Reader::new(old);
            let old_version = r.uvarint()? as u32;
            if old_version > e.meta().version {
                kept += 1;
                continue;
            }
        }
        written += 1;
        let is_new = old.is_none() as i64;
        match e {
            Element::Node(n) => {
                counts.nodes += is_new;
                b.put_cf(nodes_cf, key, codec::encode_node(n));
            }
            Element::Way(w) => {
                counts.ways += is_new;
                if let Some(old) = &old {
                    let ow = codec::decode_way(id, old)?;
                    let new: HashSet<i64> = w.refs.iter().copied().collect();
                    for r in ow.refs.iter().filter(|r| !new.contains(r)) {
                        b.delete_cf(nw_cf, pair_key(&codec::id_key(*r), &key));
                    }
                }
                for r in &w.refs {
                    b.put_cf(nw_cf, pair_key(&codec::id_key(*r), &key), []);
                }
                b.put_cf(ways_cf, key, codec::encode_way(w));
            }
            Element::Relation(rel) => {
                counts.relations += is_new;
                if let Some(old) = &old {
                    let or = codec::decode_relation(id, old)?;
                    let new: HashSet<(ElementType, i64)> =
                        rel.members.iter().map(|m| (m.kind, m.id)).collect();
                    for m in or.members.iter().filter(|m| !new.contains(&(m.kind, m.id))) {
                        b.delete_cf(mr_cf, pair_key(&codec::typed_key(m.kind, m.id), &key));
                    }
                }
                for m in &rel.members {
                    b.put_cf(mr_cf, pair_key(&codec::typed_key(m.kind, m.id), &key), []);
                }
                b.put_cf(rels_cf, key, codec::encode_relation(rel));
            }
        }
    }
    store.write(b, false)?;
    Ok((written, kept))
}

/// A derived feature, and for area relations whether assembly succeeded.
type Derivation = (i64, Option<Feature>, Option<bool>);

struct Derived {
    tiles: BTreeMap<TileId, u64>,
    oversize: u64,
}

/// Rebuilds every feature, the tile index and the tile counts from the raw
/// objects, and marks every tile dirty.
/// Where derived features go: the batch (feature and tile index), the
/// per-tile counts, the features indexed at no zoom.
struct Sink<'a> {
    store: &'a Store,
    tiles: BTreeMap<TileId, u64>,
    oversize: u64,
}

impl Sink<'_> {
    fn emit(
        &mut self,
        b: &mut WriteBatch,
        t: ElementType,
        id: i64,
        f: &Feature,
        counts: &mut Counts,
    ) {
        let fk = codec::typed_key(t, id);
        counts.add_feature(f.kind, 1);
        if f.fine_tiles.is_empty() || f.coarse_tiles.is_empty() {
            self.oversize += 1;
        }
        for tile in f.all_tiles() {
            b.put_cf(
                self.store.cf(cf::TILE_FEATURES),
                pair_key(&tile.to_key(), &fk),
                [],
            );
            *self.tiles.entry(tile).or_default() += 1;
        }
        b.put_cf(self.store.cf(cf::FEATURES), fk, f.encode());
    }
}

/// The feature of one stored way or relation (and, for a relation, whether
/// its multipolygon was assembled).
fn derive_stored(
    store: &Store,
    cfg: &TileConfig,
    t: ElementType,
    k: &[u8],
    v: &[u8],
) -> Result<Derivation> {
    let id = codec::id_from_key(k)?;
    if t == ElementType::Way {
        let w = codec::decode_way(id, v)?;
        return Ok((id, derive_way(&w, store, cfg)?, None));
    }
    let r = codec::decode_relation(id, v)?;
    Ok(match derive_relation(&r, store, cfg)? {
        RelationFeature::None => (id, None, None),
        RelationFeature::Assembled(f) => (id, Some(f), Some(true)),
        RelationFeature::Failed(why) => {
            tracing::debug!(relation = id, %why, "multipolygon not assembled");
            (id, None, Some(false))
        }
    })
}

fn derive_all(
    store: &Store,
    counts: &mut Counts,
    progress: &(dyn Fn(ImportProgress) + Sync),
) -> Result<Derived> {
    let cfg = store.tile_config();
    let mut b = WriteBatch::default();
    for name in [cf::FEATURES, cf::TILE_FEATURES, cf::TILES] {
        b.delete_range_cf(store.cf(name), [0u8].as_slice(), [0xffu8; 24].as_slice());
    }
    store.write(b, false)?;
    counts.point = 0;
    counts.polyline = 0;
    counts.polygon = 0;
    counts.multipolygons_assembled = 0;
    counts.multipolygons_failed = 0;

    let total = (counts.nodes + counts.ways + counts.relations) as u64;
    let done = AtomicU64::new(0);
    let mut sink = Sink {
        store,
        tiles: BTreeMap::new(),
        oversize: 0,
    };

    // Nodes: point features need nothing but the node itself.
    let mut b = WriteBatch::default();
    for kv in store.scan(cf::NODES) {
        let (k, v) = kv?;
        let id = codec::id_from_key(&k)?;
        let n = codec::decode_node(id, &v)?;
        if let Some(f) = derive_node(&n, &cfg) {
            sink.emit(&mut b, ElementType::Node, id, &f, counts);
        }
        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
        if d.is_multiple_of(65536) {
            progress(ImportProgress::Deriving { done: d, total });
            store.write(std::mem::take(&mut b), false)?;
        }
    }
    store.write(std::mem::take(&mut b), false)?;

    // Ways and relations: resolve geometry in parallel, chunk by chunk.
    const CHUNK: usize = 8192;
    for (name, t) in [
        (cf::WAYS, ElementType::Way),
        (cf::RELATIONS, ElementType::Relation),
    ] {
        let mut it = store.scan(name).peekable();
        while it.peek().is_some() {
            let chunk: Vec<KeyValue> = it.by_ref().take(CHUNK).collect::<Result<_>>()?;
            let results: Vec<Result<Derivation>> = chunk
                .par_iter()
                .map(|(k, v)| derive_stored(store, &cfg, t, k, v))
                .collect();
            let mut b = WriteBatch::default();
            for r in results {
                let (id, f, assembled) = r?;
                match assembled {
                    Some(true) => counts.multipolygons_assembled += 1,
                    Some(false) => counts.multipolygons_failed += 1,
                    None => {}
                }
                if let Some(f) = f {
                    sink.emit(&mut b, t, id, &f, counts);
                }
            }
            store.write(b, false)?;
            let d = done.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
            progress(ImportProgress::Deriving { done: d, total });
        }
    }
    if counts.multipolygons_failed > 0 {
        tracing::warn!(
            assembled = counts.multipolygons_assembled,
            failed = counts.multipolygons_failed,
            "some area relations could not be assembled into polygons (open rings or members outside the extract)"
        );
    }
    let Sink {
        tiles, oversize, ..
    } = sink;
    write_tile_counts(store, &tiles)?;
    Ok(Derived { tiles, oversize })
}

/// Tile counts, and every tile dirty: a fresh import needs embedding.
fn write_tile_counts(store: &Store, tiles: &BTreeMap<TileId, u64>) -> Result<()> {
    let (seq, _) = store.replication_state()?;
    let mut b = WriteBatch::default();
    let generation = store.next_dirty_generation(&mut b)?;
    for (tile, n) in tiles {
        let mut v = Vec::new();
        put_uvarint(&mut v, *n);
        b.put_cf(store.cf(cf::TILES), tile.to_key(), v);
    }
    let all: Vec<TileId> = tiles.keys().copied().collect();
    store.mark_tiles(&mut b, &all, seq.unwrap_or(0), generation)?;
    store.write(b, false)
}
