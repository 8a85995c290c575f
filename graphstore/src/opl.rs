//! OPL output, byte for byte as `osmium cat -f opl,add_metadata=version`
//! writes it (osmium-tool 1.15, libosmium 2.19).
//!
//! OPL is the project's reference format for comparing data: the store's
//! content, diff results and osmium's own output are compared as text, so
//! the writer has to reproduce osmium exactly, quirks included:
//!
//! - field order is `n<id> v<version> dV T<tags> x<lon> y<lat>`: tags come
//!   before the coordinates, and longitude (x) before latitude (y);
//! - `dV` (visible) is always written when any metadata is, and our elements
//!   are always visible;
//! - coordinates have up to 7 decimals with trailing zeros removed and no
//!   decimal point for whole degrees (`x7 y43.5`); an unknown location
//!   ([`UNDEFINED_COORD`]) is an empty `x y`;
//! - empty lists still write their letter (`T`, `N`, `M`);
//! - keys, values, and roles escape every character outside a fixed set as
//!   `%<hex>%` (see [`escape`]).

use std::io::{self, Write};

use crate::element::{Element, Node, Relation, Tags, Way};
use crate::read::UNDEFINED_COORD;

/// Writes one element as an OPL line, with its trailing newline.
pub fn write_element<W: Write>(out: &mut W, e: &Element) -> io::Result<()> {
    match e {
        Element::Node(n) => write_node(out, n),
        Element::Way(w) => write_way(out, w),
        Element::Relation(r) => write_relation(out, r),
    }
}

/// `n<id> v<version> dV T<tags> x<lon> y<lat>`.
pub fn write_node<W: Write>(out: &mut W, n: &Node) -> io::Result<()> {
    let mut line = String::with_capacity(64);
    start(&mut line, 'n', n.id, n.meta.version, &n.tags);
    let defined = n.lat != UNDEFINED_COORD || n.lon != UNDEFINED_COORD;
    line.push_str(" x");
    if defined {
        push_coordinate(&mut line, n.lon);
    }
    line.push_str(" y");
    if defined {
        push_coordinate(&mut line, n.lat);
    }
    line.push('\n');
    out.write_all(line.as_bytes())
}

/// `w<id> v<version> dV T<tags> Nn<ref>,n<ref>,…`.
pub fn write_way<W: Write>(out: &mut W, w: &Way) -> io::Result<()> {
    let mut line = String::with_capacity(64 + 12 * w.refs.len());
    start(&mut line, 'w', w.id, w.meta.version, &w.tags);
    line.push_str(" N");
    for (i, r) in w.refs.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push('n');
        line.push_str(&r.to_string());
    }
    line.push('\n');
    out.write_all(line.as_bytes())
}

/// `r<id> v<version> dV T<tags> M<type><id>@<role>,…`.
pub fn write_relation<W: Write>(out: &mut W, r: &Relation) -> io::Result<()> {
    let mut line = String::with_capacity(64 + 16 * r.members.len());
    start(&mut line, 'r', r.id, r.meta.version, &r.tags);
    line.push_str(" M");
    for (i, m) in r.members.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push(m.kind.letter());
        line.push_str(&m.id.to_string());
        line.push('@');
        escape(&mut line, &m.role);
    }
    line.push('\n');
    out.write_all(line.as_bytes())
}

/// The fields every object has: type and id, version, visibility, tags.
fn start(line: &mut String, letter: char, id: i64, version: u32, tags: &Tags) {
    line.push(letter);
    line.push_str(&id.to_string());
    line.push_str(" v");
    line.push_str(&version.to_string());
    line.push_str(" dV T");
    for (i, (k, v)) in tags.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        escape(line, k);
        line.push('=');
        escape(line, v);
    }
}

/// Appends a 1e-7 fixed-point coordinate as libosmium does: up to 7
/// decimals, trailing zeros (and a bare point) dropped.
fn push_coordinate(line: &mut String, value: i32) {
    if value < 0 {
        line.push('-');
    }
    let magnitude = value.unsigned_abs();
    line.push_str(&(magnitude / 10_000_000).to_string());
    let fraction = magnitude % 10_000_000;
    if fraction != 0 {
        let digits = format!("{fraction:07}");
        line.push('.');
        line.push_str(digits.trim_end_matches('0'));
    }
}

/// Appends `s` with libosmium's OPL escaping.
///
/// Characters in a fixed set pass through: printable ASCII except space,
/// `%`, `,`, `=` and `@`, plus U+00A1..U+05FF without the soft hyphen
/// U+00AD (so Latin, Greek, Cyrillic, Armenian and Hebrew stay readable).
/// Everything else, e.g. the no-break space, the en dash, Arabic (from
/// U+0600), Indic scripts, CJK and emoji, becomes `%<hex>%` with lowercase
/// digits: two for code points up to U+00FF, otherwise at least four. Above U+FFFF libosmium
/// writes each of the upper nibbles only if it is non-zero, so U+10ABCD comes
/// out as `%1abcd%`; this is reproduced. (libosmium stops at a NUL byte;
/// here it is written as `%00%` instead of losing the rest of the string.)
fn escape(line: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for c in s.chars() {
        let cp = u32::from(c);
        let plain = matches!(cp,
            0x21..=0x24 | 0x26..=0x2b | 0x2d..=0x3c | 0x3e..=0x3f | 0x41..=0x7e
                | 0xa1..=0xac | 0xae..=0x05ff);
        if plain {
            line.push(c);
            continue;
        }
        line.push('%');
        let nibble = |shift: u32| char::from(HEX[((cp >> shift) & 0xf) as usize]);
        if cp <= 0xff {
            line.push(nibble(4));
            line.push(nibble(0));
        } else {
            for shift in [28, 24, 20, 16] {
                if (cp >> shift) & 0xf != 0 {
                    line.push(nibble(shift));
                }
            }
            for shift in [12, 8, 4, 0] {
                line.push(nibble(shift));
            }
        }
        line.push('%');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::{ElementType, Member, Meta};

    fn line(e: &Element) -> String {
        let mut out = Vec::new();
        write_element(&mut out, e).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        escape(&mut out, s);
        out
    }

    #[test]
    fn escaping_follows_libosmium() {
        // libosmium's own test: "encode characters that are special in OPL".
        assert_eq!(escaped(" \n,=@"), "%20%%0a%%2c%%3d%%40%");
        assert_eq!(escaped(".-;:_#+"), ".-;:_#+");
        assert_eq!(escaped("100%"), "100%25%");
        assert_eq!(escaped("Côte d'Azur"), "Côte%20%d'Azur");
        assert_eq!(escaped("\u{ad}\u{a0}"), "%ad%%a0%");
        assert_eq!(escaped("Ω\u{5ff}\u{600}"), "Ω\u{5ff}%0600%");
        assert_eq!(escaped("\u{2013}"), "%2013%");
        assert_eq!(escaped("\u{1f680}"), "%1f680%");
        assert_eq!(escaped("\u{10abcd}"), "%1abcd%");
        assert_eq!(escaped("\u{100000}"), "%10000%");
        assert_eq!(escaped("\0"), "%00%");
    }

    #[test]
    fn coordinates() {
        let mut s = String::new();
        for v in [
            0,
            74_000_000,
            -5_000_000,
            437_370_125,
            -1_800_000_000,
            1,
            -1,
            i32::MIN,
        ] {
            push_coordinate(&mut s, v);
            s.push(' ');
        }
        assert_eq!(
            s,
            "0 7.4 -0.5 43.7370125 -180 0.0000001 -0.0000001 -214.7483648 "
        );
    }

    #[test]
    fn lines() {
        let meta = Meta {
            version: 3,
            timestamp: 0,
        };
        let node = Element::Node(Node {
            id: 17,
            meta,
            lat: 437_370_125,
            lon: 74_220_280,
            tags: vec![("name".into(), "A B".into()), ("k".into(), "".into())],
        });
        assert_eq!(
            line(&node),
            "n17 v3 dV Tname=A%20%B,k= x7.422028 y43.7370125\n"
        );
        let unknown = Element::Node(Node {
            id: 1,
            meta,
            lat: UNDEFINED_COORD,
            lon: UNDEFINED_COORD,
            tags: vec![],
        });
        assert_eq!(line(&unknown), "n1 v3 dV T x y\n");
        let way = Element::Way(Way {
            id: 5,
            meta,
            refs: vec![1, 2, -3],
            tags: vec![],
        });
        assert_eq!(line(&way), "w5 v3 dV T Nn1,n2,n-3\n");
        let empty_way = Element::Way(Way {
            id: 6,
            meta,
            refs: vec![],
            tags: vec![],
        });
        assert_eq!(line(&empty_way), "w6 v3 dV T N\n");
        let relation = Element::Relation(Relation {
            id: 9,
            meta,
            members: vec![
                Member {
                    kind: ElementType::Way,
                    id: 5,
                    role: "outer".into(),
                },
                Member {
                    kind: ElementType::Node,
                    id: 1,
                    role: "".into(),
                },
                Member {
                    kind: ElementType::Relation,
                    id: 2,
                    role: "a b".into(),
                },
            ],
            tags: vec![("type".into(), "multipolygon".into())],
        });
        assert_eq!(
            line(&relation),
            "r9 v3 dV Ttype=multipolygon Mw5@outer,n1@,r2@a%20%b\n"
        );
    }
}
