//! The control sockets' framing (docs/ABI.md section 12.1) as a pure state machine: a u32
//! little-endian length, then that many payload bytes. [`crate::sys::recv_frame`] and the
//! engine's non-blocking reception both feed it whatever the socket gave them, so a peer that
//! sends garbage, a huge length or half a frame meets the same rules everywhere, and those rules
//! can be fuzzed without a socket.
//!
//! The decoder asks only for the bytes the current frame still lacks, so bytes of a following
//! frame stay in the socket for whoever reads next; and it holds only the bytes that arrived, so
//! a peer announcing a large frame and sending little costs little.

/// Bytes of the length that starts every frame.
pub const HEADER: usize = 4;

/// Payload room the first [`Decoder::buffer`] call offers; later calls offer as much as has
/// arrived, so a frame's memory is at most about twice what arrived, whatever its length
/// announces, and a large frame still takes few reads.
const FIRST_CHUNK: usize = 4096;

/// A frame the decoder refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The length announces more than this side accepts.
    TooLong { len: usize, max: usize },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLong { len, max } => {
                write!(f, "control frame of {len} bytes, more than the {max} accepted here")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Reassembles frames from the bytes a stream delivers, in any pieces.
#[derive(Debug)]
pub struct Decoder {
    max: usize,
    header: [u8; HEADER],
    /// Bytes of `header` received.
    got: usize,
    /// The current frame's length, once its header is complete.
    len: Option<usize>,
    /// `payload[..filled]` arrived; the rest is room offered by `buffer`.
    payload: Vec<u8>,
    filled: usize,
}

impl Decoder {
    /// A decoder refusing frames longer than `max` payload bytes.
    pub fn new(max: usize) -> Decoder {
        Decoder { max, header: [0; HEADER], got: 0, len: None, payload: Vec::new(), filled: 0 }
    }

    /// Whether part of a frame has arrived (an end of stream now cuts a frame short).
    pub fn in_frame(&self) -> bool {
        self.got > 0
    }

    /// Bytes the current frame still lacks (of its header, then of its payload).
    pub fn wants(&self) -> usize {
        match self.len {
            None => HEADER - self.got,
            Some(len) => len - self.filled,
        }
    }

    /// Bytes of the current frame (header included) received so far.
    pub fn buffered(&self) -> usize {
        self.got + self.filled
    }

    /// Where the next bytes go: never past the current frame. Read into it, then report how
    /// many bytes came with [`Decoder::filled`].
    pub fn buffer(&mut self) -> &mut [u8] {
        let Some(len) = self.len else { return &mut self.header[self.got..] };
        let step = (len - self.filled).min(self.filled.max(FIRST_CHUNK));
        if self.payload.len() < self.filled + step {
            self.payload.resize(self.filled + step, 0);
        }
        &mut self.payload[self.filled..self.filled + step]
    }

    /// `n` bytes were written at the start of [`Decoder::buffer`] (more than it offered is
    /// taken as what it offered). Returns a complete frame's payload, or the reason the frame
    /// is refused; either way the decoder then waits for a new frame.
    pub fn filled(&mut self, n: usize) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(len) = self.len else {
            self.got += n.min(HEADER - self.got);
            if self.got < HEADER {
                return Ok(None);
            }
            let len = u32::from_le_bytes(self.header) as usize;
            if len > self.max {
                *self = Decoder::new(self.max);
                return Err(FrameError::TooLong { len, max: self.max });
            }
            self.len = Some(len);
            return Ok((len == 0).then(|| self.finish()));
        };
        self.filled += n.min(self.payload.len() - self.filled);
        Ok((self.filled == len).then(|| self.finish()))
    }

    /// Copies `bytes` in, as far as the current frame goes, and advances `bytes` past them:
    /// call again while bytes are left to read the frames after it.
    pub fn push(&mut self, bytes: &mut &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
        let room = self.buffer();
        let n = room.len().min(bytes.len());
        room[..n].copy_from_slice(&bytes[..n]);
        *bytes = &bytes[n..];
        self.filled(n)
    }

    fn finish(&mut self) -> Vec<u8> {
        let mut payload = std::mem::take(&mut self.payload);
        payload.truncate(self.filled);
        *self = Decoder::new(self.max);
        payload
    }
}

/// The bytes of one frame carrying `payload`.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_in_any_pieces() {
        let mut stream = encode(b"hello");
        stream.extend(encode(b""));
        stream.extend(encode(&[7u8; 200_000]));
        for piece in [1, 3, 4, 5, 1000, 1 << 20] {
            let mut d = Decoder::new(1 << 20);
            let mut got = Vec::new();
            for chunk in stream.chunks(piece) {
                let mut rest = chunk;
                while !rest.is_empty() {
                    if let Some(p) = d.push(&mut rest).unwrap() {
                        got.push(p);
                    }
                }
            }
            assert_eq!(got, vec![b"hello".to_vec(), vec![], vec![7u8; 200_000]], "pieces of {piece}");
            assert!(!d.in_frame());
        }
    }

    #[test]
    fn a_long_frame_is_refused_at_its_header_and_a_half_frame_holds_what_came() {
        let mut d = Decoder::new(100);
        let mut bytes = &b"\xff\xff\xff\xffrest"[..];
        assert_eq!(d.push(&mut bytes), Err(FrameError::TooLong { len: u32::MAX as usize, max: 100 }));
        assert_eq!(bytes, b"rest");
        let mut half = &b"\x64\x00\x00\x00abc"[..];
        while !half.is_empty() {
            assert_eq!(d.push(&mut half), Ok(None));
        }
        assert!(d.in_frame());
        assert_eq!((d.wants(), d.buffered()), (97, 7));
    }
}
