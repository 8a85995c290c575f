//! Tile embeddings as (Geo)Parquet rows, written with the Apache Arrow
//! project's `parquet` crate in row groups of [`ROW_GROUP`] tiles.
//!
//! Columns (docs/export.md): `tile` (`z/x/y`), `quadkey`, `z`, `x`, `y`,
//! `model_version`, `sequence`, `computed_at` (UTC, milliseconds), `drift`,
//! `embedding` (fixed-size list of `dim` float32), and for GeoParquet a
//! `bbox` covering struct and `geometry` (the tile's polygon as WKB,
//! longitude/latitude), described by GeoParquet 1.1 `geo` metadata that is
//! written last, once the extent of the rows is known.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow_array::{
    ArrayRef, BinaryArray, FixedSizeListArray, Float32Array, Float64Array, Int64Array, RecordBatch,
    StringArray, StructArray, TimestampMillisecondArray, UInt8Array, UInt32Array,
};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use osmvec_graphstore::embeddings::{EmbeddingView, TileEmbedding};
use osmvec_graphstore::tiles::TileId;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde_json::json;

/// Tiles per row group: about 1 MB of vectors at dim 256 (readers fetch
/// and filter by row group, so a bbox query over a big file reads little).
pub const ROW_GROUP: usize = 1024;

/// WGS 84 longitude/latitude (OGC:CRS84) as PROJJSON: EPSG:4326's datum in
/// the axis order WKB coordinates use (GeoParquet's default, written out so
/// that readers need not assume it).
pub const CRS84_PROJJSON: &str = include_str!("crs84.json");

/// Provenance written into the file's `osmvec` metadata key.
#[derive(Debug, Clone, Copy)]
pub struct ExportMeta {
    /// Replication sequence of the store when the export started.
    pub store_sequence: u64,
    /// The store's fine zoom (every row's `z`).
    pub zoom: u8,
    /// The requested region, if any.
    pub bbox: Option<[f64; 4]>,
}

/// The Arrow schema of a tile export.
#[derive(Debug, Clone)]
pub struct TileSchema {
    pub schema: SchemaRef,
    pub geometry: bool,
    pub dim: usize,
}

impl TileSchema {
    pub fn new(dim: usize, geometry: bool) -> TileSchema {
        let mut fields = vec![
            Field::new("tile", DataType::Utf8, false),
            Field::new("quadkey", DataType::Utf8, false),
            Field::new("z", DataType::UInt8, false),
            Field::new("x", DataType::UInt32, false),
            Field::new("y", DataType::UInt32, false),
            Field::new("model_version", DataType::Utf8, false),
            Field::new("sequence", DataType::Int64, false),
            Field::new(
                "computed_at",
                // Milliseconds: Parquet's TIMESTAMP has no seconds unit (a
                // seconds column would be written as a bare integer).
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
            Field::new("drift", DataType::Float32, true),
            Field::new("embedding", embedding_type(dim), false),
        ];
        if geometry {
            fields.push(Field::new("bbox", DataType::Struct(bbox_fields()), false));
            fields.push(Field::new("geometry", DataType::Binary, false));
        }
        TileSchema {
            schema: Arc::new(Schema::new(fields)),
            geometry,
            dim,
        }
    }
}

/// `fixed_size_list<float32>[dim]`, the type of every embedding column.
pub fn embedding_type(dim: usize) -> DataType {
    DataType::FixedSizeList(
        Arc::new(Field::new("item", DataType::Float32, false)),
        dim as i32,
    )
}

fn bbox_fields() -> Fields {
    Fields::from(vec![
        Field::new("xmin", DataType::Float64, false),
        Field::new("ymin", DataType::Float64, false),
        Field::new("xmax", DataType::Float64, false),
        Field::new("ymax", DataType::Float64, false),
    ])
}

/// The quadkey (Bing Maps tile naming) of a tile: one base-4 digit per zoom
/// level, so a prefix is an ancestor and string order groups neighbours.
pub fn quadkey(t: TileId) -> String {
    (1..=t.z)
        .rev()
        .map(|i| {
            let bit = 1u32 << (i - 1);
            let d = u8::from(t.x & bit != 0) + 2 * u8::from(t.y & bit != 0);
            char::from(b'0' + d)
        })
        .collect()
}

/// The tile's bounds as a WKB polygon (little endian, one ring, counter-
/// clockwise from the south-west corner).
pub fn tile_wkb(b: [f64; 4]) -> Vec<u8> {
    let [w, s, e, n] = b;
    let mut v = Vec::with_capacity(1 + 4 + 4 + 4 + 5 * 16);
    v.push(1u8);
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&5u32.to_le_bytes());
    for (x, y) in [(w, s), (e, s), (e, n), (w, n), (w, s)] {
        v.extend_from_slice(&x.to_le_bytes());
        v.extend_from_slice(&y.to_le_bytes());
    }
    v
}

/// One row group's columns, filled row by row.
#[derive(Default)]
struct Columns {
    tiles: Vec<TileId>,
    versions: Vec<String>,
    sequences: Vec<i64>,
    computed: Vec<i64>,
    drift: Vec<Option<f32>>,
    values: Vec<f32>,
}

/// What a first pass over the region found. The file's metadata (the
/// extent in `geo`, the counts in `osmvec`) describes the rows and goes
/// into the Arrow schema, which is written before the first row: so the
/// export reads the region twice, in one store snapshot.
#[derive(Debug, Clone)]
pub struct Survey {
    pub tiles: u64,
    pub dim: usize,
    pub model_versions: Vec<String>,
    /// West, south, east, north of the union of the tiles.
    pub extent: [f64; 4],
}

/// The first pass: counts, the vector length (one for all tiles, or an
/// error naming the first tile that differs), the model versions and the
/// extent.
pub fn survey(view: &EmbeddingView<'_>, bbox: Option<[f64; 4]>) -> Result<Survey> {
    let mut s = Survey {
        tiles: 0,
        dim: 0,
        model_versions: Vec::new(),
        extent: [
            f64::INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NEG_INFINITY,
        ],
    };
    let mut versions = BTreeSet::new();
    view.for_each(bbox, |t, e| -> Result<bool> {
        let dim = e.vector.len();
        if s.tiles == 0 {
            if dim == 0 {
                bail!("tile {t} has an empty embedding");
            }
            s.dim = dim;
        } else {
            check_width(t, dim, s.dim)?;
        }
        if !versions.contains(&e.model_version) {
            versions.insert(e.model_version);
        }
        let b = t.bounds();
        s.extent = [
            s.extent[0].min(b[0]),
            s.extent[1].min(b[1]),
            s.extent[2].max(b[2]),
            s.extent[3].max(b[3]),
        ];
        s.tiles += 1;
        Ok(true)
    })?;
    s.model_versions = versions.into_iter().collect();
    Ok(s)
}

/// The second pass: the surveyed rows of `view` written as (Geo)Parquet on
/// `out` (the CLI's file, the HTTP answer's channel); `on_row` after each.
pub fn write_rows<W: Write + Send>(
    view: &EmbeddingView<'_>,
    bbox: Option<[f64; 4]>,
    survey: &Survey,
    geometry: bool,
    meta: ExportMeta,
    out: W,
    mut on_row: impl FnMut(),
) -> Result<W> {
    let mut rows = TileRows::new(out, geometry, meta, survey)?;
    view.for_each(bbox, |t, e| -> Result<bool> {
        rows.push(t, &e)?;
        on_row();
        Ok(true)
    })?;
    rows.finish()
}

/// Every row of an export has the first row's vector length.
pub fn check_width(t: TileId, dim: usize, expected: usize) -> Result<()> {
    if dim != expected {
        bail!(
            "tile {t} has a {dim}-long embedding, the tiles before it {expected}: \
             the store mixes models of different widths"
        );
    }
    Ok(())
}

/// The file metadata: GeoParquet's `geo` (with geometry) and `osmvec`.
fn file_metadata(geometry: bool, meta: &ExportMeta, s: &Survey) -> Vec<(String, String)> {
    let mut kv = Vec::new();
    if geometry {
        let crs: serde_json::Value =
            serde_json::from_str(CRS84_PROJJSON).expect("the bundled PROJJSON parses");
        let geo = json!({
            "version": "1.1.0",
            "primary_column": "geometry",
            "columns": {
                "geometry": {
                    "encoding": "WKB",
                    "geometry_types": ["Polygon"],
                    "crs": crs,
                    "edges": "planar",
                    "orientation": "counterclockwise",
                    "bbox": s.extent,
                    "covering": { "bbox": {
                        "xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"],
                        "xmax": ["bbox", "xmax"], "ymax": ["bbox", "ymax"],
                    }},
                }
            }
        });
        kv.push(("geo".to_string(), geo.to_string()));
    }
    let osmvec = json!({
        "what": "osmvec tile embeddings",
        "osmvec_version": env!("CARGO_PKG_VERSION"),
        "git_revision": osmvec_pipeline::checkpoint::git_revision(),
        "exported_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "store_sequence": meta.store_sequence,
        "zoom": meta.zoom,
        "bbox": meta.bbox,
        "tiles": s.tiles,
        "dim": s.dim,
        "model_versions": s.model_versions,
        "license": "embeddings derived from OpenStreetMap data, © OpenStreetMap contributors, ODbL 1.0",
    });
    kv.push(("osmvec".to_string(), osmvec.to_string()));
    kv
}

/// Streams the surveyed tiles into a Parquet file on `W`, in row groups of
/// [`ROW_GROUP`]. The metadata is in the Arrow schema (what pyarrow and
/// GeoPandas read) and in the Parquet footer (what DuckDB and GDAL read).
pub struct TileRows<W: Write + Send> {
    writer: ArrowWriter<W>,
    schema: TileSchema,
    cols: Columns,
    rows: u64,
    expected: u64,
}

impl<W: Write + Send> TileRows<W> {
    pub fn new(out: W, geometry: bool, meta: ExportMeta, survey: &Survey) -> Result<Self> {
        let mut schema = TileSchema::new(survey.dim, geometry);
        let kv = file_metadata(geometry, &meta, survey);
        schema.schema = Arc::new(Schema::new_with_metadata(
            schema.schema.fields().clone(),
            kv.iter().cloned().collect::<HashMap<_, _>>(),
        ));
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP))
            .set_key_value_metadata(Some(
                kv.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect(),
            ))
            .build();
        let writer = ArrowWriter::try_new(out, schema.schema.clone(), Some(props))
            .context("starting the Parquet file")?;
        Ok(TileRows {
            writer,
            schema,
            cols: Columns::default(),
            rows: 0,
            expected: survey.tiles,
        })
    }

    pub fn push(&mut self, t: TileId, e: &TileEmbedding) -> Result<()> {
        check_width(t, e.vector.len(), self.schema.dim)?;
        let c = &mut self.cols;
        c.tiles.push(t);
        c.versions.push(e.model_version.clone());
        c.sequences.push(e.sequence as i64);
        c.computed.push(e.computed_at);
        c.drift.push(e.drift);
        c.values.extend_from_slice(&e.vector);
        self.rows += 1;
        if c.tiles.len() >= ROW_GROUP {
            self.write_group()?;
        }
        Ok(())
    }

    fn write_group(&mut self) -> Result<()> {
        if self.cols.tiles.is_empty() {
            return Ok(());
        }
        let schema = &self.schema;
        let c = std::mem::take(&mut self.cols);
        let bounds: Vec<[f64; 4]> = c.tiles.iter().map(TileId::bounds).collect();
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let embedding = FixedSizeListArray::try_new(
            item,
            schema.dim as i32,
            Arc::new(Float32Array::from(c.values)),
            None,
        )?;
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                c.tiles.iter().map(|t| t.to_string()),
            )),
            Arc::new(StringArray::from_iter_values(
                c.tiles.iter().map(|t| quadkey(*t)),
            )),
            Arc::new(UInt8Array::from_iter_values(c.tiles.iter().map(|t| t.z))),
            Arc::new(UInt32Array::from_iter_values(c.tiles.iter().map(|t| t.x))),
            Arc::new(UInt32Array::from_iter_values(c.tiles.iter().map(|t| t.y))),
            Arc::new(StringArray::from(c.versions)),
            Arc::new(Int64Array::from(c.sequences)),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(c.computed.iter().map(|s| s * 1000))
                    .with_timezone("UTC"),
            ),
            Arc::new(Float32Array::from(c.drift)),
            Arc::new(embedding),
        ];
        if schema.geometry {
            let side = |i: usize| -> ArrayRef {
                Arc::new(Float64Array::from_iter_values(bounds.iter().map(|b| b[i])))
            };
            columns.push(Arc::new(StructArray::try_new(
                bbox_fields(),
                vec![side(0), side(1), side(2), side(3)],
                None,
            )?));
            columns.push(Arc::new(BinaryArray::from_iter_values(
                bounds.iter().map(|b| tile_wkb(*b)),
            )));
        }
        let batch = RecordBatch::try_new(schema.schema.clone(), columns)?;
        self.writer.write(&batch).context("writing a row group")?;
        self.writer.flush().context("writing a row group")?;
        Ok(())
    }

    /// Rows pushed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes the last row group and the footer; returns the output. The
    /// rows must be the surveyed ones.
    pub fn finish(mut self) -> Result<W> {
        self.write_group()?;
        if self.rows != self.expected {
            bail!(
                "the export wrote {} tiles where its first pass counted {} (the store changed \
                 under its snapshot?)",
                self.rows,
                self.expected
            );
        }
        self.writer
            .into_inner()
            .context("writing the Parquet footer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quadkeys_follow_bing_maps() {
        // The examples of Microsoft's "Bing Maps Tile System" article.
        assert_eq!(quadkey(TileId { z: 3, x: 3, y: 5 }), "213");
        assert_eq!(quadkey(TileId { z: 0, x: 0, y: 0 }), "");
        assert_eq!(quadkey(TileId { z: 1, x: 1, y: 1 }), "3");
    }

    #[test]
    fn tile_polygons_are_closed_wkb_rings() {
        let b = TileId { z: 1, x: 0, y: 0 }.bounds();
        let w = tile_wkb(b);
        assert_eq!(w.len(), 1 + 4 + 4 + 4 + 5 * 16);
        assert_eq!(&w[..13], &[1, 3, 0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 0]);
        let f = |o: usize| f64::from_le_bytes(w[o..o + 8].try_into().unwrap());
        assert_eq!((f(13), f(21)), (-180.0, 0.0));
        assert_eq!((f(13 + 64), f(21 + 64)), (-180.0, 0.0));
        assert!((f(21 + 32) - 85.051_128_779_806_59).abs() < 1e-9);
    }

    fn embedding(v: Vec<f32>, seq: u64) -> TileEmbedding {
        TileEmbedding {
            model_version: "1.0".into(),
            sequence: seq,
            computed_at: 1_764_000_000,
            vector: v,
            drift: if seq.is_multiple_of(2) {
                None
            } else {
                Some(0.25)
            },
        }
    }

    #[test]
    fn rows_round_trip_through_the_parquet_reader() {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let meta = ExportMeta {
            store_sequence: 7,
            zoom: 15,
            bbox: None,
        };
        let n = ROW_GROUP + 5;
        let tile = |i: usize| TileId {
            z: 15,
            x: 100 + i as u32,
            y: 200,
        };
        let survey = Survey {
            tiles: n as u64,
            dim: 3,
            model_versions: vec!["1.0".into()],
            extent: [
                tile(0).bounds()[0],
                tile(0).bounds()[1],
                tile(n - 1).bounds()[2],
                tile(0).bounds()[3],
            ],
        };
        let mut rows = TileRows::new(Vec::new(), true, meta, &survey).unwrap();
        for i in 0..n {
            rows.push(tile(i), &embedding(vec![i as f32, -1.5, 0.25], i as u64))
                .unwrap();
        }
        let e = rows
            .push(TileId { z: 15, x: 1, y: 1 }, &embedding(vec![1.0], 1))
            .unwrap_err();
        assert!(
            e.to_string().contains("15/1/1 has a 1-long embedding"),
            "{e}"
        );
        let bytes = bytes::Bytes::from(rows.finish().unwrap());
        let b = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
        let kv = b
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .clone();
        let geo: serde_json::Value = serde_json::from_str(
            kv.iter()
                .find(|k| k.key == "geo")
                .unwrap()
                .value
                .as_deref()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(geo["primary_column"], "geometry");
        assert_eq!(geo["columns"]["geometry"]["crs"]["id"]["code"], "CRS84");
        assert_eq!(
            geo["columns"]["geometry"]["bbox"][0].as_f64().unwrap(),
            tile(0).bounds()[0]
        );
        // The same metadata in the Arrow schema (what pyarrow reports).
        assert_eq!(b.schema().metadata()["geo"], geo.to_string());
        assert!(b.schema().metadata().contains_key("osmvec"));
        assert_eq!(b.metadata().num_row_groups(), 2);
        let mut seen = 0usize;
        for batch in b.build().unwrap() {
            let batch = batch.unwrap();
            let emb = batch
                .column_by_name("embedding")
                .unwrap()
                .as_any()
                .downcast_ref::<FixedSizeListArray>()
                .unwrap()
                .clone();
            let tiles = batch
                .column_by_name("tile")
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone();
            let times = batch
                .column_by_name("computed_at")
                .unwrap()
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .unwrap()
                .clone();
            for r in 0..batch.num_rows() {
                let i = seen + r;
                assert_eq!(tiles.value(r), format!("15/{}/200", 100 + i));
                assert_eq!(times.value(r), 1_764_000_000_000);
                let v = emb.value(r);
                let v = v.as_any().downcast_ref::<Float32Array>().unwrap();
                assert_eq!(v.values().as_ref(), &[i as f32, -1.5, 0.25]);
            }
            seen += batch.num_rows();
        }
        assert_eq!(seen, n);
    }
}
