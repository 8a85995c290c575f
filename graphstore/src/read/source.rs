//! The byte source under the XML parser: decompression, a size cap, error
//! attribution and line counting.

use std::cell::Cell;
use std::io::{self, BufRead, Read};
use std::rc::Rc;

use flate2::read::MultiGzDecoder;

use super::error::{Codec, TextPos};

/// What went wrong below the XML parser. quick-xml only passes an opaque
/// `io::Error` up, so the source keeps the real cause for the error message.
#[derive(Debug)]
pub(crate) enum SourceFailure {
    /// The file itself could not be read.
    Io(io::Error),
    /// The decompressor rejected the data (truncated or corrupt stream).
    Decoder {
        codec: Codec,
        offset: u64,
        error: io::Error,
    },
    /// More than the allowed number of decompressed bytes.
    TooLarge { limit: u64 },
    /// One XML event (a tag with its attributes, a comment, a run of text)
    /// longer than the allowed number of bytes.
    EventTooLarge { limit: u64 },
}

/// Marks errors of the raw file so that they are not blamed on the
/// decompressor that passes them on.
struct RawSource<R> {
    inner: R,
    failed: Rc<Cell<bool>>,
}

impl<R: Read> Read for RawSource<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let result = self.inner.read(buf);
        if let Err(e) = &result
            && e.kind() != io::ErrorKind::Interrupted
        {
            self.failed.set(true);
        }
        result
    }
}

const BUFFER_SIZE: usize = 64 * 1024;

/// A `BufRead` over the (decompressed) text that
/// - stops with [`SourceFailure::TooLarge`] once more than `limit` bytes came
///   out of the decompressor, so a compression bomb costs bounded time;
/// - stops with [`SourceFailure::EventTooLarge`] once the current XML event
///   (since the last [`TrackedReader::mark`]) is longer than `max_event`
///   bytes: the parser copies an event into its buffer, so this bounds that
///   buffer;
/// - counts the lines of everything the parser consumed, so that errors can
///   name a line and column without keeping or re-reading the text. Newline
///   offsets are kept only within the current event (4 bytes each, so at
///   most 4 × `max_event`); whitespace between events is skipped by
///   [`TrackedReader::skip_whitespace`], which only counts lines. Memory is
///   therefore O(one event) however much whitespace a document holds.
pub(crate) struct TrackedReader<'a> {
    inner: Box<dyn Read + 'a>,
    codec: Option<Codec>,
    raw_failed: Rc<Cell<bool>>,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    pulled: u64,
    limit: u64,
    failure: Option<SourceFailure>,
    consumed: u64,
    mark_offset: u64,
    mark_line: u64,
    mark_line_start: u64,
    /// Newlines since the mark, as offsets from it.
    newlines: Vec<u32>,
    max_event: u64,
}

impl<'a> TrackedReader<'a> {
    /// Wraps `raw` (the bytes of the file) in the decompressor for `codec`.
    pub(crate) fn new(
        raw: impl Read + 'a,
        codec: Option<Codec>,
        limit: u64,
        max_event: u64,
    ) -> Self {
        let raw_failed = Rc::new(Cell::new(false));
        let raw = RawSource {
            inner: raw,
            failed: Rc::clone(&raw_failed),
        };
        let inner: Box<dyn Read + 'a> = match codec {
            None => Box::new(raw),
            Some(Codec::Gzip) => Box::new(MultiGzDecoder::new(raw)),
            Some(Codec::Bzip2) => Box::new(bzip2::read::MultiBzDecoder::new(raw)),
        };
        TrackedReader {
            inner,
            codec,
            raw_failed,
            buf: vec![0; BUFFER_SIZE].into_boxed_slice(),
            pos: 0,
            filled: 0,
            pulled: 0,
            limit,
            failure: None,
            consumed: 0,
            mark_offset: 0,
            mark_line: 1,
            mark_line_start: 0,
            newlines: Vec::new(),
            // Offsets within an event are u32 (with room for one more read).
            max_event: max_event.min(u64::from(u32::MAX) - (1 << 20)),
        }
    }

    /// The cause of the last read error, if any.
    pub(crate) fn take_failure(&mut self) -> Option<SourceFailure> {
        self.failure.take()
    }

    #[cfg(test)]
    pub(crate) fn newline_capacity(&self) -> usize {
        self.newlines.capacity()
    }

    pub(crate) fn restore_failure(&mut self, f: SourceFailure) {
        self.failure = Some(f);
    }

    /// Starts a new event: forgets newline offsets before the current point.
    pub(crate) fn mark(&mut self) {
        self.mark_line += self.newlines.len() as u64;
        if let Some(&last) = self.newlines.last() {
            self.mark_line_start = self.mark_offset + u64::from(last) + 1;
        }
        self.newlines.clear();
        self.mark_offset = self.consumed;
    }

    /// Right after [`TrackedReader::mark`]: consumes the XML whitespace that
    /// follows, counting its lines without keeping anything, and moves the
    /// mark past it. Returns the bytes skipped.
    pub(crate) fn skip_whitespace(&mut self) -> io::Result<u64> {
        debug_assert!(self.newlines.is_empty() && self.mark_offset == self.consumed);
        let mut skipped = 0u64;
        loop {
            if self.fill_buf()?.is_empty() {
                break;
            }
            let avail = &self.buf[self.pos..self.filled];
            let n = avail
                .iter()
                .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
                .unwrap_or(avail.len());
            for (i, &b) in avail[..n].iter().enumerate() {
                if b == b'\n' {
                    self.mark_line += 1;
                    self.mark_line_start = self.consumed + i as u64 + 1;
                }
            }
            self.pos += n;
            self.consumed += n as u64;
            self.mark_offset = self.consumed;
            skipped += n as u64;
            if self.pos < self.filled {
                break;
            }
        }
        Ok(skipped)
    }

    /// Bytes consumed by the parser so far.
    pub(crate) fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Line and column of byte `offset`, which must lie at or after the last
    /// mark (earlier offsets report the mark's line).
    pub(crate) fn position(&self, offset: u64) -> TextPos {
        let offset = offset.max(self.mark_offset);
        let rel = offset - self.mark_offset;
        let before = self.newlines.partition_point(|&nl| u64::from(nl) < rel);
        let line_start = match before {
            0 => self.mark_line_start,
            n => self.mark_offset + u64::from(self.newlines[n - 1]) + 1,
        };
        TextPos {
            line: self.mark_line + before as u64,
            column: offset - line_start + 1,
        }
    }

    fn fail(&mut self, failure: SourceFailure) -> io::Error {
        let message = match &failure {
            SourceFailure::TooLarge { .. } => "decompressed size limit exceeded",
            SourceFailure::EventTooLarge { .. } => "XML event size limit exceeded",
            _ => "input failed",
        };
        self.failure = Some(failure);
        io::Error::other(message)
    }
}

impl BufRead for TrackedReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.consumed - self.mark_offset > self.max_event {
            let limit = self.max_event;
            return Err(self.fail(SourceFailure::EventTooLarge { limit }));
        }
        if self.pos >= self.filled {
            let n = loop {
                match self.inner.read(&mut self.buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let failure = match self.codec {
                            Some(codec) if !self.raw_failed.get() => SourceFailure::Decoder {
                                codec,
                                offset: self.pulled,
                                error: e,
                            },
                            _ => SourceFailure::Io(e),
                        };
                        return Err(self.fail(failure));
                    }
                }
            };
            self.pulled += n as u64;
            if self.pulled > self.limit {
                let limit = self.limit;
                return Err(self.fail(SourceFailure::TooLarge { limit }));
            }
            self.pos = 0;
            self.filled = n;
        }
        Ok(&self.buf[self.pos..self.filled])
    }

    fn consume(&mut self, amount: usize) {
        let amount = amount.min(self.filled - self.pos);
        // Within an event (at most `max_event` < 4 GiB since the mark).
        let base = (self.consumed - self.mark_offset) as u32;
        for (i, &byte) in self.buf[self.pos..self.pos + amount].iter().enumerate() {
            if byte == b'\n' {
                self.newlines.push(base.wrapping_add(i as u32));
            }
        }
        self.pos += amount;
        self.consumed += amount as u64;
    }
}

impl Read for TrackedReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}
