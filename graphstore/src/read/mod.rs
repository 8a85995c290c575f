//! Readers for OSM extracts (PBF and XML) and osmChange diffs.
//!
//! All readers stream: memory stays bounded whatever the file size, and
//! objects are delivered in file order through a callback. They are strict on
//! purpose: the daemon applies diffs to a store it must keep consistent, so a
//! truncated download, a corrupt block or a half-written file has to fail
//! loudly instead of silently dropping the rest of the data. Every error
//! names the file and, where known, the position in it (see [`ReadError`]).

mod error;
mod osc;
mod osm;
mod pbf;
mod source;
mod values;
mod xml;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::element::{Change, Element, FileHeader};

pub use error::{Codec, ReadError, TextPos};

/// The latitude and longitude of a node whose location is unknown: a
/// `<delete>` in a diff derived from a history file has none. It is
/// libosmium's own marker (outside any valid coordinate), and the OPL writer
/// prints it as an empty `x`/`y` field as osmium does.
pub const UNDEFINED_COORD: i32 = i32::MAX;

/// Elements per batch delivered by the XML reader. PBF batches are the
/// file's own blocks, which hold about as many.
const BATCH_SIZE: usize = 8192;

/// The kinds of extract [`read_extract`] knows, told from the file name.
enum Format {
    Pbf,
    Xml(Option<Codec>),
}

fn extract_format(path: &Path, file: &str) -> Result<Format, ReadError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let unsupported = |reason: &str| ReadError::UnsupportedFormat {
        file: file.to_owned(),
        reason: reason.to_owned(),
    };
    if name.ends_with(".pbf") {
        return Ok(Format::Pbf);
    }
    for base in [".osm", ".osh"] {
        for (suffix, codec) in [
            ("", None),
            (".gz", Some(Codec::Gzip)),
            (".bz2", Some(Codec::Bzip2)),
        ] {
            if name.ends_with(&format!("{base}{suffix}")) {
                return Ok(Format::Xml(codec));
            }
        }
    }
    if name.contains(".osc") {
        return Err(unsupported(
            "an osmChange file is a diff, not an extract (read it with read_osc_file)",
        ));
    }
    Err(unsupported(
        "unknown file name extension (expected .osm.pbf, .pbf, .osh.pbf, .osm, .osm.gz or .osm.bz2)",
    ))
}

/// Reads only the header of an extract: enough to know where replication
/// has to start, without reading the data.
///
/// For PBF these are the header block's `osmosis_replication_*` fields. For
/// XML they are the same-named attributes of `<osm>`, or else its
/// `timestamp` attribute, where osmconvert keeps the replication timestamp.
pub fn read_header(path: &Path) -> Result<FileHeader, ReadError> {
    let file = path.display().to_string();
    match extract_format(path, &file)? {
        Format::Pbf => pbf::read_header(path, &file),
        Format::Xml(codec) => osm::read(path, &file, codec, None),
    }
}

/// Reads a whole extract and hands its objects to `on_batch` in file order,
/// a few thousand at a time; returns the header (see [`read_header`]).
///
/// The format comes from the file name: `.osm.pbf`, `.pbf` and `.osh.pbf`
/// are PBF (blobs decoded in parallel, delivered in order); `.osm`,
/// `.osm.gz` and `.osm.bz2` are OSM XML. Deleted versions (`visible=false`,
/// found in history files) are left out, so a history file yields every
/// visible version. If `on_batch` fails, reading stops and its error is
/// returned.
///
/// `on_batch` runs on the calling thread while PBF blobs are decoded on
/// rayon's global pool, so a slow consumer overlaps with decoding. (Do not
/// call this from a worker of a one-thread rayon pool: nothing would be left
/// to decode.)
pub fn read_extract(
    path: &Path,
    on_batch: &mut dyn FnMut(Vec<Element>) -> Result<(), ReadError>,
) -> Result<FileHeader, ReadError> {
    let file = path.display().to_string();
    match extract_format(path, &file)? {
        Format::Pbf => pbf::read(path, &file, on_batch),
        Format::Xml(codec) => osm::read(path, &file, codec, Some(on_batch)),
    }
}

/// Caps on one element of an XML document, so that reading costs memory in
/// proportion to one element whatever the input holds (whitespace between
/// elements costs nothing). Real OSM data stays far below each: the API
/// allows 2,000 nodes per way, 32,000 members per relation and 255
/// characters per tag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElementLimits {
    /// One XML event: a start tag with its attributes, a comment, a run of
    /// text (the parser buffers one event whole). 4 MiB: 16,000 times the
    /// longest tag value the OSM API accepts.
    pub max_event_bytes: u64,
    /// One object, from its start tag to its end tag.
    pub max_element_bytes: u64,
    /// Tags of one object.
    pub max_tags: usize,
    /// Node references of one way.
    pub max_way_nodes: usize,
    /// Members of one relation.
    pub max_members: usize,
}

impl Default for ElementLimits {
    fn default() -> Self {
        ElementLimits {
            max_event_bytes: 4 << 20,
            max_element_bytes: 64 << 20,
            max_tags: 10_000,
            max_way_nodes: 100_000,
            max_members: 1_000_000,
        }
    }
}

/// Limits for reading osmChange files, which come from a server and so are
/// not trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OscOptions {
    /// Reading fails once the decompressed text exceeds this many bytes (a
    /// defence against compression bombs; a busy planet minute is ~10 MiB,
    /// a Geofabrik daily diff of a continent a few hundred).
    pub max_decompressed_bytes: u64,
    /// Changes (objects) in one diff: a diff is applied in one batch from an
    /// in-memory overlay, so this bounds its memory (a planet minute holds
    /// about 3,300, a planet day a few million).
    pub max_changes: u64,
    pub limits: ElementLimits,
}

impl Default for OscOptions {
    fn default() -> Self {
        OscOptions {
            max_decompressed_bytes: 1 << 30,
            max_changes: 10_000_000,
            limits: ElementLimits::default(),
        }
    }
}

/// Reads an osmChange document from `input` (gzip-compressed if `gzip`) and
/// hands each change to `on_change`, in file order. `name` identifies the
/// input in errors (a path, or e.g. `sequence 123`).
///
/// The reader streams and holds one object at a time (memory O(one element),
/// within `opts.limits`, whatever the whitespace). It fails on anything
/// that could make a diff apply wrongly: malformed or truncated XML or gzip,
/// a root other than `<osmChange>`, an action other than create, modify or
/// delete, objects outside an action, a missing or invalid id or version,
/// a created or modified node without valid coordinates, and input beyond
/// a cap ([`ReadError::Limit`]: more than `max_changes` changes, an element
/// beyond [`ElementLimits`]). A deleted node
/// may lack coordinates; it then gets [`UNDEFINED_COORD`].
pub fn read_osc<R: Read>(
    name: &str,
    input: R,
    gzip: bool,
    opts: &OscOptions,
    on_change: &mut dyn FnMut(Change) -> Result<(), ReadError>,
) -> Result<(), ReadError> {
    let codec = gzip.then_some(Codec::Gzip);
    osc::read(name, input, codec, opts, on_change)
}

/// [`read_osc`] on a file; `.gz` means gzip, `.bz2` bzip2.
pub fn read_osc_file(
    path: &Path,
    opts: &OscOptions,
    on_change: &mut dyn FnMut(Change) -> Result<(), ReadError>,
) -> Result<(), ReadError> {
    let name = path.display().to_string();
    let lower = name.to_ascii_lowercase();
    let codec = if lower.ends_with(".gz") {
        Some(Codec::Gzip)
    } else if lower.ends_with(".bz2") {
        Some(Codec::Bzip2)
    } else {
        None
    };
    let raw = File::open(path).map_err(|e| ReadError::io(&name, e))?;
    osc::read(&name, raw, codec, opts, on_change)
}

#[cfg(test)]
mod tests;
