//! Key-value state committed with the step: had from [`crate::Step::kv`].

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, host_calls};

/// The run's key-value namespace, as seen by one step attempt.
///
/// Reads see committed state plus this attempt's own writes. Writes are
/// staged and land in the same database transaction as the step's
/// outcome: exactly once if the step completes, not at all if the attempt
/// fails, crashes or is retried. If another run changed a key this attempt
/// read before the step commits, the attempt runs again at once (it is not
/// counted against the retry policy).
pub struct Kv {
    pub(crate) _private: (),
}

impl Kv {
    /// The value of `key`, if it has one.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        match host_calls::kv_get(key)? {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::permanent(format!("kv key {key:?}: the value does not fit the type asked for: {e}"))
            }),
            None => Ok(None),
        }
    }

    /// Set `key` to `value` when the step commits.
    pub fn put<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), Error> {
        let json = serde_json::to_vec(value).map_err(|e| Error::permanent(format!("kv key {key:?}: {e}")))?;
        host_calls::kv_put(key, &json)
    }

    /// Remove `key` when the step commits.
    pub fn delete(&self, key: &str) -> Result<(), Error> {
        host_calls::kv_delete(key)
    }
}
