//! Typed JSON values in JetStream KV buckets (job records, the notifier's ledger).

use async_nats::jetstream::kv;

use crate::{Result, RuntimeError};

/// The JSON value stored under `key` and its revision; `None` when the key holds nothing (or
/// was deleted). A value that is not JSON of `T`'s shape is [`RuntimeError::CorruptRecord`].
pub async fn read_json<T: serde::de::DeserializeOwned>(
    store: &kv::Store,
    key: &str,
) -> Result<Option<(T, u64)>> {
    let entry = store
        .entry(key.to_owned())
        .await
        .map_err(|e| RuntimeError::jetstream(format!("read {key}"), e))?;
    match entry {
        Some(entry) if entry.operation == kv::Operation::Put => {
            let value = serde_json::from_slice(&entry.value).map_err(|source| {
                RuntimeError::CorruptRecord {
                    key: key.to_owned(),
                    source,
                }
            })?;
            Ok(Some((value, entry.revision)))
        }
        _ => Ok(None),
    }
}
