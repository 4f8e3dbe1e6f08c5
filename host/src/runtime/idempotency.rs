//! Idempotency keys: stable across replays and crashes, unique per
//! database, run, step name and occurrence.

use sha2::{Digest, Sha256};

/// The key of occurrence `occurrence` of step `name` in run `run_id` of the
/// database `db_id`.
///
/// Every part is length-prefixed before hashing, so no two (name,
/// occurrence) pairs encode alike (`send_email` #11 and `send_email_1` #1
/// differ), and the database's random id makes keys of two databases
/// disjoint. 128 bits of SHA-256, hex: short enough for any provider's
/// idempotency header.
pub fn idempotency_key(db_id: &str, run_id: &str, name: &str, occurrence: u32) -> String {
    let mut h = Sha256::new();
    h.update(b"cairn-idempotency-v1");
    for part in [db_id.as_bytes(), run_id.as_bytes(), name.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(occurrence.to_le_bytes());
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::idempotency_key as key;

    #[test]
    fn stable_and_distinct() {
        assert_eq!(key("db", "r", "charge", 1), key("db", "r", "charge", 1));
        assert_ne!(key("db", "r", "send_email", 11), key("db", "r", "send_email_1", 1));
        assert_ne!(key("db", "r", "a", 1), key("db", "r", "a", 2));
        assert_ne!(key("db", "r1", "a", 1), key("db", "r", "1a", 1));
        assert_ne!(key("db1", "r", "a", 1), key("db2", "r", "a", 1));
        assert_eq!(key("db", "r", "a", 1).len(), 32);
    }

    /// Keys are promised to stay the same across versions: a provider may
    /// hold one from before an upgrade. (Computed independently of this
    /// code, from the documented layout.)
    #[test]
    fn a_known_key() {
        assert_eq!(key("db", "r", "charge", 1), "d882df7ee1b799cf91459b9b5e035565");
    }
}
