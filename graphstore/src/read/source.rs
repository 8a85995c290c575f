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
///   out of the decompressor, so a compression bomb costs bounded memory and
///   time;
/// - counts the lines of everything the parser consumed, so that errors can
///   name a line and column without keeping or re-reading the text. Newline
///   offsets are kept only since the last [`TrackedReader::mark`] (the start
///   of the current XML event), which bounds that memory by the event size.
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
    newlines: Vec<u64>,
}

impl<'a> TrackedReader<'a> {
    /// Wraps `raw` (the bytes of the file) in the decompressor for `codec`.
    pub(crate) fn new(raw: impl Read + 'a, codec: Option<Codec>, limit: u64) -> Self {
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
        }
    }

    /// The cause of the last read error, if any.
    pub(crate) fn take_failure(&mut self) -> Option<SourceFailure> {
        self.failure.take()
    }

    /// Starts a new event: forgets newline offsets before the current point.
    pub(crate) fn mark(&mut self) {
        self.mark_line += self.newlines.len() as u64;
        if let Some(&last) = self.newlines.last() {
            self.mark_line_start = last + 1;
        }
        self.newlines.clear();
        self.mark_offset = self.consumed;
    }

    /// Bytes consumed by the parser so far.
    pub(crate) fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Line and column of byte `offset`, which must lie at or after the last
    /// mark (earlier offsets report the mark's line).
    pub(crate) fn position(&self, offset: u64) -> TextPos {
        let offset = offset.max(self.mark_offset);
        let before = self.newlines.partition_point(|&nl| nl < offset);
        let line_start = match before {
            0 => self.mark_line_start,
            n => self.newlines[n - 1] + 1,
        };
        TextPos {
            line: self.mark_line + before as u64,
            column: offset - line_start + 1,
        }
    }

    fn fail(&mut self, failure: SourceFailure) -> io::Error {
        let message = match &failure {
            SourceFailure::TooLarge { .. } => "decompressed size limit exceeded",
            _ => "input failed",
        };
        self.failure = Some(failure);
        io::Error::other(message)
    }
}

impl BufRead for TrackedReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
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
        let base = self.consumed;
        for (i, &byte) in self.buf[self.pos..self.pos + amount].iter().enumerate() {
            if byte == b'\n' {
                self.newlines.push(base + i as u64);
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
