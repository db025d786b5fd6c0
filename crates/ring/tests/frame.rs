//! Properties of the control sockets' frame decoder (the fuzz target fuzz/fuzz_targets/frame.rs
//! checks the same against arbitrary bytes).

use netkernel_ring::frame::{encode, Decoder, FrameError, HEADER};
use proptest::prelude::*;

const MAX: usize = 5000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Frames sent whole come out whole and in order, however the stream is cut, and the
    /// decoder never holds more than the frame's header and payload.
    #[test]
    fn frames_survive_any_cutting(
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..MAX), 0..6),
        cuts in proptest::collection::vec(1usize..9000, 1..20),
    ) {
        let stream: Vec<u8> = payloads.iter().flat_map(|p| encode(p)).collect();
        let mut d = Decoder::new(MAX);
        let mut got = Vec::new();
        let (mut at, mut i) = (0, 0);
        while at < stream.len() {
            let end = (at + cuts[i % cuts.len()]).min(stream.len());
            let mut piece = &stream[at..end];
            while !piece.is_empty() {
                prop_assert!(d.buffered() <= HEADER + MAX);
                if let Some(p) = d.push(&mut piece).unwrap() {
                    got.push(p);
                }
            }
            at = end;
            i += 1;
        }
        prop_assert_eq!(got, payloads);
        prop_assert!(!d.in_frame());
    }

    /// A length past the limit is refused as soon as the header is complete, before any payload.
    #[test]
    fn long_frames_are_refused_at_the_header(len in (MAX as u32 + 1)..=u32::MAX, cut in 1usize..4) {
        let header = len.to_le_bytes();
        let mut d = Decoder::new(MAX);
        let mut first = &header[..cut];
        prop_assert_eq!(d.push(&mut first), Ok(None));
        let mut rest = &header[cut..];
        prop_assert_eq!(d.push(&mut rest), Err(FrameError::TooLong { len: len as usize, max: MAX }));
        prop_assert!(!d.in_frame());
    }
}
