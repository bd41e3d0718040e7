//! Mixing host entropy into the kernel's pool and reseeding its CRNG, so a
//! guest restored from a snapshot does not repeat its parent's random numbers.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use crate::error::ResumeError;

// Not in the libc crate. From <linux/random.h>:
/// `_IOW('R', 0x03, int[2])`: add bytes to the input pool, crediting entropy.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`
/// for `bytes`, as 32-bit words (so the buffer is suitably aligned).
pub fn rand_pool_info(bytes: &[u8]) -> Vec<u32> {
    let mut words = vec![0u32; 2 + bytes.len().div_ceil(4)];
    // Both counts fit: a frame is at most 1 MiB, so 8 * len < 2^31.
    words[0] = (8 * bytes.len()) as u32;
    words[1] = bytes.len() as u32;
    for (word, chunk) in words[2..].iter_mut().zip(bytes.chunks(4)) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_ne_bytes(b);
    }
    words
}

/// Adds `bytes` (credited as full entropy) to the kernel's input pool and
/// reseeds the CRNG. Needs CAP_SYS_ADMIN.
pub fn add_and_reseed(bytes: &[u8]) -> Result<(), ResumeError> {
    if bytes.is_empty() {
        return Err(ResumeError::NoEntropy);
    }
    let urandom = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| ResumeError::sys("opening /dev/urandom", e))?;
    let info = rand_pool_info(bytes);
    // SAFETY: `info` is a valid rand_pool_info whose buf_size bytes of
    // `buf` follow the two ints; the kernel only reads it during the call.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        return Err(ResumeError::sys(
            "adding entropy",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no memory of ours.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(ResumeError::sys(
            "reseeding the CRNG",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_info_layout() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(info.len(), 4);
        assert_eq!(info[0], 40);
        assert_eq!(info[1], 5);
        assert_eq!(info[2], u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(info[3], u32::from_ne_bytes([5, 0, 0, 0]));
        assert_eq!(rand_pool_info(&[]).len(), 2);
    }
}
