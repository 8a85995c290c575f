//! Osmosis `state.txt` files and the sequence-number-to-path mapping.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};

use super::ReplicationError;

/// One state of a replication feed: the diff numbered `sequence` brings a
/// database up to `timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplicationState {
    /// The sequence number.
    pub sequence: u64,
    /// The time the data of this state reaches, in unix seconds (UTC).
    pub timestamp: i64,
}

impl fmt::Display for ReplicationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sequence {} at {}",
            self.sequence,
            format_timestamp(self.timestamp)
        )
    }
}

/// Parses a `state.txt` as written by Osmosis, osmdbt and pyosmium.
///
/// The format is a Java properties file: `#` or `!` comments, `key=value`
/// (or `key: value`, `key value`) lines, backslash escapes such as the
/// `\:` in `timestamp=2017-03-01T07\:49\:00Z`, continuation lines, LF or CRLF
/// line ends. Only `sequenceNumber` and `timestamp` are used; other keys
/// (`txnMaxQueried` and friends from Osmosis) are ignored.
///
/// `name` says where the text came from (e.g. "state of sequence 12
/// (http://…)") and starts every error message. The changeset feed's YAML
/// state (`sequence: N`, `last_run: …`) is rejected with a message saying so,
/// since pointing the daemon at the changeset feed is an easy mistake.
pub fn parse_state(name: &str, text: &str) -> Result<ReplicationState, ReplicationError> {
    let bad = |reason: String| ReplicationError::BadState {
        what: name.to_owned(),
        reason,
    };
    if text.trim().is_empty() {
        return Err(bad("the file is empty".to_owned()));
    }
    let properties = properties(text);
    let get = |wanted: &str| {
        // Like java.util.Properties, a repeated key keeps its last value.
        properties
            .iter()
            .rev()
            .find(|(key, _)| key == wanted)
            .map(|(_, value)| value.trim())
    };

    let Some(sequence) = get("sequenceNumber") else {
        let yaml = text.trim_start().starts_with("---")
            || properties
                .iter()
                .any(|(key, _)| key == "sequence" || key == "last_run");
        return Err(bad(if yaml {
            "this is the YAML state of the changeset replication feed (`sequence:`, \
             `last_run:`), not the state.txt of a diff feed (minute, hour or day)"
                .to_owned()
        } else {
            format!(
                "no sequenceNumber= line; the file starts with {}",
                snippet(text)
            )
        }));
    };
    let sequence = sequence
        .parse::<u64>()
        .map_err(|_| bad(format!("sequenceNumber {sequence:?} is not a whole number")))?;

    let timestamp = get("timestamp").ok_or_else(|| bad("no timestamp= line".to_owned()))?;
    let timestamp = DateTime::parse_from_rfc3339(timestamp)
        .map_err(|error| {
            bad(format!(
                "timestamp {timestamp:?} is not a time like 2020-10-09T10:03:02Z ({error})"
            ))
        })?
        .timestamp();

    Ok(ReplicationState {
        sequence,
        timestamp,
    })
}

/// The path of a sequence inside a feed, without extension: 4230996 →
/// `"004/230/996"`.
///
/// Sequence numbers are zero-padded to 9 digits and split into three groups
/// of three, the layout of planet.openstreetmap.org and Geofabrik. A number
/// beyond 999,999,999 (not reached by any feed) widens the first group, as
/// Osmosis does, rather than wrapping around.
pub fn sequence_path(seq: u64) -> String {
    format!(
        "{:03}/{:03}/{:03}",
        seq / 1_000_000,
        seq / 1_000 % 1_000,
        seq % 1_000
    )
}

/// Unix seconds as RFC 3339 UTC, for messages.
pub(crate) fn format_timestamp(timestamp: i64) -> String {
    DateTime::<Utc>::from_timestamp(timestamp, 0).map_or_else(
        || format!("unix time {timestamp}"),
        |time| time.to_rfc3339_opts(SecondsFormat::Secs, true),
    )
}

/// The start of a file, quoted and escaped, for error messages about files
/// that are not state files at all (an HTML error page, binary junk).
fn snippet(text: &str) -> String {
    const MAX_CHARS: usize = 40;
    let mut start: String = text.trim_start().chars().take(MAX_CHARS).collect();
    if text.trim_start().chars().nth(MAX_CHARS).is_some() {
        start.push('…');
    }
    format!("{start:?}")
}

/// Whitespace as java.util.Properties defines it.
const WHITESPACE: [char; 3] = [' ', '\t', '\x0c'];

/// The `(key, value)` pairs of a Java properties file, unescaped, in order.
fn properties(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let line = line.trim_start_matches(WHITESPACE);
        if line.is_empty() || line.starts_with(['#', '!']) {
            continue;
        }
        // An odd number of trailing backslashes continues the line on the
        // next one, whose leading whitespace is dropped.
        let mut logical = line.to_owned();
        while (logical.len() - logical.trim_end_matches('\\').len()) % 2 == 1 {
            logical.pop();
            match lines.next() {
                Some(next) => logical.push_str(next.trim_start_matches(WHITESPACE)),
                None => break,
            }
        }
        pairs.push(split_key_value(&logical));
    }
    pairs
}

/// Splits a logical line at the first unescaped `=`, `:` or whitespace.
fn split_key_value(line: &str) -> (String, String) {
    let mut key_end = line.len();
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '=' || c == ':' || WHITESPACE.contains(&c) {
            key_end = i;
            break;
        }
    }
    let (key, rest) = line.split_at(key_end);
    let rest = rest.trim_start_matches(WHITESPACE);
    let value = rest
        .strip_prefix(['=', ':'])
        .map_or(rest, |value| value.trim_start_matches(WHITESPACE));
    (unescape(key), unescape(value))
}

/// Resolves properties escapes: `\t`, `\n`, `\r`, `\f`, `\uXXXX`, and `\x`
/// for any other `x` (which is how `\:` and `\=` work).
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\x0c'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                let decoded = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32);
                out.push(decoded.unwrap_or(char::REPLACEMENT_CHARACTER));
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::test_util::data_path;

    fn utc(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text).unwrap().timestamp()
    }

    fn parse_file(relative: &str) -> Result<ReplicationState, ReplicationError> {
        let path = data_path(relative);
        let text = std::fs::read_to_string(&path).unwrap();
        parse_state(&path.display().to_string(), &text)
    }

    fn state(sequence: u64, timestamp: &str) -> ReplicationState {
        ReplicationState {
            sequence,
            timestamp: utc(timestamp),
        }
    }

    #[test]
    fn parses_real_state_files() {
        let cases = [
            (
                "state/planet-minute-004230996.state.txt",
                state(4_230_996, "2020-10-09T10:03:02Z"),
            ),
            (
                "diffs/planet-minute/004230996.state.txt",
                state(4_230_996, "2020-10-09T10:03:02Z"),
            ),
            (
                "state/planet-day-000000964.state.txt",
                state(964, "2015-05-04T00:00:00Z"),
            ),
            (
                "state/geofabrik-central-america-3064.state.txt",
                state(3064, "2021-08-14T20:21:23Z"),
            ),
            (
                "diffs/geofabrik/central-america-3064.state.txt",
                state(3064, "2021-08-14T20:21:23Z"),
            ),
            (
                "replication/maldives/minute/state.txt",
                state(180, "2017-03-01T10:49:00Z"),
            ),
            (
                "replication/maldives/minute/000/000/000.state.txt",
                state(0, "2017-03-01T07:49:00Z"),
            ),
            (
                "replication/andorra/day/state.txt",
                state(35, "2017-02-19T00:00:00Z"),
            ),
        ];
        for (file, expected) in cases {
            assert_eq!(parse_file(file).unwrap(), expected, "{file}");
        }
    }

    #[test]
    fn parses_every_numbered_state_of_the_replicas() {
        for (dir, latest, start, interval) in [
            (
                "replication/maldives/minute",
                180,
                "2017-03-01T07:49:00Z",
                60,
            ),
            (
                "replication/andorra/day",
                35,
                "2017-01-15T00:00:00Z",
                86_400,
            ),
        ] {
            for seq in 0..=latest {
                let file = format!("{dir}/{}.state.txt", sequence_path(seq));
                let expected = ReplicationState {
                    sequence: seq,
                    timestamp: utc(start) + interval * seq as i64,
                };
                assert_eq!(parse_file(&file).unwrap(), expected, "{file}");
            }
        }
    }

    #[test]
    fn rejects_the_changeset_feed_yaml_state() {
        let err = parse_file("state/planet-changesets-004139992.state.yaml").unwrap_err();
        assert!(!err.is_retryable());
        let message = err.to_string();
        assert!(
            message.contains("planet-changesets-004139992.state.yaml"),
            "{message}"
        );
        assert!(message.contains("YAML state of the changeset"), "{message}");
    }

    #[test]
    fn rejects_garbage_with_a_message_naming_the_source_and_the_problem() {
        let name = "state of sequence 12 (http://example.org/000/000/012.state.txt)";
        for (text, expected) in [
            ("", "the file is empty"),
            (" \r\n\n", "the file is empty"),
            (
                "\n<html><head><title>502 Bad Gateway</title></head></html>",
                r#"no sequenceNumber= line; the file starts with "<html><head><title>502 Bad Gateway</titl…""#,
            ),
            ("\u{0}\u{1}\u{fffd}binary", "no sequenceNumber= line"),
            (
                "timestamp=2020-10-09T10\\:03\\:02Z\n",
                "no sequenceNumber= line",
            ),
            ("sequenceNumber=12\n", "no timestamp= line"),
            (
                "sequenceNumber=-1\ntimestamp=2020-10-09T10\\:03\\:02Z\n",
                r#"sequenceNumber "-1" is not a whole number"#,
            ),
            (
                "sequenceNumber=12x\ntimestamp=2020-10-09T10\\:03\\:02Z\n",
                r#"sequenceNumber "12x" is not a whole number"#,
            ),
            (
                "sequenceNumber=12\ntimestamp=yesterday\n",
                r#"timestamp "yesterday" is not a time"#,
            ),
            (
                "sequenceNumber=12\ntimestamp=2020-10-09T10\\:03\\:0",
                r#"timestamp "2020-10-09T10:03:0" is not a time"#,
            ),
        ] {
            let err = parse_state(name, text).unwrap_err();
            assert!(!err.is_retryable(), "{err}");
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("invalid {name}: ")),
                "{message}"
            );
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn follows_java_properties_syntax() {
        let text = "#Fri Oct 09 10:03:04 UTC 2020\r\n\
                    ! another comment\r\n\
                    \r\n\
                    txnActiveList=\r\n\
                    \t sequenceNumber = 42 \r\n\
                    time\\\r\n    stamp: 2020-10-09T10\\:03\\u003a02Z\r\n\
                    sequenceNumber\t43\r\n";
        assert_eq!(
            parse_state("inline", text).unwrap(),
            state(43, "2020-10-09T10:03:02Z")
        );
        // An escaped backslash at the end of a line does not continue it.
        assert_eq!(
            properties("a=b\\\\\nc=d"),
            [("a".into(), "b\\".into()), ("c".into(), "d".into())]
        );
        assert_eq!(
            properties("key\\=with\\:colon=v\\tw"),
            [("key=with:colon".into(), "v\tw".into())]
        );
    }

    #[test]
    fn sequence_paths_have_three_groups_of_three_digits() {
        assert_eq!(sequence_path(0), "000/000/000");
        assert_eq!(sequence_path(1), "000/000/001");
        assert_eq!(sequence_path(180), "000/000/180");
        assert_eq!(sequence_path(4_230_996), "004/230/996");
        assert_eq!(sequence_path(999_999_999), "999/999/999");
        assert_eq!(sequence_path(1_000_000_000), "1000/000/000");
    }

    #[test]
    fn displays_states_in_utc() {
        assert_eq!(
            state(180, "2017-03-01T10:49:00Z").to_string(),
            "sequence 180 at 2017-03-01T10:49:00Z"
        );
    }
}
