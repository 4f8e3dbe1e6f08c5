//! Random bytes for workflow code outside step closures.
//!
//! Each run gets a random key when it is created. What the workflow reads
//! outside step closures is a stream derived from that key: every replay of
//! the run (after a crash, a retry, in a branch instance) reads the same
//! bytes at the same point, so they need no history entry, and so no commit
//! before the next step runs. Only someone holding the database can predict
//! them; unlike journaled values, the key also predicts the reads the run
//! has yet to make. Inside a step closure reads are fresh: the step's
//! outcome is what is recorded.

use sha2::{Digest, Sha256};

/// Keeps this stream apart from every other use of SHA-256 with the key.
const DOMAIN: &[u8] = b"cairn random stream v1";

/// A new run's key, from the operating system.
pub fn new_key() -> Result<[u8; 32], getrandom::Error> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)?;
    Ok(key)
}

/// The bytes one instance hands out, in order: block `i` is
/// SHA-256(domain, key, i), and each read takes whole blocks.
pub struct RandomStream {
    key: [u8; 32],
    block: u64,
}

impl RandomStream {
    pub fn new(key: [u8; 32]) -> Self {
        RandomStream { key, block: 0 }
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(32) {
            let digest = Sha256::new()
                .chain_update(DOMAIN)
                .chain_update(self.key)
                .chain_update(self.block.to_le_bytes())
                .finalize();
            chunk.copy_from_slice(&digest[..chunk.len()]);
            self.block += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(stream: &mut RandomStream, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        stream.fill(&mut out);
        out
    }

    #[test]
    fn same_key_same_reads_and_reads_differ() {
        let (mut a, mut b) = (RandomStream::new([7; 32]), RandomStream::new([7; 32]));
        let first = read(&mut a, 16);
        assert_eq!(first, read(&mut b, 16), "a replay reads the same bytes");
        let (second, third) = (read(&mut a, 40), read(&mut a, 16));
        assert_eq!(second, read(&mut b, 40));
        assert_ne!(first, second[..16], "consecutive reads differ");
        assert_ne!(second[..32], second[32..], "the blocks of one read differ");
        assert_ne!(first, third);
        let other = read(&mut RandomStream::new([8; 32]), 16);
        assert_ne!(first, other, "another run's key gives other bytes");
    }

    #[test]
    fn a_known_block() {
        // Computed apart from this code, in Python:
        // sha256(b"cairn random stream v1" + bytes(32) + (0).to_bytes(8, "little"))
        let block = read(&mut RandomStream::new([0; 32]), 32);
        assert_eq!(hex::encode(block), "44c05546625f35620e697616be0c0a427703526e243751c1c7c63b1955a5ee03");
    }
}
