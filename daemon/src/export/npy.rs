//! Tile embeddings as a NumPy `.npy` matrix (float32, `[n, dim]`, C order)
//! with a CSV sidecar naming each row's tile: what `numpy.load` and
//! `pandas.read_csv` read with nothing else installed.
//!
//! The header holds the row count, which the export's first pass (the
//! survey) knows before the first row.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use osmvec_graphstore::embeddings::TileEmbedding;
use osmvec_graphstore::tiles::TileId;

use super::Survey;

/// Header length: NumPy pads to a multiple of 64; 128 bytes hold any shape
/// of two u64s.
const HEADER: usize = 128;

/// `FILE.tiles.csv` beside `FILE`.
pub fn sidecar_path(npy: &Path) -> PathBuf {
    let mut s = npy.as_os_str().to_owned();
    s.push(".tiles.csv");
    PathBuf::from(s)
}

/// The `.npy` version 1.0 header for a float32 matrix of `rows` × `dim`.
pub fn header(rows: u64, dim: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(b"\x93NUMPY\x01\x00");
    let len = (HEADER - 10) as u16;
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    assert!(h.len() < HEADER, "an npy header of two integers fits");
    h.resize(HEADER - 1, b' ');
    h.push(b'\n');
    h
}

/// Streams rows into the matrix and its sidecar.
pub struct NpyTiles {
    npy: BufWriter<File>,
    csv: BufWriter<File>,
    rows: u64,
    expected: u64,
    dim: usize,
}

impl NpyTiles {
    pub fn new(mut npy: BufWriter<File>, mut csv: BufWriter<File>, s: &Survey) -> Result<NpyTiles> {
        npy.write_all(&header(s.tiles, s.dim))?;
        csv.write_all(b"row,tile,z,x,y,model_version,sequence,computed_at,drift\n")?;
        Ok(NpyTiles {
            npy,
            csv,
            rows: 0,
            expected: s.tiles,
            dim: s.dim,
        })
    }

    pub fn push(&mut self, t: TileId, e: &TileEmbedding) -> Result<()> {
        super::tiles::check_width(t, e.vector.len(), self.dim)?;
        if self.rows == self.expected {
            bail!(
                "more tiles than the export's first pass counted ({})",
                self.expected
            );
        }
        for x in &e.vector {
            self.npy.write_all(&x.to_le_bytes())?;
        }
        writeln!(
            self.csv,
            "{},{t},{},{},{},{},{},{},{}",
            self.rows,
            t.z,
            t.x,
            t.y,
            e.model_version,
            e.sequence,
            crate::publish::messages::rfc3339(e.computed_at),
            e.drift.map(|d| d.to_string()).unwrap_or_default()
        )?;
        self.rows += 1;
        Ok(())
    }

    /// Both files, flushed; the rows must be the surveyed ones.
    pub fn finish(self) -> Result<(File, File)> {
        if self.rows != self.expected {
            bail!(
                "the export wrote {} tiles where its first pass counted {}",
                self.rows,
                self.expected
            );
        }
        let npy = self
            .npy
            .into_inner()
            .map_err(|e| e.into_error())
            .context("writing the .npy file")?;
        let csv = self
            .csv
            .into_inner()
            .map_err(|e| e.into_error())
            .context("writing the tiles CSV")?;
        Ok((npy, csv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_numpy_v1_and_fixed_length() {
        for (rows, dim) in [(0u64, 0usize), (1, 256), (u64::MAX, usize::MAX)] {
            let h = header(rows, dim);
            assert_eq!(h.len(), HEADER);
            assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
            assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize, HEADER - 10);
            assert_eq!(*h.last().unwrap(), b'\n');
            let text = std::str::from_utf8(&h[10..]).unwrap();
            assert!(
                text.contains(&format!("'shape': ({rows}, {dim}), ")),
                "{text}"
            );
        }
    }
}
