//! The chunked decoder (`llmproxy::http::ChunkedDecoder`), fed in reads the fuzzer cuts.
//!
//! However the reads cut the body, the decoder reaches the same verdict: the same error, or the
//! same end, the same payload and the same count of bytes consumed. The payload is never longer
//! than the framing carrying it, and a decoded body re-encoded as one chunk decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmproxy::http::{ChunkedDecoder, ChunkedError};
use llmproxy_fuzz::{reads, split_plan};

/// Decodes `payload` read by read, as the relay does. Returns the payload and the bytes consumed
/// (up to the end of the body, or all of them when it did not end), or the first error.
fn decode<'a>(
    reads: impl Iterator<Item = &'a [u8]>,
) -> Result<(Vec<u8>, usize, bool), ChunkedError> {
    let mut decoder = ChunkedDecoder::default();
    let mut data = Vec::new();
    let mut consumed = 0;
    for read in reads {
        let used = decoder.feed(read, |d| data.extend_from_slice(d))?;
        assert!(used <= read.len());
        consumed += used;
        if decoder.is_done() {
            break;
        }
        assert_eq!(used, read.len(), "input left over before the end");
    }
    Ok((data, consumed, decoder.is_done()))
}

fuzz_target!(|input: &[u8]| {
    let (plan, payload) = split_plan(input);
    let whole = decode(std::iter::once(payload));
    let cut = decode(reads(plan, payload));
    assert_eq!(whole, cut, "the reads' cuts changed the verdict");
    let Ok((data, consumed, done)) = whole else {
        return;
    };
    assert!(data.len() <= consumed && consumed <= payload.len());
    if done {
        let encoded = if data.is_empty() {
            b"0\r\n\r\n".to_vec()
        } else {
            let mut one_chunk = format!("{:x}\r\n", data.len()).into_bytes();
            one_chunk.extend_from_slice(&data);
            one_chunk.extend_from_slice(b"\r\n0\r\n\r\n");
            one_chunk
        };
        let again = decode(std::iter::once(&encoded[..]));
        assert_eq!(again, Ok((data, encoded.len(), true)));
    }
});
