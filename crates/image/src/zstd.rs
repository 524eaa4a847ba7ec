//! zstd layers: a reader over every frame of a zstd stream (one after
//! another, skippable frames passed over), decoded by ruzstd, a decoder
//! in Rust with a bounded window (its default, 128 MiB), so a hostile
//! frame cannot ask the host for more memory than that.

use std::io::{BufRead, Read};

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

/// The magic number at the start of a zstd frame.
pub(crate) const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

pub(crate) struct Frames<R> {
    src: R,
    dec: FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> Frames<R> {
    pub(crate) fn new(src: R) -> Frames<R> {
        Frames {
            src,
            dec: FrameDecoder::new(),
            in_frame: false,
        }
    }
}

fn bad(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("zstd: {e}"))
}

impl<R: BufRead> Read for Frames<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                while self.dec.can_collect() == 0 && !self.dec.is_finished() {
                    self.dec
                        .decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBlocks(1))
                        .map_err(bad)?;
                }
                let n = self.dec.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                if self.dec.is_finished() && self.dec.can_collect() == 0 {
                    self.in_frame = false;
                }
                continue;
            }
            // between frames: the end, another frame, or a skippable one
            if self.src.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.dec.reset(&mut self.src) {
                Ok(()) => self.in_frame = true,
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped = std::io::copy(
                        &mut (&mut self.src).take(u64::from(length)),
                        &mut std::io::sink(),
                    )?;
                    if skipped != u64::from(length) {
                        return Err(bad("a skippable frame is cut short"));
                    }
                }
                Err(e) => return Err(bad(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruzstd::encoding::{compress_to_vec, CompressionLevel};

    fn decode(b: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Frames::new(std::io::BufReader::new(b)).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn every_frame_is_read_and_skippable_ones_are_passed_over() {
        let a: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let b = b"second frame".to_vec();
        let mut s = compress_to_vec(&a[..], CompressionLevel::Fastest);
        // a skippable frame: magic 0x184D2A50, length 5, five bytes
        s.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 5, 0, 0, 0, 1, 2, 3, 4, 5]);
        s.extend(compress_to_vec(&b[..], CompressionLevel::Fastest));
        let mut want = a.clone();
        want.extend_from_slice(&b);
        assert_eq!(decode(&s).unwrap_or_default(), want);
        assert_eq!(decode(&[]).unwrap_or_default(), Vec::<u8>::new());
    }

    #[test]
    fn garbage_and_huge_windows_are_errors() {
        assert!(decode(b"not zstd at all").is_err());
        let mut s = compress_to_vec(&b"hello"[..], CompressionLevel::Fastest);
        s.truncate(s.len() - 2);
        assert!(decode(&s).is_err(), "a cut frame");
        // a frame header asking for a 2 GiB window (window descriptor
        // exponent 21: 1 << 31), refused before anything is allocated
        let huge = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 21 << 3, 0, 0, 0, 0];
        assert!(decode(&huge).is_err());
    }
}
