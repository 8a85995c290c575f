//! PBF extracts (`.osm.pbf`, `.osh.pbf`).
//!
//! The file is framed here rather than by osmpbf's `BlobReader`, which takes
//! a file that ends inside a blob header for a clean end: every blob is read
//! in full or the read fails with the blob's index and offset. Blobs are then
//! decoded by osmpbf in parallel (rayon), a chunk at a time, and delivered in
//! file order, so the output does not depend on the thread count.

use std::fs::File;
use std::io::{BufReader, Cursor, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use osmpbf::{BlobReader, HeaderBlock, PrimitiveBlock, RelMemberType};
use rayon::prelude::*;

use super::error::ReadError;
use crate::element::{Element, ElementType, FileHeader, Member, Meta, Node, Relation, Tags, Way};

/// Limits from the PBF specification.
const MAX_BLOB_HEADER: usize = 64 * 1024;
const MAX_BLOB: usize = 32 * 1024 * 1024;

/// Features of the format this reader understands. Anything else listed
/// under `required_features` changes the meaning of the data.
const KNOWN_FEATURES: [&str; 4] = [
    "OsmSchema-V0.6",
    "DenseNodes",
    "HistoricalInformation",
    "LocationsOnWays",
];

/// One blob as it lies in the file: length prefix, `BlobHeader`, `Blob`.
struct Frame {
    index: u64,
    offset: u64,
    kind: String,
    bytes: Vec<u8>,
}

struct FrameReader<R> {
    inner: R,
    offset: u64,
    index: u64,
}

impl<R: Read> FrameReader<R> {
    fn error(&self, file: &str, message: String) -> ReadError {
        ReadError::Pbf {
            file: file.to_owned(),
            blob: self.index,
            offset: self.offset,
            message,
        }
    }

    /// Appends exactly `len` bytes to `bytes`, or explains what is missing.
    fn read_exact_into(
        &mut self,
        file: &str,
        bytes: &mut Vec<u8>,
        len: usize,
        what: &str,
    ) -> Result<(), ReadError> {
        let got = (&mut self.inner)
            .take(len as u64)
            .read_to_end(bytes)
            .map_err(|e| self.error(file, format!("reading {what}: {e}")))?;
        if got < len {
            return Err(self.error(
                file,
                format!("file ends inside the {what}: {got} of {len} bytes (truncated file?)"),
            ));
        }
        Ok(())
    }

    /// The next frame, or `None` at a clean end of file.
    fn next(&mut self, file: &str) -> Result<Option<Frame>, ReadError> {
        let mut bytes = Vec::with_capacity(4);
        let got = (&mut self.inner)
            .take(4)
            .read_to_end(&mut bytes)
            .map_err(|e| ReadError::io(file, e))?;
        match got {
            0 => return Ok(None),
            4 => {}
            _ => {
                return Err(self.error(
                    file,
                    format!(
                        "file ends inside a blob length prefix: {got} of 4 bytes (truncated file?)"
                    ),
                ));
            }
        }
        let header_len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if header_len > MAX_BLOB_HEADER {
            return Err(self.error(
                file,
                format!("blob header of {header_len} bytes exceeds the limit of {MAX_BLOB_HEADER} (not a PBF file?)"),
            ));
        }
        self.read_exact_into(file, &mut bytes, header_len, "blob header")?;
        let (kind, data_len) = parse_blob_header(&bytes[4..])
            .map_err(|m| self.error(file, format!("invalid blob header: {m}")))?;
        if data_len > MAX_BLOB {
            return Err(self.error(
                file,
                format!("blob of {data_len} bytes exceeds the limit of {MAX_BLOB}"),
            ));
        }
        self.read_exact_into(file, &mut bytes, data_len, "blob")?;
        let frame = Frame {
            index: self.index,
            offset: self.offset,
            kind,
            bytes,
        };
        self.index += 1;
        self.offset += frame.bytes.len() as u64;
        Ok(Some(frame))
    }
}

/// Reads a protobuf varint from `data` at `*pos`.
fn varint(data: &[u8], pos: &mut usize) -> Result<u64, &'static str> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long")
}

/// Extracts `type` (field 1) and `datasize` (field 3) from a `BlobHeader`
/// message: the framing needs only these, and osmpbf does not expose its
/// protobuf types.
fn parse_blob_header(data: &[u8]) -> Result<(String, usize), String> {
    let mut pos = 0;
    let mut kind = None;
    let mut size = None;
    while pos < data.len() {
        let key = varint(data, &mut pos)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = varint(data, &mut pos)?;
                if field == 3 {
                    size = Some(v);
                }
            }
            2 => {
                let len = usize::try_from(varint(data, &mut pos)?).map_err(|_| "bad length")?;
                let end = pos.checked_add(len).filter(|&e| e <= data.len());
                let end = end.ok_or("field runs past the header")?;
                if field == 1 {
                    let text =
                        std::str::from_utf8(&data[pos..end]).map_err(|_| "type not UTF-8")?;
                    kind = Some(text.to_owned());
                }
                pos = end;
            }
            1 => pos += 8,
            5 => pos += 4,
            _ => return Err(format!("unsupported wire type {wire}")),
        }
    }
    if pos > data.len() {
        return Err("field runs past the header".to_owned());
    }
    let kind = kind.ok_or("no type")?;
    let size = size.ok_or("no datasize")?;
    // datasize is an int32: a negative value arrives as a huge varint.
    let size = usize::try_from(size)
        .ok()
        .filter(|&s| s <= i32::MAX as usize)
        .ok_or_else(|| format!("invalid datasize {size}"))?;
    Ok((kind, size))
}

/// Opens `path` and checks and returns its header blob, leaving the reader
/// at the first data blob.
fn open(path: &Path, file: &str) -> Result<(FrameReader<BufReader<File>>, FileHeader), ReadError> {
    let raw = File::open(path).map_err(|e| ReadError::io(file, e))?;
    let mut frames = FrameReader {
        inner: BufReader::with_capacity(1 << 20, raw),
        offset: 0,
        index: 0,
    };
    let first = frames
        .next(file)?
        .ok_or_else(|| ReadError::UnsupportedFormat {
            file: file.to_owned(),
            reason: "empty file".to_owned(),
        })?;
    if first.kind != "OSMHeader" {
        return Err(frame_error(
            file,
            &first,
            format!("the first blob is {:?}, expected \"OSMHeader\"", first.kind),
        ));
    }
    let block = decode(file, &first, |blob| blob.to_headerblock())?;
    let header = header(file, &first, &block)?;
    Ok((frames, header))
}

fn frame_error(file: &str, frame: &Frame, message: String) -> ReadError {
    ReadError::Pbf {
        file: file.to_owned(),
        blob: frame.index,
        offset: frame.offset,
        message,
    }
}

/// Decodes a frame with osmpbf. Its iterators panic on some corrupt input
/// (an unknown relation member type), so a panic becomes an error too.
fn decode<T>(
    file: &str,
    frame: &Frame,
    f: impl FnOnce(&osmpbf::Blob) -> osmpbf::Result<T>,
) -> Result<T, ReadError> {
    let blob = BlobReader::new(Cursor::new(frame.bytes.as_slice()))
        .next()
        .ok_or_else(|| frame_error(file, frame, "empty blob".to_owned()))?
        .map_err(|e| frame_error(file, frame, e.to_string()))?;
    f(&blob).map_err(|e| frame_error(file, frame, e.to_string()))
}

fn header(file: &str, frame: &Frame, block: &HeaderBlock) -> Result<FileHeader, ReadError> {
    if let Some(feature) = block
        .required_features()
        .iter()
        .find(|f| !KNOWN_FEATURES.contains(&f.as_str()))
    {
        return Err(ReadError::UnsupportedFormat {
            file: file.to_owned(),
            reason: format!("PBF requires the unknown feature {feature:?}"),
        });
    }
    let replication_sequence = match block.osmosis_replication_sequence_number() {
        None => None,
        Some(n) => Some(u64::try_from(n).map_err(|_| {
            frame_error(
                file,
                frame,
                format!("negative replication sequence number {n}"),
            )
        })?),
    };
    Ok(FileHeader {
        replication_timestamp: block.osmosis_replication_timestamp(),
        replication_sequence,
        replication_base_url: block.osmosis_replication_base_url().map(str::to_owned),
    })
}

pub(crate) fn read_header(path: &Path, file: &str) -> Result<FileHeader, ReadError> {
    open(path, file).map(|(_, header)| header)
}

pub(crate) fn read(
    path: &Path,
    file: &str,
    on_batch: &mut dyn FnMut(Vec<Element>) -> Result<(), ReadError>,
) -> Result<FileHeader, ReadError> {
    let (mut frames, header) = open(path, file)?;
    // Enough blobs per chunk to keep every thread busy, few enough to bound
    // memory (a blob decodes to ~8,000 elements).
    let chunk = (rayon::current_num_threads() * 2).max(2);
    std::thread::scope(|scope| {
        let (tx, rx) = crossbeam_channel::bounded::<Result<Vec<Element>, ReadError>>(chunk);
        // Producer: reads and decodes; the caller's thread consumes, so a
        // slow consumer overlaps with decoding of the next chunk.
        scope.spawn(move || {
            loop {
                let mut blobs = Vec::with_capacity(chunk);
                let mut failure = None;
                while blobs.len() < chunk {
                    match frames.next(file) {
                        Ok(Some(frame)) => blobs.push(frame),
                        Ok(None) => break,
                        Err(e) => {
                            failure = Some(Err(e));
                            break;
                        }
                    }
                }
                let finished = blobs.len() < chunk;
                let decoded: Vec<_> = blobs.par_iter().map(|f| decode_data(file, f)).collect();
                for result in decoded.into_iter().chain(failure) {
                    let failed = result.is_err();
                    if tx.send(result).is_err() || failed {
                        return;
                    }
                }
                if finished {
                    return;
                }
            }
        });
        for result in rx {
            let elements = result?;
            if !elements.is_empty() {
                on_batch(elements)?;
            }
        }
        Ok(header)
    })
}

/// Decodes a data blob into elements; other blob types are skipped.
fn decode_data(file: &str, frame: &Frame) -> Result<Vec<Element>, ReadError> {
    match frame.kind.as_str() {
        "OSMData" => {}
        "OSMHeader" => {
            return Err(frame_error(
                file,
                frame,
                "a second OSMHeader blob".to_owned(),
            ));
        }
        // The specification says to skip unknown blob types.
        _ => return Ok(Vec::new()),
    }
    let block = decode(file, frame, |blob| blob.to_primitiveblock())?;
    catch_unwind(AssertUnwindSafe(|| convert_block(&block)))
        .unwrap_or_else(|_| Err("osmpbf panicked on this block".to_owned()))
        .map_err(|m| frame_error(file, frame, m))
}

fn string(table: &[Vec<u8>], index: i64) -> Result<&str, String> {
    let bytes = usize::try_from(index)
        .ok()
        .and_then(|i| table.get(i))
        .ok_or_else(|| format!("string table index {index} out of bounds"))?;
    std::str::from_utf8(bytes).map_err(|_| format!("string table entry {index} is not UTF-8"))
}

fn tags(table: &[Vec<u8>], pairs: impl Iterator<Item = (i64, i64)>) -> Result<Tags, String> {
    pairs
        .map(|(k, v)| Ok((string(table, k)?.to_owned(), string(table, v)?.to_owned())))
        .collect()
}

fn meta(version: Option<i32>, milli_timestamp: Option<i64>) -> Result<Meta, String> {
    let version = version.unwrap_or(0);
    Ok(Meta {
        version: u32::try_from(version).map_err(|_| format!("negative version {version}"))?,
        // As libosmium: integer division of the millisecond value.
        timestamp: milli_timestamp.map_or(0, |ms| ms / 1000),
    })
}

/// Converts a block's objects, in block order, leaving out deleted versions
/// (`visible=false`, only in history files).
fn convert_block(block: &PrimitiveBlock) -> Result<Vec<Element>, String> {
    let table = block.raw_stringtable();
    let mut out = Vec::new();
    let with_id =
        |id: i64, kind: ElementType| move |m: String| format!("{} {id}: {m}", kind.xml_name());
    for group in block.groups() {
        for n in group.nodes() {
            let info = n.info();
            if !info.visible() {
                continue;
            }
            let err = with_id(n.id(), ElementType::Node);
            out.push(Element::Node(Node {
                id: n.id(),
                meta: meta(info.version(), info.milli_timestamp()).map_err(err)?,
                lat: n.decimicro_lat(),
                lon: n.decimicro_lon(),
                tags: tags(
                    table,
                    n.raw_tags().map(|(k, v)| (i64::from(k), i64::from(v))),
                )
                .map_err(err)?,
            }));
        }
        for n in group.dense_nodes() {
            let (visible, version, milli) = match n.info() {
                Some(info) => (
                    info.visible(),
                    Some(info.version()),
                    Some(info.milli_timestamp()),
                ),
                None => (true, None, None),
            };
            if !visible {
                continue;
            }
            let err = with_id(n.id(), ElementType::Node);
            out.push(Element::Node(Node {
                id: n.id(),
                meta: meta(version, milli).map_err(err)?,
                lat: n.decimicro_lat(),
                lon: n.decimicro_lon(),
                tags: tags(
                    table,
                    n.raw_tags().map(|(k, v)| (i64::from(k), i64::from(v))),
                )
                .map_err(err)?,
            }));
        }
        for w in group.ways() {
            let info = w.info();
            if !info.visible() {
                continue;
            }
            let err = with_id(w.id(), ElementType::Way);
            out.push(Element::Way(Way {
                id: w.id(),
                meta: meta(info.version(), info.milli_timestamp()).map_err(err)?,
                refs: w.refs().collect(),
                tags: tags(
                    table,
                    w.raw_tags().map(|(k, v)| (i64::from(k), i64::from(v))),
                )
                .map_err(err)?,
            }));
        }
        for r in group.relations() {
            let info = r.info();
            if !info.visible() {
                continue;
            }
            let err = with_id(r.id(), ElementType::Relation);
            let members = r
                .members()
                .map(|m| {
                    Ok(Member {
                        kind: match m.member_type {
                            RelMemberType::Node => ElementType::Node,
                            RelMemberType::Way => ElementType::Way,
                            RelMemberType::Relation => ElementType::Relation,
                        },
                        id: m.member_id,
                        role: string(table, i64::from(m.role_sid))?.to_owned(),
                    })
                })
                .collect::<Result<_, String>>()
                .map_err(err)?;
            out.push(Element::Relation(Relation {
                id: r.id(),
                meta: meta(info.version(), info.milli_timestamp()).map_err(err)?,
                members,
                tags: tags(
                    table,
                    r.raw_tags().map(|(k, v)| (i64::from(k), i64::from(v))),
                )
                .map_err(err)?,
            }));
        }
    }
    Ok(out)
}
