//! The deterministic data `fill` writes and `checksum` digests.

/// SplitMix64 finaliser: a cheap, well-mixed function of one word.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The word `fill` stores at word index `index` for `seed`.
pub fn fill_word(seed: u64, index: u64) -> u64 {
    mix(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index)
}

/// A running 64-bit digest over words, order-sensitive.
pub struct Digest {
    lanes: [u64; 4],
    words: u64,
}

impl Digest {
    /// An empty digest.
    pub fn new() -> Self {
        Digest {
            lanes: [
                0x6a09_e667_f3bc_c908,
                0xbb67_ae85_84ca_a73b,
                0x3c6e_f372_fe94_f82b,
                0xa54f_f53a_5f1d_36f1,
            ],
            words: 0,
        }
    }

    /// Absorbs a block of words (any length).
    pub fn update(&mut self, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            let lane = &mut self.lanes[i & 3];
            *lane = (*lane ^ *w)
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(29);
        }
        self.words += words.len() as u64;
    }

    /// The final value.
    pub fn finish(&self) -> u64 {
        let mut h = self.words;
        for lane in self.lanes {
            h = mix(h ^ lane);
        }
        h
    }
}
