//! Chunked transfer coding (RFC 9112 §7.1) as a resumable state machine.
//!
//! The same decoder serves two jobs: decoding a client's chunked request body (the caller collects
//! the data callbacks), and finding where an upstream's chunked response ends while its bytes are
//! relayed untouched (the caller ignores them). Chunk data is skipped by length, so the cost per
//! relayed chunk is the few bytes of its size line, not its payload.

/// Longest chunk-size line (size, extensions) or trailer section accepted; bounds memory of nothing
/// but guards against a peer that never ends a line.
const MAX_LINE: u32 = 4096;
const MAX_TRAILERS: u32 = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedError {
    InvalidSize,
    InvalidFraming,
    LineTooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size { digits: u8 },
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Size being parsed, then bytes left in the current chunk.
    remaining: u64,
    line: u32,
    trailers: u32,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: State::Size { digits: 0 },
            remaining: 0,
            line: 0,
            trailers: 0,
        }
    }
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes framing from `input`, handing each piece of chunk data to `data`. Returns how many
    /// bytes belong to this body: all of `input`, or fewer when the body ended inside it.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<usize, ChunkedError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Data => {
                    let take = (input.len() - i).min(self.remaining as usize);
                    data(&input[i..i + take]);
                    i += take;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::Size { digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if digits >= 15 {
                            return Err(ChunkedError::InvalidSize);
                        }
                        let v = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.remaining = self.remaining * 16 + v;
                        self.state = State::Size { digits: digits + 1 };
                    }
                    b';' | b' ' | b'\t' if digits > 0 => {
                        self.line = 0;
                        self.state = State::Extension;
                    }
                    b'\r' if digits > 0 => self.state = State::SizeLf,
                    _ => return Err(ChunkedError::InvalidSize),
                },
                State::Extension => {
                    self.line += 1;
                    if self.line > MAX_LINE {
                        return Err(ChunkedError::LineTooLong);
                    }
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b'\n' {
                        return Err(ChunkedError::InvalidFraming);
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::InvalidFraming);
                    }
                    self.state = if self.remaining == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkedError::InvalidFraming);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::InvalidFraming);
                    }
                    self.state = State::Size { digits: 0 };
                }
                State::TrailerStart => {
                    self.state = if b == b'\r' {
                        State::FinalLf
                    } else {
                        self.trailers += 1;
                        State::TrailerLine
                    };
                }
                State::TrailerLine => {
                    self.trailers += 1;
                    if self.trailers > MAX_TRAILERS {
                        return Err(ChunkedError::LineTooLong);
                    }
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    }
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::InvalidFraming);
                    }
                    self.state = State::TrailerStart;
                }
                State::FinalLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::InvalidFraming);
                    }
                    self.state = State::Done;
                    return Ok(i + 1);
                }
                State::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(raw: &[u8], piece: usize) -> Result<(Vec<u8>, usize), ChunkedError> {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        let mut used = 0;
        for part in raw.chunks(piece) {
            used += d.feed(part, |b| out.extend_from_slice(b))?;
            if d.is_done() {
                break;
            }
        }
        assert!(d.is_done(), "not done");
        Ok((out, used))
    }

    #[test]
    fn decodes_across_every_split_point() {
        let raw =
            b"5;name=v\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for piece in 1..raw.len() {
            let (out, used) = decode_in_pieces(raw, piece).unwrap();
            assert_eq!(out, b"helloabcdefghijklmnopqrstuvwxyz");
            assert_eq!(used, raw.len() - 4, "piece {piece}");
        }
    }

    #[test]
    fn rejects_bad_framing() {
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(b"zz\r\n", |_| {}), Err(ChunkedError::InvalidSize));
        let mut d = ChunkedDecoder::default();
        assert_eq!(
            d.feed(b"3\r\nabcX", |_| {}),
            Err(ChunkedError::InvalidFraming)
        );
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(b"\r\n", |_| {}), Err(ChunkedError::InvalidSize));
        let mut d = ChunkedDecoder::default();
        assert_eq!(
            d.feed(b"1234567890abcdef0\r\n", |_| {}),
            Err(ChunkedError::InvalidSize)
        );
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(b"3\nabc", |_| {}), Err(ChunkedError::InvalidSize));
    }
}
