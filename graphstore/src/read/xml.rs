//! Streaming XML machinery shared by the OSM and osmChange readers: the event
//! loop with positions, and the parsing of `<node>`, `<way>` and `<relation>`
//! with their children.

use std::borrow::Cow;
use std::io::Read;

use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, XmlVersion};

use super::error::{Codec, ReadError, TextPos};
use super::source::{SourceFailure, TrackedReader};
use super::values::{parse_coordinate, parse_timestamp};
use super::{ElementLimits, UNDEFINED_COORD};
use crate::element::{Element, ElementType, Member, Meta, Node, Relation, Tags, Way};

/// The events that matter to OSM files; whitespace, comments, the XML
/// declaration and processing instructions are skipped.
pub(crate) enum Ev<'b> {
    Start(BytesStart<'b>),
    Empty(BytesStart<'b>),
    /// An end tag; quick-xml has checked that it matches its start tag.
    End,
    Eof,
}

/// A pull parser over an OSM XML stream that knows where it is.
pub(crate) struct XmlInput<'a> {
    file: &'a str,
    reader: Reader<TrackedReader<'a>>,
    buf: Vec<u8>,
    limits: ElementLimits,
    /// Whitespace consumed beneath the parser (between events), which its
    /// own offsets do not count.
    skipped: u64,
}

impl<'a> XmlInput<'a> {
    /// `raw` is the file's bytes, decompressed here according to `codec`;
    /// at most `limit` decompressed bytes are read.
    pub(crate) fn new(
        file: &'a str,
        raw: impl Read + 'a,
        codec: Option<Codec>,
        limit: u64,
        limits: ElementLimits,
    ) -> Self {
        XmlInput {
            file,
            reader: Reader::from_reader(TrackedReader::new(
                raw,
                codec,
                limit,
                limits.max_event_bytes,
            )),
            buf: Vec::with_capacity(1024),
            limits,
            skipped: 0,
        }
    }

    pub(crate) fn file(&self) -> &'a str {
        self.file
    }

    /// Bytes the reader holds beyond the input itself: the event buffer and
    /// the newline offsets of the current event.
    #[cfg(test)]
    pub(crate) fn kept_bytes(&self) -> usize {
        self.buf.capacity() + self.reader.get_ref().newline_capacity() * 4
    }

    /// Reads the next significant event and hands it to `f` with the
    /// position of its first byte. (A callback rather than a returned event,
    /// because the event borrows the parser's buffer.)
    pub(crate) fn next_with<T>(
        &mut self,
        f: impl FnOnce(TextPos, Ev<'_>) -> Result<T, ReadError>,
    ) -> Result<T, ReadError> {
        self.next_event(false, f)
    }

    /// [`Self::next_with`], skipping text too if `skip_text`.
    fn next_event<T>(
        &mut self,
        skip_text: bool,
        f: impl FnOnce(TextPos, Ev<'_>) -> Result<T, ReadError>,
    ) -> Result<T, ReadError> {
        loop {
            self.buf.clear();
            // A buffer grown by a long event is not kept for the next ones.
            if self.buf.capacity() > 1 << 20 {
                self.buf = Vec::with_capacity(1024);
            }
            let source = self.reader.get_mut();
            source.mark();
            // Whitespace between events never reaches the parser (which
            // would buffer it, however long, as one text event). Not before
            // the first event: the parser looks for a BOM and the XML
            // declaration there.
            if source.consumed() > 0 {
                match source.skip_whitespace() {
                    Ok(n) => self.skipped += n,
                    Err(_) => {
                        let at = source.position(source.consumed());
                        return Err(self.source_error(at));
                    }
                }
            }
            let source = self.reader.get_mut();
            let at = source.position(source.consumed());
            let event = match self.reader.read_event_into(&mut self.buf) {
                Ok(event) => event,
                Err(err) => return Err(self.convert_error(err, at)),
            };
            let ev = match event {
                Event::Start(e) => Ev::Start(e),
                Event::Empty(e) => Ev::Empty(e),
                Event::End(_) => Ev::End,
                Event::Eof => Ev::Eof,
                Event::Text(t) if t.bytes().all(|b| b.is_ascii_whitespace()) => continue,
                Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => continue,
                Event::Text(_) | Event::CData(_) | Event::GeneralRef(_) if skip_text => continue,
                Event::Text(_) | Event::CData(_) | Event::GeneralRef(_) => {
                    return Err(self.error(at, "unexpected text between elements".to_owned()));
                }
            };
            return f(at, ev);
        }
    }

    /// An [`ReadError::Xml`] at `at`.
    pub(crate) fn error(&self, at: TextPos, message: String) -> ReadError {
        xml_error(self.file, at, message)
    }

    /// The error of a failed read of the source beneath the parser.
    fn source_error(&mut self, event_start: TextPos) -> ReadError {
        let file = self.file.to_owned();
        match self.reader.get_mut().take_failure() {
            Some(SourceFailure::Io(source)) => ReadError::Io { file, source },
            Some(SourceFailure::Decoder {
                codec,
                offset,
                error,
            }) => ReadError::Compression {
                file,
                codec,
                offset,
                source: error,
            },
            Some(SourceFailure::TooLarge { limit }) => ReadError::TooLarge { file, limit },
            Some(SourceFailure::EventTooLarge { limit }) => ReadError::Limit {
                file,
                at: event_start,
                what: "one XML tag, comment or text".to_owned(),
                limit,
                setting: "bytes per XML event, ElementLimits::max_event_bytes",
            },
            None => ReadError::Io {
                file,
                source: std::io::Error::other("read failed"),
            },
        }
    }

    fn convert_error(&mut self, err: quick_xml::Error, event_start: TextPos) -> ReadError {
        match err {
            quick_xml::Error::Io(io) => {
                let failure = self.reader.get_mut().take_failure();
                match failure {
                    Some(f) => {
                        // Put it back for source_error.
                        self.reader.get_mut().restore_failure(f);
                        self.source_error(event_start)
                    }
                    None => ReadError::Io {
                        file: self.file.to_owned(),
                        source: std::io::Error::new(io.kind(), io.to_string()),
                    },
                }
            }
            quick_xml::Error::Syntax(_) | quick_xml::Error::IllFormed(_) => {
                let offset = self.reader.error_position() + self.skipped;
                let at = self.reader.get_ref().position(offset);
                xml_error(self.file, at, err.to_string())
            }
            other => xml_error(self.file, event_start, other.to_string()),
        }
    }

    /// After the start tag of an element this reader does not use: skips
    /// everything up to and including its end tag.
    pub(crate) fn skip_element(&mut self) -> Result<(), ReadError> {
        let mut depth = 1usize;
        while depth > 0 {
            let file = self.file;
            depth = self.next_event(true, |at, ev| match ev {
                Ev::Start(_) => Ok(depth + 1),
                Ev::Empty(_) => Ok(depth),
                Ev::End => Ok(depth - 1),
                Ev::Eof => Err(unexpected_eof(file, at)),
            })?;
        }
        Ok(())
    }

    /// After the root's end tag: nothing but whitespace and comments may follow.
    pub(crate) fn expect_eof(&mut self) -> Result<(), ReadError> {
        let file = self.file;
        self.next_with(|at, ev| match ev {
            Ev::Eof => Ok(()),
            _ => Err(xml_error(
                file,
                at,
                "content after the end of the root element".to_owned(),
            )),
        })
    }

    /// Reads the children of an object whose start tag gave `head` (only if
    /// it was `<x ...>` rather than `<x .../>`), up to its end tag.
    pub(crate) fn read_body(&mut self, head: &Head) -> Result<Body, ReadError> {
        let mut body = Body::default();
        let file = self.file;
        let limits = self.limits;
        let start = self.reader.get_ref().consumed();
        loop {
            let used = self.reader.get_ref().consumed() - start;
            let child = self.next_with(|at, ev| {
                let (e, open) = match ev {
                    Ev::End => return Ok(None),
                    Ev::Eof => return Err(unexpected_eof(file, at)),
                    Ev::Start(e) => (e, true),
                    Ev::Empty(e) => (e, false),
                };
                let limit = |what: &str, limit: u64, setting: &'static str| ReadError::Limit {
                    file: file.to_owned(),
                    at,
                    what: format!("{} of {}", what, head.describe()),
                    limit,
                    setting,
                };
                if used > limits.max_element_bytes {
                    return Err(limit(
                        "the size",
                        limits.max_element_bytes,
                        "bytes per element, ElementLimits::max_element_bytes",
                    ));
                }
                parse_child(file, at, head, &e, &mut body)?;
                if body.tags.len() > limits.max_tags {
                    return Err(limit(
                        "the tag count",
                        limits.max_tags as u64,
                        "tags per element, ElementLimits::max_tags",
                    ));
                }
                if body.refs.len() > limits.max_way_nodes {
                    return Err(limit(
                        "the node count",
                        limits.max_way_nodes as u64,
                        "nodes per way, ElementLimits::max_way_nodes",
                    ));
                }
                if body.members.len() > limits.max_members {
                    return Err(limit(
                        "the member count",
                        limits.max_members as u64,
                        "members per relation, ElementLimits::max_members",
                    ));
                }
                Ok(Some((at, open)))
            })?;
            match child {
                None => return Ok(body),
                // `<tag k="a" v="b"></tag>`: legal, if unusual.
                Some((at, true)) => self.next_with(|_, ev| match ev {
                    Ev::End => Ok(()),
                    _ => Err(xml_error(
                        file,
                        at,
                        format!("{}: child element has content", head.describe()),
                    )),
                })?,
                Some((_, false)) => {}
            }
        }
    }
}

pub(crate) fn xml_error(file: &str, at: TextPos, message: String) -> ReadError {
    ReadError::Xml {
        file: file.to_owned(),
        at,
        message,
    }
}

pub(crate) fn unexpected_eof(file: &str, at: TextPos) -> ReadError {
    xml_error(
        file,
        at,
        "the document ends before its elements are closed (truncated file?)".to_owned(),
    )
}

/// The object kind an element name stands for.
pub(crate) fn object_kind(name: &str) -> Option<ElementType> {
    match name {
        "node" => Some(ElementType::Node),
        "way" => Some(ElementType::Way),
        "relation" => Some(ElementType::Relation),
        _ => None,
    }
}

/// The attributes of an object's start tag.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) kind: ElementType,
    pub(crate) at: TextPos,
    pub(crate) id: i64,
    /// `None` if the attribute is absent.
    pub(crate) version: Option<u32>,
    /// Seconds since the epoch; 0 if absent.
    pub(crate) timestamp: i64,
    /// Validated latitude and longitude, if both were given.
    pub(crate) location: Option<(i32, i32)>,
    pub(crate) visible: bool,
}

impl Head {
    /// `node 123`, for error messages.
    pub(crate) fn describe(&self) -> String {
        format!("{} {}", self.kind.xml_name(), self.id)
    }

    /// An error about this object.
    pub(crate) fn missing(&self, file: &str, attribute: &'static str) -> ReadError {
        ReadError::MissingAttribute {
            file: file.to_owned(),
            at: self.at,
            element: self.describe(),
            attribute,
        }
    }

    /// The object, given its children. A node without location gets
    /// [`UNDEFINED_COORD`]; callers decide whether that is allowed.
    pub(crate) fn into_element(self, body: Body) -> Element {
        let meta = Meta {
            version: self.version.unwrap_or(0),
            timestamp: self.timestamp,
        };
        match self.kind {
            ElementType::Node => {
                let (lat, lon) = self.location.unwrap_or((UNDEFINED_COORD, UNDEFINED_COORD));
                Element::Node(Node {
                    id: self.id,
                    meta,
                    lat,
                    lon,
                    tags: body.tags,
                })
            }
            ElementType::Way => Element::Way(Way {
                id: self.id,
                meta,
                refs: body.refs,
                tags: body.tags,
            }),
            ElementType::Relation => Element::Relation(Relation {
                id: self.id,
                meta,
                members: body.members,
                tags: body.tags,
            }),
        }
    }
}

/// The children of an object.
#[derive(Debug, Default)]
pub(crate) struct Body {
    pub(crate) tags: Tags,
    pub(crate) refs: Vec<i64>,
    pub(crate) members: Vec<Member>,
}

/// An attribute's value with entities resolved and whitespace normalised as
/// XML requires (what expat, and so osmium, returns).
fn attr_value<'v>(
    file: &str,
    at: TextPos,
    attr: &quick_xml::events::attributes::Attribute<'v>,
) -> Result<Cow<'v, str>, ReadError> {
    attr.normalized_value(XmlVersion::Implicit1_0)
        .map_err(|e| xml_error(file, at, format!("attribute `{}`: {e}", attr.key.as_ref())))
}

/// Parses the start tag of a `<node>`, `<way>` or `<relation>`.
///
/// Everything present is checked, whatever the context: an unparsable
/// version or coordinate is an error even where it would not be needed.
pub(crate) fn parse_head(
    file: &str,
    at: TextPos,
    kind: ElementType,
    e: &BytesStart<'_>,
) -> Result<Head, ReadError> {
    let mut id = None;
    let mut version = None;
    let mut timestamp = None;
    let mut lat = None;
    let mut lon = None;
    let mut visible = None;
    for attr in e.attributes() {
        let attr = attr.map_err(|err| xml_error(file, at, err.to_string()))?;
        let slot = match attr.key.as_ref() {
            "id" => &mut id,
            "version" => &mut version,
            "timestamp" => &mut timestamp,
            "lat" => &mut lat,
            "lon" => &mut lon,
            "visible" => &mut visible,
            _ => continue,
        };
        *slot = Some(attr_value(file, at, &attr)?);
    }

    let unnamed = || format!("{} (without id)", kind.xml_name());
    let Some(id_text) = id else {
        return Err(ReadError::MissingAttribute {
            file: file.to_owned(),
            at,
            element: unnamed(),
            attribute: "id",
        });
    };
    let id: i64 = id_text.parse().map_err(|_| ReadError::InvalidAttribute {
        file: file.to_owned(),
        at,
        element: unnamed(),
        attribute: "id",
        value: id_text.clone().into_owned(),
        reason: "not an integer",
    })?;
    let element = || format!("{} {id}", kind.xml_name());
    let invalid =
        |attribute: &'static str, value: &str, reason: &'static str| ReadError::InvalidAttribute {
            file: file.to_owned(),
            at,
            element: element(),
            attribute,
            value: value.to_owned(),
            reason,
        };

    let version = match version {
        None => None,
        Some(v) => Some(
            v.parse::<u32>()
                .map_err(|_| invalid("version", &v, "not a non-negative integer"))?,
        ),
    };
    let timestamp = match timestamp {
        None => 0,
        Some(t) => parse_timestamp(&t)
            .ok_or_else(|| invalid("timestamp", &t, "not an ISO 8601 UTC timestamp"))?,
    };
    let visible = match visible.as_deref() {
        None | Some("true") => true,
        Some("false") => false,
        Some(other) => return Err(invalid("visible", other, "must be true or false")),
    };
    let bad_coordinates = |detail: String| ReadError::BadCoordinates {
        file: file.to_owned(),
        at,
        element: element(),
        detail,
    };
    let location = match (lat, lon) {
        (None, None) => None,
        (Some(lat), Some(lon)) if kind == ElementType::Node => {
            let lat = parse_degrees(&lat, "lat", 90).map_err(bad_coordinates)?;
            let lon = parse_degrees(&lon, "lon", 180).map_err(bad_coordinates)?;
            Some((lat, lon))
        }
        (Some(_), Some(_)) => None,
        (Some(_), None) => return Err(bad_coordinates("lat without lon".to_owned())),
        (None, Some(_)) => return Err(bad_coordinates("lon without lat".to_owned())),
    };
    Ok(Head {
        kind,
        at,
        id,
        version,
        timestamp,
        location,
        visible,
    })
}

/// Parses one coordinate and checks it against ±`max_degrees`.
fn parse_degrees(text: &str, name: &str, max_degrees: i64) -> Result<i32, String> {
    let value = parse_coordinate(text).ok_or_else(|| format!("{name} {text:?} is not a number"))?;
    let max = max_degrees * 10_000_000;
    if !(-max..=max).contains(&value) {
        return Err(format!(
            "{name} {text:?} is outside [-{max_degrees}, {max_degrees}]"
        ));
    }
    // In range, so it fits: |value| <= 1.8e9 < i32::MAX.
    i32::try_from(value).map_err(|_| format!("{name} {text:?} is out of range"))
}

/// Parses one child of the object `head` into `body`.
fn parse_child(
    file: &str,
    at: TextPos,
    head: &Head,
    e: &BytesStart<'_>,
    body: &mut Body,
) -> Result<(), ReadError> {
    let name = e.name();
    let name = name.as_ref();
    let allowed = match head.kind {
        ElementType::Node => name == "tag",
        ElementType::Way => name == "tag" || name == "nd",
        ElementType::Relation => name == "tag" || name == "member",
    };
    if !allowed {
        return Err(xml_error(
            file,
            at,
            format!("{}: unexpected child element <{name}>", head.describe()),
        ));
    }
    let element = || format!("<{name}> of {}", head.describe());

    let mut first = None;
    let mut second = None;
    let mut role = None;
    for attr in e.attributes() {
        let attr = attr.map_err(|err| xml_error(file, at, err.to_string()))?;
        let slot = match (name, attr.key.as_ref()) {
            ("tag", "k") | ("nd", "ref") | ("member", "type") => &mut first,
            ("tag", "v") | ("member", "ref") => &mut second,
            ("member", "role") => &mut role,
            _ => continue,
        };
        *slot = Some(attr_value(file, at, &attr)?);
    }
    let missing = |attribute: &'static str| ReadError::MissingAttribute {
        file: file.to_owned(),
        at,
        element: element(),
        attribute,
    };
    let parse_ref = |attribute: &'static str, text: &str| {
        text.parse::<i64>()
            .map_err(|_| ReadError::InvalidAttribute {
                file: file.to_owned(),
                at,
                element: element(),
                attribute,
                value: text.to_owned(),
                reason: "not an integer",
            })
    };
    match name {
        "tag" => {
            let k = first.ok_or_else(|| missing("k"))?;
            let v = second.ok_or_else(|| missing("v"))?;
            body.tags.push((k.into_owned(), v.into_owned()));
        }
        "nd" => {
            let r = first.ok_or_else(|| missing("ref"))?;
            body.refs.push(parse_ref("ref", &r)?);
        }
        _ => {
            let kind_text = first.ok_or_else(|| missing("type"))?;
            let kind = object_kind(&kind_text).ok_or_else(|| ReadError::InvalidAttribute {
                file: file.to_owned(),
                at,
                element: element(),
                attribute: "type",
                value: kind_text.clone().into_owned(),
                reason: "must be node, way or relation",
            })?;
            let r = second.ok_or_else(|| missing("ref"))?;
            let id = parse_ref("ref", &r)?;
            let role = role.map(Cow::into_owned).unwrap_or_default();
            body.members.push(Member { kind, id, role });
        }
    }
    Ok(())
}
