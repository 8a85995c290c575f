//! Getting embeddings out to where data people work: a region's tile
//! embeddings as GeoParquet (or plain Parquet, or a NumPy matrix), and the
//! location encoder applied to many points at once.
//!
//! Everything streams: tiles are read from the store one at a time and
//! written in row groups, so memory does not grow with the region. A file
//! appears under its name only when it is complete (written beside it under
//! a temporary name, synced, renamed); a failed export leaves nothing.

pub mod npy;
pub mod points;
pub mod tiles;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use osmvec_graphstore::Store;
use osmvec_graphstore::tiles::{MAX_LAT, count_in_bbox};
use serde::Serialize;

pub use tiles::{Survey, TileRows, TileSchema, survey, write_rows};

/// File formats of `export-embeddings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Parquet with a WKB `geometry` column, a bbox covering and GeoParquet
    /// 1.1 metadata: GeoPandas, DuckDB spatial, QGIS and GDAL open it as a
    /// layer.
    GeoParquet,
    /// The same columns without geometry, for tools with no spatial support.
    Parquet,
    /// A float32 `[n, dim]` `.npy` matrix, and `FILE.tiles.csv` naming the
    /// tile of each row.
    Npy,
}

/// Parses `W,S,E,N` (degrees): four finite numbers, west < east, south <
/// north, longitudes within ±180 and latitudes within ±90. A box across the
/// antimeridian is refused with a hint rather than silently read as the
/// complement.
pub fn parse_bbox(s: &str) -> Result<[f64; 4], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != 4 {
        return Err(format!(
            "bbox must be four comma-separated numbers W,S,E,N (degrees), got {s:?}"
        ));
    }
    let mut b = [0f64; 4];
    for (i, (p, name)) in parts
        .iter()
        .zip(["west", "south", "east", "north"])
        .enumerate()
    {
        b[i] = p
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("bbox {name} must be a finite number, got {p:?} in {s:?}"))?;
    }
    let [w, so, e, n] = b;
    if !(-180.0..=180.0).contains(&w) || !(-180.0..=180.0).contains(&e) {
        return Err(format!(
            "bbox longitudes must be within -180..180, got west {w} and east {e}"
        ));
    }
    if !(-90.0..=90.0).contains(&so) || !(-90.0..=90.0).contains(&n) {
        return Err(format!(
            "bbox latitudes must be within -90..90, got south {so} and north {n}"
        ));
    }
    if w >= e {
        return Err(format!(
            "bbox west ({w}) must be less than east ({e}); for a region across the antimeridian export its two halves"
        ));
    }
    if so >= n {
        return Err(format!("bbox south ({so}) must be less than north ({n})"));
    }
    Ok(b)
}

/// The tile cover of a bbox at the store's fine zoom (latitudes clamped to
/// Web Mercator's), for limits and progress bars.
pub fn tiles_in_cover(zoom: u8, bbox: [f64; 4]) -> u64 {
    let b = [
        bbox[0],
        bbox[1].clamp(-MAX_LAT, MAX_LAT),
        bbox[2],
        bbox[3].clamp(-MAX_LAT, MAX_LAT),
    ];
    count_in_bbox(zoom, b)
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub path: PathBuf,
    pub format: &'static str,
    pub tiles: u64,
    pub dim: usize,
    pub model_versions: Vec<String>,
    pub bytes: u64,
    pub seconds: f64,
    pub tiles_per_second: f64,
    pub megabytes_per_second: f64,
}

/// A file written under a temporary name beside its destination and
/// renamed onto it by [`AtomicFile::commit`]; dropped uncommitted, it is
/// removed, so a failed export leaves no partial file.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl AtomicFile {
    /// Creates the temporary file; the error names the destination.
    pub fn create(dest: &Path) -> Result<(AtomicFile, File)> {
        let name = dest
            .file_name()
            .with_context(|| format!("output path {} names no file", dest.display()))?;
        if dest.is_dir() {
            bail!("output path {} is a directory", dest.display());
        }
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".partial-{}", std::process::id()));
        let tmp = dest.with_file_name(tmp_name);
        let f = File::create(&tmp)
            .with_context(|| format!("cannot write the output file {}", dest.display()))?;
        Ok((
            AtomicFile {
                tmp,
                dest: dest.to_path_buf(),
                done: false,
            },
            f,
        ))
    }

    /// Syncs `f` (the file `create` returned) and renames it into place.
    pub fn commit(mut self, f: File) -> Result<u64> {
        f.sync_all()
            .with_context(|| format!("syncing {}", self.tmp.display()))?;
        let bytes = f.metadata()?.len();
        drop(f);
        std::fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("renaming onto {}", self.dest.display()))?;
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        self.done = true;
        Ok(bytes)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes the tile embeddings of a region (`None`: all) of `store` to
/// `out`, from one snapshot of the store (a daemon may write meanwhile).
/// An empty region is an error (an empty file is more often a wrong bbox
/// than an answer), and so is a store whose vectors differ in length.
pub fn export_embeddings(
    store: &Store,
    bbox: Option<[f64; 4]>,
    format: Format,
    out: &Path,
) -> Result<ExportReport> {
    let started = Instant::now();
    let zoom = store.tile_config().fine_zoom;
    let sequence = store.replication_state()?.0.unwrap_or(0);
    let view = store.embedding_view();
    let survey = tiles::survey(&view, bbox)?;
    if survey.tiles == 0 {
        bail!(no_tiles(store, bbox)?);
    }
    let bar = crate::cli::progress_bar(
        survey.tiles,
        "{bar:40} {pos}/{len} tiles ({per_sec}, {eta} left)",
    );
    let meta = tiles::ExportMeta {
        store_sequence: sequence,
        zoom,
        bbox,
    };
    let bytes = match format {
        Format::GeoParquet | Format::Parquet => {
            let (guard, f) = AtomicFile::create(out)?;
            let w = tiles::write_rows(
                &view,
                bbox,
                &survey,
                format == Format::GeoParquet,
                meta,
                BufWriter::with_capacity(1 << 20, f),
                || bar.inc(1),
            )?;
            let f = w.into_inner().map_err(|e| e.into_error())?;
            guard.commit(f)?
        }
        Format::Npy => {
            let (guard, f) = AtomicFile::create(out)?;
            let sidecar = npy::sidecar_path(out);
            let (sguard, sf) = AtomicFile::create(&sidecar)?;
            let mut w = npy::NpyTiles::new(BufWriter::new(f), BufWriter::new(sf), &survey)?;
            view.for_each(bbox, |t, e| -> Result<bool> {
                w.push(t, &e)?;
                bar.inc(1);
                Ok(true)
            })?;
            let (f, sf) = w.finish()?;
            guard.commit(f)? + sguard.commit(sf)?
        }
    };
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    Ok(ExportReport {
        path: out.to_path_buf(),
        format: match format {
            Format::GeoParquet => "geoparquet",
            Format::Parquet => "parquet",
            Format::Npy => "npy",
        },
        tiles: survey.tiles,
        dim: survey.dim,
        model_versions: survey.model_versions,
        bytes,
        seconds,
        tiles_per_second: survey.tiles as f64 / seconds.max(1e-9),
        megabytes_per_second: bytes as f64 / 1e6 / seconds.max(1e-9),
    })
}

/// The error of an empty export: says what the store does hold.
fn no_tiles(store: &Store, bbox: Option<[f64; 4]>) -> Result<String> {
    let n = store.estimated_tile_embeddings()?;
    Ok(match bbox {
        Some(b) => format!(
            "no tile embeddings in bbox {},{},{},{} (the store holds about {n} in all; \
             is the bbox W,S,E,N in degrees, and has `osmvec embed` run?)",
            b[0], b[1], b[2], b[3]
        ),
        None => "the store holds no tile embeddings yet (run `osmvec embed --all` first)".into(),
    })
}

/// A `Write` that sends what is written in chunks over a channel: the
/// HTTP export writes Parquet on a blocking thread into it while the
/// response body streams the chunks out. A closed channel (the client went
/// away) turns into a write error, which stops the export.
pub struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 256 * 1024;

impl ChannelWriter {
    pub fn new(tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = bytes::Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bboxes_are_checked() {
        assert_eq!(parse_bbox("1,2,3,4").unwrap(), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            parse_bbox(" 73.5, 4.1 ,73.6,4.3").unwrap(),
            [73.5, 4.1, 73.6, 4.3]
        );
        for (bad, says) in [
            ("1,2,3", "four comma-separated"),
            ("1,2,3,4,5", "four comma-separated"),
            ("a,2,3,4", "west must be a finite number"),
            ("1,2,NaN,4", "east must be a finite number"),
            ("1,2,inf,4", "east must be a finite number"),
            ("-181,2,3,4", "longitudes must be within"),
            ("1,-91,3,4", "latitudes must be within"),
            ("3,2,1,4", "west (3) must be less than east (1)"),
            ("170,2,-170,4", "antimeridian"),
            ("1,4,3,2", "south (4) must be less than north (2)"),
        ] {
            let e = parse_bbox(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_failed_file_leaves_nothing_and_a_committed_one_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.parquet");
        {
            let (_g, mut f) = AtomicFile::create(&dest).unwrap();
            f.write_all(b"half").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        std::fs::write(&dest, b"old").unwrap();
        let (g, mut f) = AtomicFile::create(&dest).unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(g.commit(f).unwrap(), 3);
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let e = AtomicFile::create(&dir.path().join("missing/out.parquet"))
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("cannot write the output file"),
            "{e:#}"
        );
    }
}
