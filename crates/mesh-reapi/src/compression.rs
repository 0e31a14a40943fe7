//! zstd for blobs on the wire: REAPI's `compressed-blobs/zstd/…` ByteStream resources and the
//! `compressor` fields of `BatchUpdateBlobs` and `BatchReadBlobs` (as Buildbarn, BuildBuddy,
//! NativeLink and bazel-remote serve them, and Bazel asks with
//! `--experimental_remote_cache_compression`).
//!
//! Blobs are stored uncompressed: actions read their inputs as plain files, and the digest a
//! client names is always the digest of the uncompressed bytes, which the store verifies as
//! it does for any upload. Compression happens at the edge, streaming both ways:
//!
//! * [`Deflater`] compresses a blob's chunks as they are read from the store, at [`LEVEL`]
//!   1, zstd's fastest standard level: on build-output-like text it compressed 2.6 times
//!   faster than the default level 3 and no worse (`BENCHMARKS.md`, "zstd on the wire");
//! * [`Inflater`] decompresses an upload into bounded pieces as its messages arrive, so a
//!   small message that inflates to gigabytes (a zip bomb) is stopped as soon as it passes the
//!   size the digest names, and never held in memory whole.

use std::io;

use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation as _, OutBuffer};

/// The compression level of blobs served compressed: 1, zstd's fastest standard level.
pub const LEVEL: i32 = 1;

/// The most decompressed bytes one step hands on at a time.
const PIECE: usize = 256 * 1024;

/// Compresses one blob's bytes as they come, into one zstd frame.
pub struct Deflater {
    encoder: Encoder<'static>,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater").field("level", &LEVEL).finish()
    }
}

impl Deflater {
    /// A compressor at [`LEVEL`], before the first byte.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            encoder: Encoder::new(LEVEL)?,
        })
    }

    /// Compresses `data`, returning what the encoder emitted so far (may be empty).
    pub fn compress(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
        let mut input = InBuffer::around(data);
        while input.pos() < data.len() {
            let pos = out.len();
            let mut output = OutBuffer::around_pos(&mut out, pos);
            self.encoder.run(&mut input, &mut output)?;
            if out.len() == out.capacity() {
                out.reserve(PIECE);
            }
        }
        Ok(out)
    }

    /// Ends the frame: the last compressed bytes.
    pub fn finish(&mut self) -> io::Result<Vec<u8>> {
        let mut out: Vec<u8> = Vec::with_capacity(PIECE);
        loop {
            let pos = out.len();
            let mut output = OutBuffer::around_pos(&mut out, pos);
            let remaining = self.encoder.finish(&mut output, true)?;
            if remaining == 0 {
                return Ok(out);
            }
            out.reserve(remaining.max(PIECE));
        }
    }
}

/// Compresses a whole (small) blob into one frame (`BatchReadBlobs`).
pub fn compress(data: &[u8]) -> io::Result<Vec<u8>> {
    zstd::bulk::compress(data, LEVEL)
}

/// Decompresses a whole (small) blob that must be exactly `size` bytes (`BatchUpdateBlobs`).
/// The error is the rule the data broke.
pub fn decompress_exact(data: &[u8], size: u64) -> Result<Vec<u8>, String> {
    let mut inflater = Inflater::new(size).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    let mut input = data;
    while let Some(piece) = inflater.step(&mut input)? {
        out.extend_from_slice(piece);
    }
    inflater.finish()?;
    Ok(out)
}

/// Decompresses an upload that must inflate to exactly `size` bytes, one bounded piece at a
/// time.
pub struct Inflater {
    decoder: Decoder<'static>,
    buffer: Vec<u8>,
    expected: u64,
    produced: u64,
    /// Whether the last step ended a frame (no more data is owed).
    frame_done: bool,
    /// Whether the last step filled the buffer: the decoder may hold more output even with
    /// no input left (`ZSTD_decompressStream`'s contract: call again to flush).
    may_hold_more: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("expected", &self.expected)
            .field("produced", &self.produced)
            .finish()
    }
}

impl Inflater {
    /// A decompressor for data that must inflate to exactly `expected` bytes.
    pub fn new(expected: u64) -> io::Result<Self> {
        Self::with_pieces_of(expected, PIECE)
    }

    /// Hands on pieces of at most `piece` bytes.
    fn with_pieces_of(expected: u64, piece: usize) -> io::Result<Self> {
        Ok(Self {
            decoder: Decoder::new()?,
            buffer: vec![0; piece],
            expected,
            produced: 0,
            frame_done: expected == 0,
            may_hold_more: false,
        })
    }

    /// Decompresses from `input` (advancing it) into the next piece; `None` once `input` is
    /// used up and nothing more came out. Fails when the data is not zstd or inflates past
    /// the expected size.
    pub fn step(&mut self, input: &mut &[u8]) -> Result<Option<&[u8]>, String> {
        loop {
            if input.is_empty() && !self.may_hold_more {
                return Ok(None);
            }
            let mut in_buffer = InBuffer::around(input);
            let mut output = OutBuffer::around(&mut self.buffer[..]);
            let hint = self
                .decoder
                .run(&mut in_buffer, &mut output)
                .map_err(|e| format!("the data is not valid zstd: {e}"))?;
            let consumed = in_buffer.pos();
            let written = output.pos();
            *input = &input[consumed..];
            self.frame_done = hint == 0;
            self.may_hold_more = written == self.buffer.len();
            if written > 0 {
                self.produced += written as u64;
                if self.produced > self.expected {
                    return Err(format!(
                        "the data inflates past the {} bytes its digest names",
                        self.expected
                    ));
                }
                return Ok(Some(&self.buffer[..written]));
            }
            if consumed == 0 {
                return Ok(None);
            }
        }
    }

    /// Checks that the data inflated to exactly the expected size and ended its frame.
    pub fn finish(&self) -> Result<(), String> {
        if self.produced != self.expected {
            return Err(format!(
                "the data inflates to {} bytes, but its digest names {}",
                self.produced, self.expected
            ));
        }
        if !self.frame_done {
            return Err("the zstd frame is truncated".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressible(len: usize) -> Vec<u8> {
        (0..len).map(|i| b"mesh-reapi "[i % 11]).collect()
    }

    #[test]
    fn streamed_compression_round_trips_and_shrinks_compressible_data() {
        let data = compressible(3 * PIECE + 17);
        let mut deflater = Deflater::new().unwrap();
        let mut wire = Vec::new();
        for chunk in data.chunks(100_000) {
            wire.extend(deflater.compress(chunk).unwrap());
        }
        wire.extend(deflater.finish().unwrap());
        assert!(
            wire.len() * 10 < data.len(),
            "{} of {}",
            wire.len(),
            data.len()
        );
        assert_eq!(zstd::bulk::decompress(&wire, data.len()).unwrap(), data);

        // Inflated again in messages of any size: tiny ones, and one whose output is many
        // pieces.
        assert_eq!(decompress_exact(&wire, data.len() as u64).unwrap(), data);
        let mut inflater = Inflater::new(data.len() as u64).unwrap();
        let mut back = Vec::new();
        for message in wire.chunks(7) {
            let mut input = message;
            while let Some(piece) = inflater.step(&mut input).unwrap() {
                assert!(piece.len() <= PIECE);
                back.extend_from_slice(piece);
            }
        }
        inflater.finish().unwrap();
        assert_eq!(back, data);

        // Pieces far smaller than what one message inflates to: the decoder keeps what it
        // decoded after the message is used up, and it comes out all the same.
        let mut inflater = Inflater::with_pieces_of(data.len() as u64, 1000).unwrap();
        let mut back = Vec::new();
        let mut input = &wire[..];
        while let Some(piece) = inflater.step(&mut input).unwrap() {
            back.extend_from_slice(piece);
        }
        inflater.finish().unwrap();
        assert_eq!(back.len(), data.len());
    }

    #[test]
    fn a_bomb_a_truncation_and_garbage_are_refused() {
        let big = compressible(64 * PIECE);
        let bomb = compress(&big).unwrap();
        let error = decompress_exact(&bomb, 1000).unwrap_err();
        assert_eq!(
            error,
            "the data inflates past the 1000 bytes its digest names"
        );

        let data = compressible(5000);
        let wire = compress(&data).unwrap();
        assert_eq!(decompress_exact(&wire, 5000).unwrap(), data);
        assert!(
            decompress_exact(&wire[..wire.len() - 3], 5000)
                .unwrap_err()
                .contains("5000"),
        );
        assert_eq!(
            decompress_exact(&wire, 6000).unwrap_err(),
            "the data inflates to 5000 bytes, but its digest names 6000"
        );
        assert!(
            decompress_exact(b"not zstd at all", 15)
                .unwrap_err()
                .starts_with("the data is not valid zstd")
        );
        assert_eq!(decompress_exact(&compress(b"").unwrap(), 0).unwrap(), b"");
    }
}
