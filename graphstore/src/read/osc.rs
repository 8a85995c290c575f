//! osmChange files (`.osc`, `.osc.gz`): replication diffs.

use std::io::Read;

use super::error::{Codec, ReadError, TextPos};
use super::xml::{Body, Ev, Head, XmlInput, object_kind, parse_head, unexpected_eof, xml_error};
use crate::element::{Action, Change, ElementType};

/// What the next child of `<osmChange>` is.
enum Top {
    /// An action with objects inside.
    Action(Action),
    /// An empty action such as `<delete/>`.
    EmptyAction,
    RootEnd,
}

/// What the next child of an action is.
enum Inner {
    Object(Head, bool),
    ActionEnd,
}

pub(crate) fn read(
    file: &str,
    raw: impl Read,
    codec: Option<Codec>,
    opts: &super::OscOptions,
    on_change: &mut dyn FnMut(Change) -> Result<(), ReadError>,
) -> Result<(), ReadError> {
    let mut input = XmlInput::new(file, raw, codec, opts.max_decompressed_bytes, opts.limits);
    let mut changes = 0u64;
    let max_changes = opts.max_changes;
    let mut on_change = |c: Change, at: TextPos| -> Result<(), ReadError> {
        changes += 1;
        if changes > max_changes {
            return Err(ReadError::Limit {
                file: file.to_owned(),
                at,
                what: format!(
                    "change {changes} ({} {})",
                    c.element.kind().xml_name(),
                    c.element.id()
                ),
                limit: max_changes,
                setting: "changes per diff, OscOptions::max_changes",
            });
        }
        on_change(c)
    };

    let has_body = input.next_with(|at, ev| match ev {
        Ev::Start(e) if e.name().as_ref() == "osmChange" => Ok(true),
        Ev::Empty(e) if e.name().as_ref() == "osmChange" => Ok(false),
        Ev::Start(e) | Ev::Empty(e) => Err(xml_error(
            file,
            at,
            format!(
                "root element is <{}>, expected <osmChange>",
                e.name().as_ref()
            ),
        )),
        Ev::End | Ev::Eof => Err(xml_error(file, at, "no <osmChange> element".to_owned())),
    })?;
    if has_body {
        loop {
            let top = input.next_with(|at, ev| {
                let (e, open) = match ev {
                    Ev::Start(e) => (e, true),
                    Ev::Empty(e) => (e, false),
                    Ev::End => return Ok(Top::RootEnd),
                    Ev::Eof => return Err(unexpected_eof(file, at)),
                };
                let name = e.name();
                let name = name.as_ref();
                let action = match name {
                    "create" => Action::Create,
                    "modify" => Action::Modify,
                    "delete" => Action::Delete,
                    _ if object_kind(name).is_some() => {
                        return Err(xml_error(
                            file,
                            at,
                            format!("<{name}> outside <create>, <modify> or <delete>"),
                        ));
                    }
                    _ => {
                        return Err(ReadError::UnknownAction {
                            file: file.to_owned(),
                            at,
                            action: name.to_owned(),
                        });
                    }
                };
                Ok(if open {
                    Top::Action(action)
                } else {
                    Top::EmptyAction
                })
            })?;
            match top {
                Top::Action(action) => read_action(&mut input, action, &mut on_change)?,
                Top::EmptyAction => {}
                Top::RootEnd => break,
            }
        }
    }
    input.expect_eof()
}

/// Reads the objects of one `<create>`, `<modify>` or `<delete>`, up to its
/// end tag.
fn read_action(
    input: &mut XmlInput<'_>,
    action: Action,
    on_change: &mut dyn FnMut(Change, TextPos) -> Result<(), ReadError>,
) -> Result<(), ReadError> {
    let file = input.file();
    loop {
        let inner = input.next_with(|at, ev| {
            let (e, open) = match ev {
                Ev::Start(e) => (e, true),
                Ev::Empty(e) => (e, false),
                Ev::End => return Ok(Inner::ActionEnd),
                Ev::Eof => return Err(unexpected_eof(file, at)),
            };
            let name = e.name();
            match object_kind(name.as_ref()) {
                Some(kind) => Ok(Inner::Object(parse_head(file, at, kind, &e)?, open)),
                None => Err(xml_error(
                    file,
                    at,
                    format!(
                        "unexpected <{}> inside <{}>",
                        name.as_ref(),
                        action.as_str()
                    ),
                )),
            }
        })?;
        let (head, open) = match inner {
            Inner::Object(head, open) => (head, open),
            Inner::ActionEnd => return Ok(()),
        };
        let body = if open {
            input.read_body(&head)?
        } else {
            Body::default()
        };
        // The version decides which copy of an object wins, so a change
        // without one cannot be applied safely.
        if head.version.is_none() {
            return Err(head.missing(file, "version"));
        }
        // Deletes from planet diffs carry the last location, those from
        // history-derived diffs none; either way it is not needed.
        if head.kind == ElementType::Node && action != Action::Delete && head.location.is_none() {
            return Err(ReadError::BadCoordinates {
                file: file.to_owned(),
                at: head.at,
                element: head.describe(),
                detail: format!("<{}> of a node without lat/lon", action.as_str()),
            });
        }
        let at = head.at;
        on_change(
            Change {
                action,
                element: head.into_element(body),
            },
            at,
        )?;
    }
}
