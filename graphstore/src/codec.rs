//! Binary encodings of keys and values in the store.
//!
//! Keys are big-endian so that RocksDB's byte order is the natural order
//! (ascending id, tiles by z/x/y); signed ids have their sign bit flipped so
//! negative ids (seen in some editors' files) sort before positive ones.
//! Values are varint-packed: a stored way costs about one byte per node ref.

use crate::element::{ElementType, Member, Meta, Node, Relation, Tags, Way};
use crate::error::StoreError;

pub fn id_key(id: i64) -> [u8; 8] {
    ((id as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn id_from_key(k: &[u8]) -> Result<i64, StoreError> {
    let b: [u8; 8] = k
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| StoreError::corrupt("id key shorter than 8 bytes"))?;
    Ok((u64::from_be_bytes(b) ^ (1 << 63)) as i64)
}

/// Key of an object of any type: the type letter then its id key.
pub fn typed_key(t: ElementType, id: i64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = t.letter() as u8;
    k[1..].copy_from_slice(&id_key(id));
    k
}

pub fn typed_from_key(k: &[u8]) -> Result<(ElementType, i64), StoreError> {
    let t = k
        .first()
        .and_then(|c| ElementType::from_letter(*c as char))
        .ok_or_else(|| StoreError::corrupt("bad object type in key"))?;
    Ok((t, id_from_key(&k[1..])?))
}

/// Concatenates two keys (for index entries such as node→way).
pub fn pair_key(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len());
    k.extend_from_slice(a);
    k.extend_from_slice(b);
    k
}

// ---- varints ---------------------------------------------------------------

pub fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn put_svarint(out: &mut Vec<u8>, v: i64) {
    put_uvarint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_uvarint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A cursor over an encoded value; every read checks bounds so a corrupt
/// record is an error, never a panic.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn uvarint(&mut self) -> Result<u64, StoreError> {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| StoreError::corrupt("truncated varint"))?;
            self.pos += 1;
            if shift >= 64 {
                return Err(StoreError::corrupt("varint too long"));
            }
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
        }
    }

    pub fn svarint(&mut self) -> Result<i64, StoreError> {
        let u = self.uvarint()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| StoreError::corrupt("truncated value"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.bytes(1)?[0])
    }

    pub fn i32(&mut self) -> Result<i32, StoreError> {
        Ok(i32::from_le_bytes(
            self.bytes(4)?.try_into().unwrap_or_default(),
        ))
    }

    pub fn f64(&mut self) -> Result<f64, StoreError> {
        Ok(f64::from_le_bytes(
            self.bytes(8)?.try_into().unwrap_or_default(),
        ))
    }

    pub fn string(&mut self) -> Result<String, StoreError> {
        let n = self.uvarint()? as usize;
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| StoreError::corrupt("invalid UTF-8 in record"))
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

fn put_meta(out: &mut Vec<u8>, m: &Meta) {
    put_uvarint(out, m.version as u64);
    put_svarint(out, m.timestamp);
}

fn get_meta(r: &mut Reader) -> Result<Meta, StoreError> {
    Ok(Meta {
        version: r.uvarint()? as u32,
        timestamp: r.svarint()?,
    })
}

fn put_tags(out: &mut Vec<u8>, tags: &Tags) {
    put_uvarint(out, tags.len() as u64);
    for (k, v) in tags {
        put_str(out, k);
        put_str(out, v);
    }
}

fn get_tags(r: &mut Reader) -> Result<Tags, StoreError> {
    let n = r.uvarint()? as usize;
    let mut tags = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        tags.push((r.string()?, r.string()?));
    }
    Ok(tags)
}

// ---- objects ---------------------------------------------------------------

pub fn encode_node(n: &Node) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + n.tags.len() * 16);
    put_meta(&mut out, &n.meta);
    out.extend_from_slice(&n.lat.to_le_bytes());
    out.extend_from_slice(&n.lon.to_le_bytes());
    put_tags(&mut out, &n.tags);
    out
}

pub fn decode_node(id: i64, v: &[u8]) -> Result<Node, StoreError> {
    let mut r = Reader::new(v);
    let meta = get_meta(&mut r)?;
    let lat = r.i32()?;
    let lon = r.i32()?;
    let tags = get_tags(&mut r)?;
    Ok(Node {
        id,
        meta,
        lat,
        lon,
        tags,
    })
}

/// Only the location of an encoded node, without decoding its tags: the hot
/// path of geometry building.
pub fn decode_node_location(v: &[u8]) -> Result<(i32, i32), StoreError> {
    let mut r = Reader::new(v);
    get_meta(&mut r)?;
    Ok((r.i32()?, r.i32()?))
}

pub fn encode_way(w: &Way) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + w.refs.len() * 3 + w.tags.len() * 16);
    put_meta(&mut out, &w.meta);
    put_uvarint(&mut out, w.refs.len() as u64);
    let mut prev = 0i64;
    for &r in &w.refs {
        put_svarint(&mut out, r.wrapping_sub(prev));
        prev = r;
    }
    put_tags(&mut out, &w.tags);
    out
}

pub fn decode_way(id: i64, v: &[u8]) -> Result<Way, StoreError> {
    let mut r = Reader::new(v);
    let meta = get_meta(&mut r)?;
    let n = r.uvarint()? as usize;
    let mut refs = Vec::with_capacity(n.min(1 << 20));
    let mut prev = 0i64;
    for _ in 0..n {
        prev = prev.wrapping_add(r.svarint()?);
        refs.push(prev);
    }
    let tags = get_tags(&mut r)?;
    Ok(Way {
        id,
        meta,
        refs,
        tags,
    })
}

pub fn encode_relation(rel: &Relation) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + rel.members.len() * 8 + rel.tags.len() * 16);
    put_meta(&mut out, &rel.meta);
    put_uvarint(&mut out, rel.members.len() as u64);
    for m in &rel.members {
        out.push(m.kind.letter() as u8);
        put_svarint(&mut out, m.id);
        put_str(&mut out, &m.role);
    }
    put_tags(&mut out, &rel.tags);
    out
}

pub fn decode_relation(id: i64, v: &[u8]) -> Result<Relation, StoreError> {
    let mut r = Reader::new(v);
    let meta = get_meta(&mut r)?;
    let n = r.uvarint()? as usize;
    let mut members = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        let kind = ElementType::from_letter(r.u8()? as char)
            .ok_or_else(|| StoreError::corrupt("bad member type"))?;
        let mid = r.svarint()?;
        let role = r.string()?;
        members.push(Member {
            kind,
            id: mid,
            role,
        });
    }
    let tags = get_tags(&mut r)?;
    Ok(Relation {
        id,
        meta,
        members,
        tags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_like_numbers() {
        let ids = [-5i64, -1, 0, 1, 7, 1 << 40];
        for w in ids.windows(2) {
            assert!(id_key(w[0]) < id_key(w[1]));
        }
        for id in ids {
            assert_eq!(id_from_key(&id_key(id)).unwrap(), id);
        }
    }

    #[test]
    fn objects_roundtrip() {
        let meta = Meta {
            version: 3,
            timestamp: 1_500_000_000,
        };
        let tags = vec![("name".to_string(), "Vaduz, Städtle".to_string())];
        let n = Node {
            id: 42,
            meta,
            lat: -471_234_567,
            lon: 95_000_001,
            tags: tags.clone(),
        };
        assert_eq!(decode_node(42, &encode_node(&n)).unwrap(), n);
        let w = Way {
            id: 9,
            meta,
            refs: vec![5, 3, 1 << 33, -2],
            tags: tags.clone(),
        };
        assert_eq!(decode_way(9, &encode_way(&w)).unwrap(), w);
        let r = Relation {
            id: 1,
            meta,
            members: vec![
                Member {
                    kind: ElementType::Way,
                    id: 9,
                    role: "outer".into(),
                },
                Member {
                    kind: ElementType::Node,
                    id: 42,
                    role: String::new(),
                },
            ],
            tags,
        };
        assert_eq!(decode_relation(1, &encode_relation(&r)).unwrap(), r);
    }

    #[test]
    fn corrupt_values_are_errors() {
        let w = encode_way(&Way {
            id: 1,
            meta: Meta::default(),
            refs: vec![1, 2, 3],
            tags: vec![],
        });
        for cut in 0..w.len() {
            assert!(decode_way(1, &w[..cut]).is_err(), "cut at {cut}");
        }
    }
}
