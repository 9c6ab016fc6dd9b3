//! An incremental checker of a chunked body (RFC 9112 §7.1), for a proxy that forwards the
//! chunked bytes as they are: fed what has arrived, it says how much of it it has read, which
//! part of that is chunk data, and when the body has ended, and refuses what is malformed.
//!
//! ```text
//! chunked-body = *chunk last-chunk trailer-section CRLF
//! chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
//! last-chunk   = 1*"0" [ chunk-ext ] CRLF
//! ```
//!
//! The same shapes as hyper's decoder (what the agent forwards today) are refused: a size that is
//! not hex or does not fit in 64 bits, a line end that is not CRLF (a bare LF too: §7.1 has no
//! leniency for it), data not followed by CRLF, over [`MAX_EXTENSIONS`] bytes of extensions
//! and over [`MAX_TRAILERS`] of trailers. Like hyper, spaces and tabs may follow the size, and
//! an extension is any bytes up to the CR. Stricter than hyper: a trailer line must be
//! `name:value` with a token name (§5.1), since a trailer is forwarded as sent.
use std::fmt;
use std::ops::Range;

/// Most bytes of chunk extensions in one body (hyper's limit, 16 KiB).
pub const MAX_EXTENSIONS: u64 = 16 * 1024;
/// Most bytes of trailer lines in one body (16 KiB).
pub const MAX_TRAILERS: u64 = 16 * 1024;

/// Why a chunked body was refused. It is the sender's fault: 400 for a client's body, 502 for
/// an upstream's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A chunk size that is missing or not hex.
    InvalidSize,
    /// A chunk size of 2^64 or more.
    SizeOverflow,
    /// A line that does not end in CRLF, or chunk data not followed by CRLF.
    InvalidLineEnd,
    /// Over [`MAX_EXTENSIONS`] bytes of extensions.
    ExtensionsTooLong,
    /// A trailer line that is not `name: value`.
    InvalidTrailer,
    /// Over [`MAX_TRAILERS`] bytes of trailers.
    TrailersTooLong,
}

impl Error {
    /// A short reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidSize => "invalid chunk size",
            Error::SizeOverflow => "chunk size too large",
            Error::InvalidLineEnd => "chunk line not ended by CRLF",
            Error::ExtensionsTooLong => "chunk extensions too long",
            Error::InvalidTrailer => "invalid trailer line",
            Error::TrailersTooLong => "trailers too long",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for Error {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first digit of a size.
    SizeStart,
    /// In the size's digits.
    Size,
    /// Spaces or tabs after the size.
    SizeSpace,
    /// In an extension, up to the CR.
    Extension,
    /// After the size line's CR.
    SizeLf,
    /// In chunk data, this many bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// What one [`Decoder::decode`] call read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input read (forward them); the caller feeds the rest again.
    pub consumed: usize,
    /// The chunk data among them, a range of the input (its end is `consumed`).
    pub data: Option<Range<usize>>,
    /// The body ended with the last byte read.
    pub done: bool,
}

/// The state of one chunked body being read.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    size: u64,
    extensions: u64,
    trailers: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            state: State::SizeStart,
            size: 0,
            extensions: 0,
            trailers: 0,
        }
    }

    /// Whether the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads `input` up to the end of its first run of chunk data, or the body's end, or the
    /// input's end. Call again with the rest (`&input[step.consumed..]`) until it is used up;
    /// bytes after the body's end are not read.
    pub fn decode(&mut self, input: &[u8]) -> Result<Step, Error> {
        let mut i = 0;
        while i < input.len() {
            if let State::Data(left) = self.state {
                let n = left.min((input.len() - i) as u64) as usize;
                let left = left - n as u64;
                self.state = if left == 0 {
                    State::DataCr
                } else {
                    State::Data(left)
                };
                return Ok(Step {
                    consumed: i + n,
                    data: Some(i..i + n),
                    done: false,
                });
            }
            if self.state == State::Done {
                break;
            }
            self.byte(input[i])?;
            i += 1;
            if self.state == State::Done {
                break;
            }
        }
        Ok(Step {
            consumed: i,
            data: None,
            done: self.state == State::Done,
        })
    }

    /// One byte of framing.
    fn byte(&mut self, b: u8) -> Result<(), Error> {
        use State::*;
        self.state = match (self.state, b) {
            (SizeStart | Size, _) if b.is_ascii_hexdigit() => {
                let digit = (b as char).to_digit(16).expect("a hex digit") as u64;
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(digit))
                    .ok_or(Error::SizeOverflow)?;
                Size
            }
            (SizeStart, _) => return Err(Error::InvalidSize),
            (Size | SizeSpace, b' ' | b'\t') => SizeSpace,
            (Size | SizeSpace, b';') => self.extension()?,
            (Size | SizeSpace | Extension, b'\r') => SizeLf,
            (Size | SizeSpace, b'\n') => return Err(Error::InvalidLineEnd),
            (Size | SizeSpace, _) => return Err(Error::InvalidSize),
            (Extension, b'\n') => return Err(Error::InvalidLineEnd),
            (Extension, _) => self.extension()?,
            (SizeLf, b'\n') if self.size == 0 => TrailerStart,
            (SizeLf, b'\n') => Data(std::mem::take(&mut self.size)),
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => SizeStart,
            (TrailerLf, b'\n') => TrailerStart,
            (EndLf, b'\n') => Done,
            (SizeLf | DataCr | DataLf | TrailerLf | EndLf, _) => return Err(Error::InvalidLineEnd),
            (TrailerStart, b'\r') => EndLf,
            (TrailerStart | TrailerName | TrailerValue, b'\n') => {
                return Err(Error::InvalidLineEnd)
            }
            (TrailerStart | TrailerName, _) if is_token(b) => self.trailer(TrailerName)?,
            (TrailerName, b':') => self.trailer(TrailerValue)?,
            (TrailerStart | TrailerName, _) => return Err(Error::InvalidTrailer),
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, b'\t') => self.trailer(TrailerValue)?,
            (TrailerValue, _) if b < b' ' || b == 0x7f => return Err(Error::InvalidTrailer),
            (TrailerValue, _) => self.trailer(TrailerValue)?,
            (Data(_) | Done, _) => unreachable!("data and the end are not framing bytes"),
        };
        Ok(())
    }

    fn extension(&mut self) -> Result<State, Error> {
        self.extensions += 1;
        if self.extensions > MAX_EXTENSIONS {
            return Err(Error::ExtensionsTooLong);
        }
        Ok(State::Extension)
    }

    fn trailer(&mut self, next: State) -> Result<State, Error> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(Error::TrailersTooLong);
        }
        Ok(next)
    }
}

/// A token byte (RFC 9110 §5.6.2).
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The data of `body` fed `split` bytes at a time, and where the body ended.
    fn decode(body: &[u8], split: usize) -> Result<(Vec<u8>, Option<usize>), Error> {
        let mut d = Decoder::new();
        let mut data = Vec::new();
        let mut at = 0;
        while at < body.len() {
            let end = (at + split).min(body.len());
            let mut piece = &body[at..end];
            let mut base = at;
            while !piece.is_empty() {
                let step = d.decode(piece)?;
                assert!(step.consumed <= piece.len());
                if let Some(r) = step.data {
                    assert_eq!(r.end, step.consumed);
                    data.extend_from_slice(&piece[r]);
                }
                if step.done {
                    assert!(d.is_done());
                    return Ok((data, Some(base + step.consumed)));
                }
                assert!(step.consumed > 0 || piece.is_empty());
                piece = &piece[step.consumed..];
                base += step.consumed;
            }
            at = end;
        }
        Ok((data, None))
    }

    #[test]
    fn bodies_in_any_split() {
        let body = b"5\r\nhello\r\n1;a=b\r\n \r\nA \r\n0123456789\r\n000;x\r\nX-T: 1\r\n\r\nNEXT";
        for split in 1..body.len() {
            let (data, end) = decode(body, split).unwrap();
            assert_eq!(data, b"hello 0123456789", "split {split}");
            assert_eq!(end, Some(body.len() - 4), "split {split}");
        }
        assert_eq!(decode(b"0\r\n\r\n", 100).unwrap(), (vec![], Some(5)));
        assert_eq!(decode(b"5\r\nhel", 100).unwrap(), (b"hel".to_vec(), None));
    }

    #[test]
    fn malformed_bodies() {
        for (body, e) in [
            (&b"z\r\nhello\r\n0\r\n\r\n"[..], Error::InvalidSize),
            (b"\r\n", Error::InvalidSize),
            (b"5x\r\n", Error::InvalidSize),
            (
                b"10000000000000000\r\nhello\r\n0\r\n\r\n",
                Error::SizeOverflow,
            ),
            (b"5\r\nhelloXX0\r\n\r\n", Error::InvalidLineEnd),
            (b"5\nhello\n0\n\n", Error::InvalidLineEnd),
            (b"5\r\nhello\n0\r\n\r\n", Error::InvalidLineEnd),
            (b"5;x\nhello", Error::InvalidLineEnd),
            (b"5\r\nhello\r\n0\r\n\n", Error::InvalidLineEnd),
            (b"0\r\nX-T 1\r\n\r\n", Error::InvalidTrailer),
            (b"0\r\n folded\r\n\r\n", Error::InvalidTrailer),
            (b"0\r\nX: \x01\r\n\r\n", Error::InvalidTrailer),
            (b"0\r\nX: 1\n\r\n", Error::InvalidLineEnd),
        ] {
            assert_eq!(
                decode(body, 100),
                Err(e),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        // 16 hex digits fit; leading zeros do not count.
        let mut d = Decoder::new();
        assert!(d.decode(b"ffffffffffffffff\r\n").is_ok());
        assert!(Decoder::new().decode(b"00000000000000000001\r\n").is_ok());
        let long_ext = format!("1;{}\r\n", "e".repeat(MAX_EXTENSIONS as usize));
        assert_eq!(
            Decoder::new().decode(long_ext.as_bytes()),
            Err(Error::ExtensionsTooLong)
        );
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "t".repeat(MAX_TRAILERS as usize));
        assert_eq!(
            Decoder::new().decode(long_trailer.as_bytes()),
            Err(Error::TrailersTooLong)
        );
        assert_eq!(Error::SizeOverflow.to_string(), "chunk size too large");
    }
}
