//! The RocksDB store: one column family per kind of record (see
//! docs/ARCHITECTURE.md for the key encodings).
//!
//! Every mutation goes through one `WriteBatch`, so a reader never sees raw
//! objects without their indexes and features, and the replication sequence
//! never runs ahead of the data it describes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::element::{Element, Node, Relation, Way};
use crate::error::{Result, StoreError};
use crate::feature::{Feature, FeatureKind, TileConfig};
use crate::tiles::TileId;

/// Bumped whenever an encoding changes; a store of another version is refused.
pub const SCHEMA_VERSION: u32 = 1;

/// Column family names.
pub(crate) mod cf {
    pub const NODES: &str = "nodes";
    pub const WAYS: &str = "ways";
    pub const RELATIONS: &str = "relations";
    pub const NODE_WAYS: &str = "node_ways";
    pub const MEMBER_RELATIONS: &str = "member_relations";
    pub const FEATURES: &str = "features";
    pub const TILE_FEATURES: &str = "tile_features";
    pub const TILES: &str = "tiles";
    pub const DIRTY_TILES: &str = "dirty_tiles";
    pub const META: &str = "meta";
    /// Cache of tag-text vectors (see `embeddings`).
    pub const TAG_VECTORS: &str = "tag_vectors";
    /// Latest embedding of every tile (see `embeddings`).
    pub const TILE_EMBEDDINGS: &str = "tile_embeddings";
    /// Messages still to publish (see `outbox`).
    pub const OUTBOX: &str = "outbox";
    /// Dirty marks in scheduling order: first-dirty sequence (u64 BE) ‖
    /// tile key → empty (see `embeddings`).
    pub const DIRTY_ORDER: &str = "dirty_order";
    /// Fine tile → u64 LE fingerprint of the context graph its embedding
    /// was computed with (see `embeddings`).
    pub const TILE_CONTEXTS: &str = "tile_contexts";
    pub const ALL: &[&str] = &[
        NODES,
        WAYS,
        RELATIONS,
        NODE_WAYS,
        MEMBER_RELATIONS,
        FEATURES,
        TILE_FEATURES,
        TILES,
        DIRTY_TILES,
        META,
        TAG_VECTORS,
        TILE_EMBEDDINGS,
        OUTBOX,
        DIRTY_ORDER,
        TILE_CONTEXTS,
    ];
}

/// Keys of the `meta` column family.
pub(crate) mod meta {
    pub const SCHEMA: &[u8] = b"schema_version";
    pub const TILE_CONFIG: &[u8] = b"tile_config";
    pub const SEQUENCE: &[u8] = b"replication_sequence";
    pub const TIMESTAMP: &[u8] = b"replication_timestamp";
    pub const COUNTS: &[u8] = b"counts";
    pub const IMPORT_IN_PROGRESS: &[u8] = b"import_in_progress";
    /// u64 LE: generation of the last commit that marked tiles dirty.
    pub const DIRTY_GENERATION: &[u8] = b"dirty_generation";
    /// `1` while a publisher drains the outbox.
    pub const OUTBOX_ENABLED: &[u8] = b"outbox_enabled";
    /// u64 LE: the last outbox entry id issued.
    pub const OUTBOX_LAST_ID: &[u8] = b"outbox_last_id";
    /// JSON chosen by the daemon: the model version (and checkpoint) it
    /// last served, to compare a newly loaded version against.
    pub const SERVED_MODEL: &[u8] = b"served_model";
    /// u64 LE: the number of dirty marks (kept in the batches that write
    /// marks, so a cycle never counts them).
    pub const DIRTY_COUNT: &[u8] = b"dirty_count";
    /// `1` once `dirty_order` and `dirty_count` describe every mark (a
    /// store from before them gets them built once when opened).
    pub const DIRTY_INDEX: &[u8] = b"dirty_index";
}

/// Object and feature counts, kept exact in every write batch so that
/// `stats` never has to scan the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub nodes: i64,
    pub ways: i64,
    pub relations: i64,
    pub point: i64,
    pub polyline: i64,
    pub polygon: i64,
    /// Area relations that became polygons / that could not be assembled.
    pub multipolygons_assembled: i64,
    pub multipolygons_failed: i64,
}

impl Counts {
    pub fn add_feature(&mut self, kind: FeatureKind, delta: i64) {
        match kind {
            FeatureKind::Point => self.point += delta,
            FeatureKind::Polyline => self.polyline += delta,
            FeatureKind::Polygon => self.polygon += delta,
        }
    }
}

/// What `osmvec stats` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub nodes: i64,
    pub ways: i64,
    pub relations: i64,
    pub features: FeatureStats,
    /// Fine-zoom tiles holding at least one feature.
    pub tiles: u64,
    pub coarse_tiles: u64,
    pub dirty_tiles: u64,
    pub sequence: Option<u64>,
    /// RFC 3339.
    pub timestamp: Option<String>,
    pub multipolygons: MultipolygonStats,
    pub fine_zoom: u8,
    pub coarse_zoom: u8,
    pub schema_version: u32,
    pub import_interrupted: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FeatureStats {
    pub point: i64,
    pub polyline: i64,
    pub polygon: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MultipolygonStats {
    pub assembled: i64,
    pub failed: i64,
}

pub struct Store {
    db: DB,
    path: PathBuf,
    tiles: TileConfig,
}

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.increase_parallelism(2);
    let mut b = BlockBasedOptions::default();
    b.set_bloom_filter(10.0, false);
    b.set_block_cache(&rocksdb::Cache::new_lru_cache(128 << 20));
    o.set_block_based_table_factory(&b);
    o
}

impl Store {
    /// Opens an existing store.
    pub fn open(path: &Path) -> Result<Store> {
        if !path.join("CURRENT").exists() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        Self::open_inner(path, None, false)
    }

    /// Opens an existing store for reading only, beside a process that has
    /// it open for writing (RocksDB's lock is not taken): the state as of
    /// the open, e.g. for an export while the daemon runs. Writes fail.
    pub fn open_read_only(path: &Path) -> Result<Store> {
        if !path.join("CURRENT").exists() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        Self::open_inner(path, None, true)
    }

    /// Opens a store, creating it with `tiles` if it does not exist. An
    /// existing store keeps its own tile configuration.
    pub fn open_or_create(path: &Path, tiles: TileConfig) -> Result<Store> {
        Self::open_inner(path, Some(tiles), false)
    }

    fn open_inner(path: &Path, create: Option<TileConfig>, read_only: bool) -> Result<Store> {
        let opts = db_options();
        let cfs = cf::ALL
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, db_options()));
        let db = if read_only {
            DB::open_cf_descriptors_read_only(&opts, path, cfs, false)
        } else {
            DB::open_cf_descriptors(&opts, path, cfs)
        }
        .map_err(|e| StoreError::db(path, e))?;
        let mut store = Store {
            db,
            path: path.to_path_buf(),
            tiles: TileConfig::default(),
        };
        match store.get_meta(meta::SCHEMA)? {
            Some(v) => {
                let found = u32::from_le_bytes(
                    v.as_slice()
                        .try_into()
                        .map_err(|_| StoreError::corrupt("schema version"))?,
                );
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
                let cfg = store
                    .get_meta(meta::TILE_CONFIG)?
                    .ok_or_else(|| StoreError::corrupt("tile configuration missing"))?;
                store.tiles = serde_json::from_slice(&cfg)
                    .map_err(|e| StoreError::Corrupt(format!("tile configuration: {e}")))?;
                if !read_only {
                    store.ensure_dirty_index()?;
                }
            }
            None => {
                let Some(cfg) = create else {
                    return Err(StoreError::NotAStore {
                        path: path.to_path_buf(),
                        why: "no schema version".into(),
                    });
                };
                store.tiles = cfg;
                let mut b = WriteBatch::default();
                let m = store.cf(cf::META);
                b.put_cf(m, meta::SCHEMA, SCHEMA_VERSION.to_le_bytes());
                b.put_cf(
                    m,
                    meta::TILE_CONFIG,
                    serde_json::to_vec(&cfg).expect("config serialises"),
                );
                b.put_cf(
                    m,
                    meta::COUNTS,
                    serde_json::to_vec(&Counts::default()).expect("counts serialise"),
                );
                b.put_cf(m, meta::DIRTY_INDEX, b"1");
                store.write(b, true)?;
            }
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tile_config(&self) -> TileConfig {
        self.tiles
    }

    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is opened at start")
    }

    /// A consistent read view as of now (a RocksDB snapshot): a batch of
    /// graphs or an export reads one state of the store while diffs land.
    pub(crate) fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            store: self,
            snap: self.db.snapshot(),
        }
    }

    /// Visits the value of each of `keys` in `cf`, in order (`None`: no such
    /// key); `sorted`: the keys ascend, which RocksDB reads faster.
    pub(crate) fn multi_get<K: AsRef<[u8]>>(
        &self,
        cf: &str,
        keys: &[K],
        sorted: bool,
        f: impl FnMut(usize, Option<&[u8]>) -> Result<()>,
    ) -> Result<()> {
        self.multi_get_opt(cf, keys, sorted, &ReadOptions::default(), f)
    }

    fn multi_get_opt<K: AsRef<[u8]>>(
        &self,
        cf: &str,
        keys: &[K],
        sorted: bool,
        ro: &ReadOptions,
        mut f: impl FnMut(usize, Option<&[u8]>) -> Result<()>,
    ) -> Result<()> {
        let values = self
            .db
            .batched_multi_get_cf_opt(self.cf(cf), keys.iter(), sorted, ro);
        for (i, v) in values.into_iter().enumerate() {
            f(i, v.map_err(|e| self.db_err(e))?.as_deref())?;
        }
        Ok(())
    }

    /// Visits the entries of `cf` from `start` (inclusive; empty: the first)
    /// in key order while `f` returns true.
    pub(crate) fn scan_from(
        &self,
        cf: &str,
        start: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        self.scan_opt(cf, start, ReadOptions::default(), f)
    }

    fn scan_opt(
        &self,
        cf: &str,
        start: &[u8],
        ro: ReadOptions,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let mut it = self.db.raw_iterator_cf_opt(self.cf(cf), ro);
        it.seek(start);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !f(k, v)? {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(|e| self.db_err(e))
    }

    /// RocksDB's estimate of the number of keys in `cf` (exact after a
    /// compaction, close otherwise).
    pub(crate) fn estimate_keys(&self, cf: &str) -> Result<u64> {
        Ok(self
            .db
            .property_int_value_cf(self.cf(cf), "rocksdb.estimate-num-keys")
            .map_err(|e| self.db_err(e))?
            .unwrap_or(0))
    }

    pub(crate) fn db_err(&self, e: rocksdb::Error) -> StoreError {
        StoreError::db(&self.path, e)
    }

    /// Writes a batch; `sync` makes it durable against power loss, not just
    /// against a crash of this process.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(|e| self.db_err(e))
    }

    pub(crate) fn get_cf(&self, name: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db
            .get_cf(self.cf(name), key)
            .map_err(|e| self.db_err(e))
    }

    /// Reserves `n` values of the u64 counter at `key` in `meta` (its stored
    /// value is the last one issued, 0 when absent) by writing the new last
    /// value into `b`; returns the first reserved value. Callers are the one
    /// writer thread, so read-then-write needs no lock.
    pub(crate) fn reserve_counter(&self, b: &mut WriteBatch, key: &[u8], n: u64) -> Result<u64> {
        let last = match self.get_meta(key)? {
            Some(v) => u64::from_le_bytes(v.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt(format!("meta counter {}", String::from_utf8_lossy(key)))
            })?),
            None => 0,
        };
        b.put_cf(self.cf(cf::META), key, (last + n).to_le_bytes());
        Ok(last + 1)
    }

    pub fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get_cf(cf::META, key)
    }

    pub fn counts(&self) -> Result<Counts> {
        match self.get_meta(meta::COUNTS)? {
            Some(v) => {
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(format!("counts: {e}")))
            }
            None => Ok(Counts::default()),
        }
    }

    pub(crate) fn put_counts(&self, b: &mut WriteBatch, c: &Counts) {
        b.put_cf(
            self.cf(cf::META),
            meta::COUNTS,
            serde_json::to_vec(c).expect("counts serialise"),
        );
    }

    /// The last applied replication state: sequence (if known) and timestamp.
    pub fn replication_state(&self) -> Result<(Option<u64>, Option<i64>)> {
        let seq = self
            .get_meta(meta::SEQUENCE)?
            .map(|v| v.as_slice().try_into().map(u64::from_le_bytes))
            .transpose()
            .map_err(|_| StoreError::corrupt("sequence"))?;
        let ts = self
            .get_meta(meta::TIMESTAMP)?
            .map(|v| v.as_slice().try_into().map(i64::from_le_bytes))
            .transpose()
            .map_err(|_| StoreError::corrupt("timestamp"))?;
        Ok((seq, ts))
    }

    pub(crate) fn put_replication_state(
        &self,
        b: &mut WriteBatch,
        seq: Option<u64>,
        ts: Option<i64>,
    ) {
        let m = self.cf(cf::META);
        match seq {
            Some(s) => b.put_cf(m, meta::SEQUENCE, s.to_le_bytes()),
            None => b.delete_cf(m, meta::SEQUENCE),
        }
        if let Some(t) = ts {
            b.put_cf(m, meta::TIMESTAMP, t.to_le_bytes());
        }
    }

    /// Whether an import was started and did not finish.
    pub fn import_interrupted(&self) -> Result<Option<String>> {
        Ok(self
            .get_meta(meta::IMPORT_IN_PROGRESS)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Refuses to work on a store whose import did not finish.
    pub fn ensure_consistent(&self) -> Result<()> {
        match self.import_interrupted()? {
            Some(what) => Err(StoreError::ImportInterrupted(what)),
            None => Ok(()),
        }
    }

    pub fn get_node(&self, id: i64) -> Result<Option<Node>> {
        self.get_cf(cf::NODES, &codec::id_key(id))?
            .map(|v| codec::decode_node(id, &v))
            .transpose()
    }

    pub fn get_way(&self, id: i64) -> Result<Option<Way>> {
        self.get_cf(cf::WAYS, &codec::id_key(id))?
            .map(|v| codec::decode_way(id, &v))
            .transpose()
    }

    pub fn get_relation(&self, id: i64) -> Result<Option<Relation>> {
        self.get_cf(cf::RELATIONS, &codec::id_key(id))?
            .map(|v| codec::decode_relation(id, &v))
            .transpose()
    }

    pub fn get_feature(&self, t: crate::element::ElementType, id: i64) -> Result<Option<Feature>> {
        self.get_cf(cf::FEATURES, &codec::typed_key(t, id))?
            .map(|v| Feature::decode(&v))
            .transpose()
    }

    /// Ids found under a key prefix in an index column family, where the id
    /// is the last 8 bytes of the key (node→ways, member→relations).
    pub(crate) fn index_ids(&self, cf_name: &str, prefix: &[u8]) -> Result<Vec<i64>> {
        self.index_ids_many(cf_name, &[prefix.to_vec()])
    }

    /// Like `index_ids` for many sorted prefixes, with one iterator that
    /// seeks forward: far cheaper than an iterator per prefix.
    pub(crate) fn index_ids_many(&self, cf_name: &str, prefixes: &[Vec<u8>]) -> Result<Vec<i64>> {
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.cf(cf_name));
        for p in prefixes {
            it.seek(p);
            while let Some(k) = it.key() {
                if !k.starts_with(p) {
                    break;
                }
                out.push(codec::id_from_key(&k[k.len() - 8..])?);
                it.next();
            }
            it.status().map_err(|e| self.db_err(e))?;
        }
        Ok(out)
    }

    /// Ways that use a node.
    pub fn ways_of_node(&self, node: i64) -> Result<Vec<i64>> {
        self.index_ids(cf::NODE_WAYS, &codec::id_key(node))
    }

    /// Relations that have an object as member.
    pub fn relations_of(&self, t: crate::element::ElementType, id: i64) -> Result<Vec<i64>> {
        self.index_ids(cf::MEMBER_RELATIONS, &codec::typed_key(t, id))
    }

    /// Features (type, id) indexed in a tile.
    pub fn features_in_tile(
        &self,
        tile: TileId,
    ) -> Result<Vec<(crate::element::ElementType, i64)>> {
        let prefix = tile.to_key();
        let mut ro = ReadOptions::default();
        let mut upper = prefix.to_vec();
        increment(&mut upper);
        ro.set_iterate_upper_bound(upper);
        let it = self.db.iterator_cf_opt(
            self.cf(cf::TILE_FEATURES),
            ro,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        let mut out = Vec::new();
        for kv in it {
            let (k, _) = kv.map_err(|e| self.db_err(e))?;
            out.push(codec::typed_from_key(&k[9..])?);
        }
        Ok(out)
    }

    /// Dirty tiles with the sequence at which each became dirty, in key order.
    pub fn dirty_tiles(&self) -> Result<Vec<(TileId, u64)>> {
        Ok(self
            .dirty_marks()?
            .into_iter()
            .map(|(t, m)| (t, m.since_sequence))
            .collect())
    }

    /// Tiles holding features, with their feature count.
    pub fn tiles(&self) -> Result<BTreeMap<TileId, u64>> {
        let mut out = BTreeMap::new();
        for kv in self.db.iterator_cf(self.cf(cf::TILES), IteratorMode::Start) {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            let t = TileId::from_key(&k).ok_or_else(|| StoreError::corrupt("tile key"))?;
            out.insert(t, codec::Reader::new(&v).uvarint()?);
        }
        Ok(out)
    }

    pub(crate) fn count_keys(&self, name: &str) -> Result<u64> {
        let mut n = 0;
        let mut it = self.db.raw_iterator_cf(self.cf(name));
        it.seek_to_first();
        while it.valid() {
            n += 1;
            it.next();
        }
        it.status().map_err(|e| self.db_err(e))?;
        Ok(n)
    }

    /// Writes every column family's memtable to table files (and lets
    /// RocksDB drop the log that held them).
    pub fn flush(&self) -> Result<()> {
        let cfs: Vec<&ColumnFamily> = cf::ALL.iter().map(|n| self.cf(n)).collect();
        self.db
            .flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())
            .map_err(|e| self.db_err(e))
    }

    /// Writes a consistent copy of the store, as of now, to `to` (which must
    /// not exist), while it stays open: RocksDB's checkpoint, hard links
    /// where `to` is on the same file system, copies otherwise. A backup of
    /// a running store, and a cheap fresh store per case in tests.
    pub fn checkpoint(&self, to: &Path) -> Result<()> {
        rocksdb::checkpoint::Checkpoint::new(&self.db)
            .and_then(|c| c.create_checkpoint(to))
            .map_err(|e| self.db_err(e))
    }

    /// A fingerprint of every key and value in every column family: equal
    /// fingerprints mean equal stores. The fault tests use it to show that
    /// a refused diff, a full disk or a crash wrote nothing (a whole scan:
    /// for tests and checks, not for a serving path).
    pub fn digest(&self) -> Result<u64> {
        use std::hash::Hasher;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for name in cf::ALL {
            h.write(name.as_bytes());
            let mut it = self.db.raw_iterator_cf(self.cf(name));
            it.seek_to_first();
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                h.write_usize(k.len());
                h.write(k);
                h.write_usize(v.len());
                h.write(v);
                it.next();
            }
            it.status().map_err(|e| self.db_err(e))?;
        }
        Ok(h.finish())
    }

    pub fn stats(&self) -> Result<Stats> {
        let c = self.counts()?;
        let (seq, ts) = self.replication_state()?;
        let tiles = self.tiles()?;
        let fine = tiles.keys().filter(|t| t.z == self.tiles.fine_zoom).count() as u64;
        Ok(Stats {
            nodes: c.nodes,
            ways: c.ways,
            relations: c.relations,
            features: FeatureStats {
                point: c.point,
                polyline: c.polyline,
                polygon: c.polygon,
            },
            tiles: fine,
            coarse_tiles: tiles.len() as u64 - fine,
            dirty_tiles: self.dirty_count()?,
            sequence: seq,
            timestamp: ts.map(format_timestamp),
            multipolygons: MultipolygonStats {
                assembled: c.multipolygons_assembled,
                failed: c.multipolygons_failed,
            },
            fine_zoom: self.tiles.fine_zoom,
            coarse_zoom: self.tiles.coarse_zoom,
            schema_version: SCHEMA_VERSION,
            import_interrupted: self.import_interrupted()?.is_some(),
        })
    }

    /// Counts objects by scanning, to check the kept counters.
    pub fn recount(&self) -> Result<(u64, u64, u64)> {
        Ok((
            self.count_keys(cf::NODES)?,
            self.count_keys(cf::WAYS)?,
            self.count_keys(cf::RELATIONS)?,
        ))
    }

    /// Writes every object as OPL (nodes, ways, relations; ascending id),
    /// the same lines as `osmium cat -f opl,add_metadata=version`.
    pub fn export_opl<W: Write>(&self, out: &mut W) -> Result<u64> {
        let io = |e: std::io::Error| StoreError::Io {
            context: "writing OPL".into(),
            source: e,
        };
        let mut n = 0u64;
        for name in [cf::NODES, cf::WAYS, cf::RELATIONS] {
            for kv in self.db.iterator_cf(self.cf(name), IteratorMode::Start) {
                let (k, v) = kv.map_err(|e| self.db_err(e))?;
                let id = codec::id_from_key(&k)?;
                let el = match name {
                    cf::NODES => Element::Node(codec::decode_node(id, &v)?),
                    cf::WAYS => Element::Way(codec::decode_way(id, &v)?),
                    _ => Element::Relation(codec::decode_relation(id, &v)?),
                };
                crate::opl::write_element(out, &el).map_err(io)?;
                n += 1;
            }
        }
        out.flush().map_err(io)?;
        Ok(n)
    }

    /// Iterates a whole column family (key, value); for the import's feature
    /// pass and for tests.
    pub(crate) fn scan(&self, name: &str) -> impl Iterator<Item = Result<KeyValue>> + '_ {
        self.db
            .iterator_cf(self.cf(name), IteratorMode::Start)
            .map(|kv| kv.map_err(|e| self.db_err(e)))
    }
}

/// The store as of one moment ([`Store::snapshot`]).
pub(crate) struct Snapshot<'a> {
    store: &'a Store,
    snap: rocksdb::Snapshot<'a>,
}

impl Snapshot<'_> {
    fn read_options(&self) -> ReadOptions {
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&self.snap);
        ro
    }

    /// [`Store::multi_get`] as of the snapshot.
    pub(crate) fn multi_get<K: AsRef<[u8]>>(
        &self,
        cf: &str,
        keys: &[K],
        sorted: bool,
        f: impl FnMut(usize, Option<&[u8]>) -> Result<()>,
    ) -> Result<()> {
        self.store
            .multi_get_opt(cf, keys, sorted, &self.read_options(), f)
    }

    /// [`Store::scan_from`] as of the snapshot.
    pub(crate) fn scan_from(
        &self,
        cf: &str,
        start: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        self.store.scan_opt(cf, start, self.read_options(), f)
    }

    pub(crate) fn store(&self) -> &Store {
        self.store
    }
}

/// A raw key and value read from a column family.
pub type KeyValue = (Box<[u8]>, Box<[u8]>);

/// Increments a byte string as a big-endian number: the exclusive upper
/// bound of a prefix scan.
fn increment(k: &mut Vec<u8>) {
    while let Some(last) = k.last_mut() {
        if *last == 0xff {
            k.pop();
        } else {
            *last += 1;
            return;
        }
    }
}

pub fn format_timestamp(ts: i64) -> String {
    chrono::DateTime::from_timestamp(ts, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ts.to_string())
}
