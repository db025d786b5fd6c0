//! Bytes on a control socket, in pieces of any size: the decoder yields exactly the frames a
//! plain reading of the stream gives, refuses a frame past its limit at the header, and holds
//! little more memory than what arrived.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netkernel_ring::frame::{Decoder, FrameError, HEADER};

/// Small, so that inputs reach both sides of the limit.
const MAX: usize = 300;

/// What the stream says, read the obvious way: frames until the first refused one or the end.
fn reference(mut s: &[u8]) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut frames = Vec::new();
    while s.len() >= HEADER {
        let len = u32::from_le_bytes(s[..HEADER].try_into().unwrap()) as usize;
        if len > MAX {
            return (frames, Some(FrameError::TooLong { len, max: MAX }));
        }
        if s.len() < HEADER + len {
            break;
        }
        frames.push(s[HEADER..HEADER + len].to_vec());
        s = &s[HEADER + len..];
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the piece size; the rest is the stream.
    let Some((&piece, stream)) = data.split_first() else { return };
    let piece = usize::from(piece).max(1);
    let mut d = Decoder::new(MAX);
    let mut frames = Vec::new();
    let mut error = None;
    'read: for chunk in stream.chunks(piece) {
        let mut rest = chunk;
        while !rest.is_empty() {
            assert!(d.buffered() <= HEADER + MAX);
            match d.push(&mut rest) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {}
                Err(e) => {
                    error = Some(e);
                    break 'read;
                }
            }
        }
    }
    assert_eq!((frames, error), reference(stream));
});
