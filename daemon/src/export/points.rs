//! `osmvec embed-points`: the location encoder (spherical harmonics +
//! SIREN) of a checkpoint applied to many points at once, the way SatCLIP's
//! users precompute location features: from a CSV or Parquet file of
//! points, or a regular grid over a bbox. Read, encoded and written in
//! chunks of [`CHUNK`] points, so memory does not grow with the input.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::{
    Array, ArrayRef, FixedSizeListArray, Float32Array, Float64Array, Int32Array, Int64Array,
    RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::Serialize;
use serde_json::json;

use super::AtomicFile;
use super::tiles::embedding_type;
use osmvec_pipeline::checkpoint::Model;

/// Points per encoder call and per row group.
pub const CHUNK: usize = 8192;

/// Where the points come from.
#[derive(Debug, Clone)]
pub enum Points {
    /// A CSV (header row naming `lon`/`lat`, or `longitude`/`latitude`,
    /// `lng`, `x`/`y`; an `id` column is carried over) or a Parquet file
    /// (float columns of the same names; an integer or string `id`).
    File(PathBuf),
    /// A grid over `bbox` (W,S,E,N) with `step_m` metres between points
    /// along both axes (longitude steps widen with latitude).
    Grid { bbox: [f64; 4], step_m: f64 },
}

/// What `embed-points` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct PointsReport {
    pub path: PathBuf,
    pub points: u64,
    pub dim: usize,
    pub model_version: String,
    pub bytes: u64,
    pub seconds: f64,
    pub points_per_second: f64,
}

/// A chunk of input points; `id` as read (strings from CSV).
struct Chunk {
    lon: Vec<f64>,
    lat: Vec<f64>,
    id: Option<IdColumn>,
}

enum IdColumn {
    Int(Vec<i64>),
    Text(Vec<String>),
}

/// Encodes the points and writes `out` (Parquet: `id` if the input had one,
/// `lon`, `lat`, `embedding`; the model's version in the `osmvec` metadata).
pub fn embed_points(
    model: &Model,
    checkpoint: &Path,
    points: &Points,
    out: &Path,
    max_points: u64,
) -> Result<PointsReport> {
    let started = Instant::now();
    let dim = model.location.config().out_dim;
    let version = model.meta.model_version.clone();
    let (guard, file) = AtomicFile::create(out)?;
    let total = match points {
        Points::Grid { bbox, step_m } => {
            let n = grid_count(*bbox, *step_m);
            if n > max_points {
                bail!(
                    "a {step_m} m grid over this bbox has {n} points, more than --max-points \
                     {max_points}: use a larger step or a smaller bbox"
                );
            }
            n
        }
        Points::File(_) => 0,
    };
    let mut sink = PointsSink {
        model,
        dim,
        meta: file_metadata(&version, dim, checkpoint, points),
        file: Some(file),
        writer: None,
        count: 0,
        max_points,
        bar: crate::cli::progress_bar(total, "{bar:40} {pos}/{len} points ({per_sec}, {eta} left)"),
    };
    let mut emit = |chunk: Chunk| sink.emit(chunk);
    match points {
        Points::Grid { bbox, step_m } => grid(*bbox, *step_m, &mut emit)?,
        Points::File(p) => {
            let is_parquet = p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
            if is_parquet {
                read_parquet(p, &mut emit)?
            } else {
                read_csv(p, &mut emit)?
            }
        }
    }
    sink.bar.finish_and_clear();
    let Some((w, _)) = sink.writer else {
        bail!(
            "no points to embed in {}",
            match points {
                Points::File(p) => p.display().to_string(),
                Points::Grid { .. } => "the grid".into(),
            }
        );
    };
    let f = w
        .into_inner()
        .context("writing the Parquet footer")?
        .into_inner()
        .map_err(|e| e.into_error())?;
    let bytes = guard.commit(f)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(PointsReport {
        path: out.to_path_buf(),
        points: sink.count,
        dim,
        model_version: version,
        bytes,
        seconds,
        points_per_second: sink.count as f64 / seconds.max(1e-9),
    })
}

/// Embeds chunks of points and writes them as Parquet rows (the writer is
/// made at the first chunk, whose id column decides the schema).
struct PointsSink<'a> {
    model: &'a Model,
    dim: usize,
    meta: String,
    file: Option<File>,
    writer: Option<(ArrowWriter<BufWriter<File>>, SchemaRef)>,
    count: u64,
    max_points: u64,
    bar: indicatif::ProgressBar,
}

impl PointsSink<'_> {
    fn emit(&mut self, chunk: Chunk) -> Result<()> {
        if chunk.lon.is_empty() {
            return Ok(());
        }
        self.count += chunk.lon.len() as u64;
        if self.count > self.max_points {
            bail!(
                "the input has more than --max-points {} points",
                self.max_points
            );
        }
        let coords: Vec<(f64, f64)> = chunk
            .lat
            .iter()
            .copied()
            .zip(chunk.lon.iter().copied())
            .collect();
        let values = self
            .model
            .location
            .forward(&coords)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if self.writer.is_none() {
            let (schema, props) = points_schema(chunk.id.as_ref(), self.dim, &self.meta);
            let f = BufWriter::with_capacity(1 << 20, self.file.take().expect("one writer"));
            self.writer = Some((
                ArrowWriter::try_new(f, schema.clone(), Some(props))?,
                schema,
            ));
        }
        let (w, schema) = self.writer.as_mut().expect("created above");
        self.bar.inc(chunk.lon.len() as u64);
        w.write(&points_batch(schema, chunk, values, self.dim)?)?;
        Ok(())
    }
}

/// The file's `osmvec` metadata. Model and source are known before the
/// first row, so it goes into the Arrow schema (what pyarrow reads) and the
/// Parquet footer (what DuckDB and GDAL read); the count is the file's row
/// count.
fn file_metadata(version: &str, dim: usize, checkpoint: &Path, points: &Points) -> String {
    json!({
        "what": "osmvec location-encoder embeddings of points",
        "model_version": version,
        "dim": dim,
        "checkpoint": checkpoint.display().to_string(),
        "source": match points {
            Points::File(p) => json!({ "file": p.display().to_string() }),
            Points::Grid { bbox, step_m } => json!({ "bbox": bbox, "step_m": step_m }),
        },
        "osmvec_version": env!("CARGO_PKG_VERSION"),
        "created_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    })
    .to_string()
}

/// The schema (an `id` column of the input's type, when it has one) and
/// the writer's settings.
fn points_schema(id: Option<&IdColumn>, dim: usize, meta: &str) -> (SchemaRef, WriterProperties) {
    let mut fields = Vec::new();
    match id {
        Some(IdColumn::Int(_)) => fields.push(Field::new("id", DataType::Int64, false)),
        Some(IdColumn::Text(_)) => fields.push(Field::new("id", DataType::Utf8, false)),
        None => {}
    }
    fields.push(Field::new("lon", DataType::Float64, false));
    fields.push(Field::new("lat", DataType::Float64, false));
    fields.push(Field::new("embedding", embedding_type(dim), false));
    let schema = Arc::new(Schema::new_with_metadata(
        fields,
        [("osmvec".to_string(), meta.to_string())]
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>(),
    ));
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(CHUNK))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            "osmvec".to_string(),
            meta.to_string(),
        )]))
        .build();
    (schema, props)
}

/// One chunk's rows: its ids (when the schema has them), coordinates and
/// vectors (`dim` values per point, row-major).
fn points_batch(
    schema: &SchemaRef,
    chunk: Chunk,
    values: Vec<f32>,
    dim: usize,
) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = Vec::new();
    match chunk.id {
        Some(IdColumn::Int(v)) => columns.push(Arc::new(Int64Array::from(v))),
        Some(IdColumn::Text(v)) => columns.push(Arc::new(StringArray::from(v))),
        None => {}
    }
    if columns.len() + 3 != schema.fields().len() {
        bail!("the input's id column appears in some rows only");
    }
    columns.push(Arc::new(Float64Array::from(chunk.lon)));
    columns.push(Arc::new(Float64Array::from(chunk.lat)));
    columns.push(Arc::new(FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::Float32, false)),
        dim as i32,
        Arc::new(Float32Array::from(values)),
        None,
    )?));
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

const M_PER_DEG: f64 = 111_320.0;

/// Rows of the grid: latitudes from south by `step_m`.
fn grid_rows(bbox: [f64; 4], step_m: f64) -> impl Iterator<Item = (f64, f64)> {
    let dlat = step_m / M_PER_DEG;
    // The epsilon keeps a bbox that is a whole number of steps from losing
    // its last row to rounding.
    let rows = ((bbox[3] - bbox[1]) / dlat + 1e-9).floor() as u64 + 1;
    (0..rows).map(move |i| {
        let lat = bbox[1] + i as f64 * dlat;
        let dlon = step_m / (M_PER_DEG * lat.to_radians().cos().max(1e-12));
        (lat, dlon)
    })
}

fn row_len(bbox: [f64; 4], dlon: f64) -> u64 {
    ((bbox[2] - bbox[0]) / dlon + 1e-9).floor() as u64 + 1
}

/// Number of points `grid` yields.
pub fn grid_count(bbox: [f64; 4], step_m: f64) -> u64 {
    grid_rows(bbox, step_m)
        .map(|(_, dlon)| row_len(bbox, dlon))
        .sum()
}

fn grid(bbox: [f64; 4], step_m: f64, emit: &mut impl FnMut(Chunk) -> Result<()>) -> Result<()> {
    let mut c = Chunk {
        lon: Vec::with_capacity(CHUNK),
        lat: Vec::with_capacity(CHUNK),
        id: None,
    };
    for (lat, dlon) in grid_rows(bbox, step_m) {
        for j in 0..row_len(bbox, dlon) {
            c.lon.push(bbox[0] + j as f64 * dlon);
            c.lat.push(lat);
            if c.lon.len() == CHUNK {
                emit(std::mem::replace(
                    &mut c,
                    Chunk {
                        lon: Vec::with_capacity(CHUNK),
                        lat: Vec::with_capacity(CHUNK),
                        id: None,
                    },
                ))?;
            }
        }
    }
    emit(c)
}

/// Index of the first header among `names` (case-insensitive).
fn find(headers: &[String], names: &[&str]) -> Option<usize> {
    headers
        .iter()
        .position(|h| names.iter().any(|n| h.trim().eq_ignore_ascii_case(n)))
}

const LON: &[&str] = &["lon", "lng", "long", "longitude", "x"];
const LAT: &[&str] = &["lat", "latitude", "y"];

fn check_point(lon: f64, lat: f64) -> Result<(), String> {
    if !lon.is_finite() || !(-180.0..=180.0).contains(&lon) {
        return Err(format!("longitude {lon} is not within -180..180"));
    }
    if !lat.is_finite() || !(-90.0..=90.0).contains(&lat) {
        return Err(format!("latitude {lat} is not within -90..90"));
    }
    Ok(())
}

fn read_csv(path: &Path, emit: &mut impl FnMut(Chunk) -> Result<()>) -> Result<()> {
    let mut r = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let headers: Vec<String> = r
        .headers()
        .with_context(|| format!("{}: reading the header row", path.display()))?
        .iter()
        .map(str::to_string)
        .collect();
    let (lon_i, lat_i) = match (find(&headers, LON), find(&headers, LAT)) {
        (Some(a), Some(b)) => (a, b),
        _ => bail!(
            "{}: the header row {:?} names no longitude and latitude columns \
             (expected lon/lat, longitude/latitude, lng or x/y)",
            path.display(),
            headers
        ),
    };
    let id_i = find(&headers, &["id"]);
    let new_chunk = || Chunk {
        lon: Vec::with_capacity(CHUNK),
        lat: Vec::with_capacity(CHUNK),
        id: id_i.map(|_| IdColumn::Text(Vec::with_capacity(CHUNK))),
    };
    let mut c = new_chunk();
    for (n, rec) in r.records().enumerate() {
        let line = n + 2;
        let rec = rec.with_context(|| format!("{}: line {line}", path.display()))?;
        let field = |i: usize, what: &str| -> Result<f64> {
            let s = rec.get(i).unwrap_or("");
            s.parse::<f64>().map_err(|_| {
                anyhow!(
                    "{}: line {line}, column {} ({}): {what} {s:?} is not a number",
                    path.display(),
                    i + 1,
                    headers[i]
                )
            })
        };
        let (lon, lat) = (field(lon_i, "longitude")?, field(lat_i, "latitude")?);
        check_point(lon, lat).map_err(|e| anyhow!("{}: line {line}: {e}", path.display()))?;
        c.lon.push(lon);
        c.lat.push(lat);
        if let (Some(i), Some(IdColumn::Text(ids))) = (id_i, &mut c.id) {
            ids.push(rec.get(i).unwrap_or("").to_string());
        }
        if c.lon.len() == CHUNK {
            emit(std::mem::replace(&mut c, new_chunk()))?;
        }
    }
    emit(c)
}

fn floats(a: &dyn Array, what: &str, path: &Path) -> Result<Vec<f64>> {
    if a.null_count() > 0 {
        bail!("{}: the {what} column has null values", path.display());
    }
    if let Some(v) = a.as_any().downcast_ref::<Float64Array>() {
        Ok(v.values().to_vec())
    } else if let Some(v) = a.as_any().downcast_ref::<Float32Array>() {
        Ok(v.values().iter().map(|x| *x as f64).collect())
    } else {
        bail!(
            "{}: the {what} column is {}, not a float column",
            path.display(),
            a.data_type()
        )
    }
}

fn read_parquet(path: &Path, emit: &mut impl FnMut(Chunk) -> Result<()>) -> Result<()> {
    let f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)
        .with_context(|| format!("{} is not a Parquet file", path.display()))?
        .with_batch_size(CHUNK);
    let headers: Vec<String> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let (lon_i, lat_i) = match (find(&headers, LON), find(&headers, LAT)) {
        (Some(a), Some(b)) => (a, b),
        _ => bail!(
            "{}: the columns {:?} include no longitude and latitude (expected lon/lat, \
             longitude/latitude, lng or x/y)",
            path.display(),
            headers
        ),
    };
    let id_i = find(&headers, &["id"]);
    let mut row = 0u64;
    for batch in b.build()? {
        let batch = batch.with_context(|| format!("{}: reading a row group", path.display()))?;
        let lon = floats(batch.column(lon_i).as_ref(), "longitude", path)?;
        let lat = floats(batch.column(lat_i).as_ref(), "latitude", path)?;
        for (k, (x, y)) in lon.iter().zip(&lat).enumerate() {
            check_point(*x, *y)
                .map_err(|e| anyhow!("{}: row {}: {e}", path.display(), row + k as u64))?;
        }
        let id = match id_i {
            None => None,
            Some(i) => Some(id_column(batch.column(i).as_ref(), path)?),
        };
        row += lon.len() as u64;
        emit(Chunk { lon, lat, id })?;
    }
    Ok(())
}

fn id_column(a: &dyn Array, path: &Path) -> Result<IdColumn> {
    if a.null_count() > 0 {
        bail!("{}: the id column has null values", path.display());
    }
    let any = a.as_any();
    if let Some(v) = any.downcast_ref::<Int64Array>() {
        return Ok(IdColumn::Int(v.values().to_vec()));
    }
    if let Some(v) = any.downcast_ref::<Int32Array>() {
        return Ok(IdColumn::Int(
            v.values().iter().map(|x| *x as i64).collect(),
        ));
    }
    if let Some(v) = any.downcast_ref::<UInt32Array>() {
        return Ok(IdColumn::Int(
            v.values().iter().map(|x| *x as i64).collect(),
        ));
    }
    if let Some(v) = any.downcast_ref::<UInt64Array>() {
        return v
            .values()
            .iter()
            .map(|x| {
                i64::try_from(*x).map_err(|_| anyhow!("{}: id {x} exceeds i64", path.display()))
            })
            .collect::<Result<Vec<_>>>()
            .map(IdColumn::Int);
    }
    if let Some(v) = any.downcast_ref::<StringArray>() {
        return Ok(IdColumn::Text(
            (0..v.len()).map(|i| v.value(i).to_string()).collect(),
        ));
    }
    bail!(
        "{}: the id column is {}; integer or string ids are carried over",
        path.display(),
        a.data_type()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_space_points_by_metres() {
        // 0.01° × 0.01° near the equator in 100 m steps: 0.01° is 1,113 m,
        // so 12 rows of 12 points.
        let b = [0.0, 0.0, 0.01, 0.01];
        assert_eq!(grid_count(b, 100.0), 144);
        let mut seen = Vec::new();
        grid(b, 100.0, &mut |c: Chunk| {
            seen.extend(c.lon.iter().zip(&c.lat).map(|(x, y)| (*x, *y)));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 144);
        assert!(
            seen.iter()
                .all(|(x, y)| (0.0..=0.01).contains(x) && (0.0..=0.01).contains(y))
        );
        // At 60° a degree of longitude is half as long: half the columns.
        let north = [0.0, 60.0, 0.01, 60.0];
        assert_eq!(grid_count(north, 100.0), 6);
    }

    #[test]
    fn csv_errors_name_the_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.csv");
        std::fs::write(&p, "id,lat,lon\na,1,2\nb,1,east\n").unwrap();
        let e = read_csv(&p, &mut |_c: Chunk| Ok(())).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("line 3, column 3 (lon)") && e.contains("\"east\""),
            "{e}"
        );
        std::fs::write(&p, "id,lat,lon\na,91,2\n").unwrap();
        let e = format!("{:#}", read_csv(&p, &mut |_c: Chunk| Ok(())).unwrap_err());
        assert!(e.contains("line 2: latitude 91"), "{e}");
        std::fs::write(&p, "name,north,east\n").unwrap();
        let e = format!("{:#}", read_csv(&p, &mut |_c: Chunk| Ok(())).unwrap_err());
        assert!(e.contains("names no longitude and latitude"), "{e}");
        std::fs::write(&p, "ID,Latitude,Longitude\n7,4.17,73.51\n").unwrap();
        let mut got = Vec::new();
        read_csv(&p, &mut |c: Chunk| {
            if let Some(IdColumn::Text(ids)) = &c.id {
                got.extend(
                    ids.iter()
                        .cloned()
                        .zip(c.lon.iter().zip(&c.lat).map(|(x, y)| (*x, *y))),
                );
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![("7".to_string(), (73.51, 4.17))]);
    }
}
