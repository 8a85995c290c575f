//! OSM XML extracts (`.osm`, `.osm.gz`, `.osm.bz2`).

use std::fs::File;
use std::path::Path;

use quick_xml::events::BytesStart;

use super::BATCH_SIZE;
use super::error::{Codec, ReadError, TextPos};
use super::values::parse_timestamp;
use super::xml::{Body, Ev, Head, XmlInput, object_kind, parse_head, unexpected_eof, xml_error};
use crate::element::{Element, ElementType, FileHeader};

/// Reads the `<osm>` start tag, and with `on_batch` all objects, in file
/// order.
pub(crate) fn read(
    path: &Path,
    file: &str,
    codec: Option<Codec>,
    on_batch: Option<&mut dyn FnMut(Vec<Element>) -> Result<(), ReadError>>,
) -> Result<FileHeader, ReadError> {
    let raw = File::open(path).map_err(|e| ReadError::io(file, e))?;
    // Extracts are trusted local files and may be far larger than any
    // sensible cap (a planet is over 1 TiB as XML), so no limit here.
    let mut input = XmlInput::new(file, raw, codec, u64::MAX, super::ElementLimits::default());

    let (header, has_body) = input.next_with(|at, ev| match ev {
        Ev::Start(e) if e.name().as_ref() == "osm" => Ok((header(file, at, &e)?, true)),
        Ev::Empty(e) if e.name().as_ref() == "osm" => Ok((header(file, at, &e)?, false)),
        Ev::Start(e) | Ev::Empty(e) => Err(xml_error(
            file,
            at,
            format!("root element is <{}>, expected <osm>", e.name().as_ref()),
        )),
        Ev::End | Ev::Eof => Err(xml_error(file, at, "no <osm> element".to_owned())),
    })?;
    let Some(on_batch) = on_batch else {
        return Ok(header);
    };
    if has_body {
        read_objects(&mut input, on_batch)?;
    }
    input.expect_eof()?;
    Ok(header)
}

/// What the next child of `<osm>` is.
enum Next {
    /// An object's start tag, and whether it has children.
    Object(Head, bool),
    /// Another element with content, e.g. an unknown extension: skipped.
    Skip,
    /// An empty element such as `<bounds/>`.
    Ignore,
    RootEnd,
}

fn read_objects(
    input: &mut XmlInput<'_>,
    on_batch: &mut dyn FnMut(Vec<Element>) -> Result<(), ReadError>,
) -> Result<(), ReadError> {
    let file = input.file();
    let mut batch = Vec::with_capacity(BATCH_SIZE);
    loop {
        let next = input.next_with(|at, ev| {
            let (e, open) = match ev {
                Ev::Start(e) => (e, true),
                Ev::Empty(e) => (e, false),
                Ev::End => return Ok(Next::RootEnd),
                Ev::Eof => return Err(unexpected_eof(file, at)),
            };
            match object_kind(e.name().as_ref()) {
                Some(kind) => Ok(Next::Object(parse_head(file, at, kind, &e)?, open)),
                None if open => Ok(Next::Skip),
                None => Ok(Next::Ignore),
            }
        })?;
        match next {
            Next::Object(head, open) => {
                let body = if open {
                    input.read_body(&head)?
                } else {
                    Body::default()
                };
                // A deleted version (history files): not part of the snapshot.
                if !head.visible {
                    continue;
                }
                if head.kind == ElementType::Node && head.location.is_none() {
                    return Err(ReadError::BadCoordinates {
                        file: file.to_owned(),
                        at: head.at,
                        element: head.describe(),
                        detail: "visible node without lat/lon".to_owned(),
                    });
                }
                batch.push(head.into_element(body));
                if batch.len() >= BATCH_SIZE {
                    on_batch(std::mem::replace(
                        &mut batch,
                        Vec::with_capacity(BATCH_SIZE),
                    ))?;
                }
            }
            Next::Skip => input.skip_element()?,
            Next::Ignore => {}
            Next::RootEnd => break,
        }
    }
    if !batch.is_empty() {
        on_batch(batch)?;
    }
    Ok(())
}

/// The replication facts of the `<osm>` start tag. Tools that write them
/// use the osmosis names; osmconvert instead writes the data's replication
/// timestamp as `timestamp` (which osmupdate reads back), so that serves as
/// a fallback.
fn header(file: &str, at: TextPos, e: &BytesStart<'_>) -> Result<FileHeader, ReadError> {
    let mut header = FileHeader::default();
    let mut fallback_timestamp = None;
    for attr in e.attributes() {
        let attr = attr.map_err(|err| xml_error(file, at, err.to_string()))?;
        let key = attr.key.as_ref();
        let attribute = match key {
            "osmosis_replication_timestamp" => "osmosis_replication_timestamp",
            "osmosis_replication_sequence_number" => "osmosis_replication_sequence_number",
            "osmosis_replication_base_url" => "osmosis_replication_base_url",
            "timestamp" => "timestamp",
            _ => continue,
        };
        let value = attr
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|err| xml_error(file, at, format!("attribute `{key}`: {err}")))?;
        let invalid = |reason| ReadError::InvalidAttribute {
            file: file.to_owned(),
            at,
            element: "<osm>".to_owned(),
            attribute,
            value: value.clone().into_owned(),
            reason,
        };
        match attribute {
            "osmosis_replication_sequence_number" => {
                header.replication_sequence = Some(
                    value
                        .parse()
                        .map_err(|_| invalid("not a non-negative integer"))?,
                );
            }
            "osmosis_replication_base_url" => {
                header.replication_base_url = Some(value.clone().into_owned());
            }
            _ => {
                let t = parse_timestamp(&value)
                    .ok_or_else(|| invalid("not an ISO 8601 UTC timestamp"))?;
                if attribute == "timestamp" {
                    fallback_timestamp = Some(t);
                } else {
                    header.replication_timestamp = Some(t);
                }
            }
        }
    }
    header.replication_timestamp = header.replication_timestamp.or(fallback_timestamp);
    Ok(header)
}
