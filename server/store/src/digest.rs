//! SHA-256 digests: whole small files, and a memory file chunk by chunk
//! with holes read as zeros (without reading or hashing all-hole chunks).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

use crate::fsio::data_ranges;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Hex SHA-256 of `len` zero bytes.
pub fn zero_digest(len: u64) -> String {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        left -= n as u64;
    }
    hex(&h.finalize())
}

/// Digests of all-zero chunks, computed once per distinct length (every
/// chunk has the full size except perhaps the last).
#[derive(Debug, Default)]
pub struct ZeroDigests(Vec<(u64, String)>);

impl ZeroDigests {
    /// The digest of `len` zero bytes.
    pub fn get(&mut self, len: u64) -> &str {
        let i = match self.0.iter().position(|(l, _)| *l == len) {
            Some(i) => i,
            None => {
                self.0.push((len, zero_digest(len)));
                self.0.len() - 1
            }
        };
        &self.0[i].1
    }
}

/// One chunk of a memory file, read with its holes as zeros.
pub struct Chunk<'a> {
    /// Index of the chunk.
    pub index: usize,
    /// Byte offset of the chunk in the file.
    pub offset: u64,
    /// The chunk's bytes, or `None` when the chunk is all hole (zeros).
    pub data: Option<&'a [u8]>,
    /// Length of the chunk.
    pub len: u64,
}

/// Reads chunks of a sparse file into one reused buffer. Data ranges
/// come from `SEEK_DATA`/`SEEK_HOLE`, so holes are never read from disk,
/// and a chunk without data is reported as such without a read.
pub struct ChunkReader<'f> {
    file: &'f File,
    size: u64,
    chunk_size: u64,
    buf: Vec<u8>,
}

impl<'f> ChunkReader<'f> {
    /// A reader over the first `size` bytes of `file`.
    pub fn new(file: &'f File, size: u64, chunk_size: u64) -> Self {
        ChunkReader {
            file,
            size,
            chunk_size,
            buf: Vec::new(),
        }
    }

    /// Chunk `index` (which must be below [`ChunkReader::count`]).
    pub fn read_chunk(&mut self, index: usize) -> io::Result<Chunk<'_>> {
        let offset = index as u64 * self.chunk_size;
        let len = self.chunk_size.min(self.size - offset);
        let ranges = data_ranges(self.file, offset, offset + len)?;
        if ranges.is_empty() {
            return Ok(Chunk {
                index,
                offset,
                data: None,
                len,
            });
        }
        self.buf.resize(len as usize, 0);
        let mut pos = offset;
        for (start, end) in ranges {
            self.buf[(pos - offset) as usize..(start - offset) as usize].fill(0);
            self.file.read_exact_at(
                &mut self.buf[(start - offset) as usize..(end - offset) as usize],
                start,
            )?;
            pos = end;
        }
        self.buf[(pos - offset) as usize..].fill(0);
        Ok(Chunk {
            index,
            offset,
            data: Some(&self.buf[..len as usize]),
            len,
        })
    }
}

/// Runs `f` on every chunk of the first `size` bytes of `file`, spread
/// over the machine's cores (chunks are independent), and returns the
/// results in chunk order. `f` gets the worker's scratch state `S`. On
/// errors, the one of the lowest chunk is returned.
pub fn par_chunks<T, S, E>(
    file: &File,
    size: u64,
    chunk_size: u64,
    scratch: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, &Chunk<'_>) -> Result<T, E> + Sync,
    io_err: impl Fn(io::Error) -> E + Sync,
) -> Result<Vec<T>, E>
where
    T: Send,
    E: Send,
{
    let count = size.div_ceil(chunk_size) as usize;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, count.max(1));
    let mut results: Vec<(usize, Result<T, E>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (scratch, f, io_err) = (&scratch, &f, &io_err);
                s.spawn(move || {
                    let mut reader = ChunkReader::new(file, size, chunk_size);
                    let mut state = scratch();
                    let mut out = Vec::new();
                    for index in (w..count).step_by(workers) {
                        let r = match reader.read_chunk(index) {
                            Ok(chunk) => f(&mut state, &chunk),
                            Err(e) => Err(io_err(e)),
                        };
                        let failed = r.is_err();
                        out.push((index, r));
                        if failed {
                            break;
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("chunk worker panicked"))
            .collect()
    });
    results.sort_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Hex SHA-256 of a chunk, using `zeros` for all-hole chunks.
pub fn chunk_digest(chunk: &Chunk<'_>, zeros: &mut ZeroDigests) -> String {
    match chunk.data {
        Some(data) => sha256_hex(data),
        None => zeros.get(chunk.len).to_string(),
    }
}

/// The chunk digests of the first `size` bytes of `file`.
pub fn memory_chunks(file: &File, size: u64, chunk_size: u64) -> io::Result<Vec<String>> {
    par_chunks(
        file,
        size,
        chunk_size,
        ZeroDigests::default,
        |zeros, chunk| Ok(chunk_digest(chunk, zeros)),
        |e| e,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    #[test]
    fn known_digests() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(zero_digest(0), sha256_hex(b""));
        assert_eq!(zero_digest(100_000), sha256_hex(&vec![0u8; 100_000]));
        let mut z = ZeroDigests::default();
        assert_eq!(z.get(5), sha256_hex(&[0; 5]));
        assert_eq!(z.get(5), sha256_hex(&[0; 5]));
    }

    #[test]
    fn sparse_chunks_hash_as_if_dense() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let size = 10u64 << 20; // 2.5 chunks of 4 MiB
        let chunk = 4u64 << 20;
        f.set_len(size).unwrap();
        f.write_all_at(&[7u8; 4096], (4 << 20) + 8192).unwrap();
        f.write_all_at(&[9u8; 100], size - 100).unwrap();
        let got = memory_chunks(&f, size, chunk).unwrap();
        let dense = std::fs::read(&path).unwrap();
        let want: Vec<String> = dense.chunks(chunk as usize).map(sha256_hex).collect();
        assert_eq!(got, want);
        assert_eq!(got.len(), 3);
    }
}
