//! Loaded LoRAs kept for reuse, under a memory bound, least recently used out first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{LoraError, LoraSpec, LoraTarget, LoraWeights};

/// What identifies the file an entry was read from, so a replaced file is read again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    fn of(path: &Path) -> Result<Self, LoraError> {
        let metadata =
            std::fs::metadata(path).map_err(|e| crate::loader::ModelError::io(path, e))?;
        Ok(FileStamp {
            len: metadata.len(),
            modified: metadata.modified().ok(),
        })
    }
}

#[derive(Debug)]
struct Entry {
    lora: LoraWeights,
    stamp: FileStamp,
    last_used: u64,
}

/// LoRAs loaded for one model, by path, holding at most `max_bytes` of factors between calls.
///
/// A LoRA whose file changed (size or modification time) or that was loaded for another model
/// ([`LoraTarget::fingerprint`]) is read again. When a call needs more than the bound (its
/// LoRAs together are larger), they are all kept until the next call makes room.
#[derive(Debug)]
pub struct LoraCache {
    max_bytes: usize,
    entries: HashMap<PathBuf, Entry>,
    clock: u64,
    loads: usize,
}

impl LoraCache {
    /// An empty cache bounded to `max_bytes` of LoRA factors.
    pub fn new(max_bytes: usize) -> Self {
        LoraCache {
            max_bytes,
            entries: HashMap::new(),
            clock: 0,
            loads: 0,
        }
    }

    /// The LoRA at `path`, resolved for `target`: from the cache, or read and kept.
    pub fn get(&mut self, path: &Path, target: &LoraTarget) -> Result<&LoraWeights, LoraError> {
        let key = self.ensure(path, target)?;
        self.evict(std::slice::from_ref(&key));
        self.entries
            .get(&key)
            .map(|entry| &entry.lora)
            .ok_or_else(|| LoraError::NotALora {
                path: path.to_owned(),
                reason: "evicted while in use".to_owned(),
            })
    }

    /// Every LoRA of `specs` with its weight, ready for
    /// [`crate::pipeline::SdxlPipeline::set_loras`]; none of them is evicted to make room for
    /// another. The first LoRA that cannot be loaded is the error.
    pub fn get_many(
        &mut self,
        specs: &[LoraSpec],
        target: &LoraTarget,
    ) -> Result<Vec<(&LoraWeights, f64)>, LoraError> {
        let mut keys = Vec::with_capacity(specs.len());
        for spec in specs {
            keys.push(self.ensure(&spec.path, target)?);
        }
        self.evict(&keys);
        keys.iter()
            .zip(specs)
            .map(|(key, spec)| {
                self.entries
                    .get(key)
                    .map(|entry| (&entry.lora, spec.weight))
                    .ok_or_else(|| LoraError::NotALora {
                        path: spec.path.clone(),
                        reason: "evicted while in use".to_owned(),
                    })
            })
            .collect()
    }

    /// Bytes of factors held.
    pub fn bytes(&self) -> usize {
        self.entries.values().map(|e| e.lora.bytes()).sum()
    }

    /// LoRAs held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no LoRA is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the LoRA at `path` is held (by the path given when it was loaded).
    pub fn contains(&self, path: &Path) -> bool {
        self.entries.contains_key(&Self::key(path))
    }

    /// Files read since the cache was made (hits do not count).
    pub fn loads(&self) -> usize {
        self.loads
    }

    /// Drops every LoRA.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    fn key(path: &Path) -> PathBuf {
        std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
    }

    /// Makes sure `path` is loaded and fresh; returns its key.
    fn ensure(&mut self, path: &Path, target: &LoraTarget) -> Result<PathBuf, LoraError> {
        let key = Self::key(path);
        let stamp = FileStamp::of(path)?;
        self.clock += 1;
        let fresh = self.entries.get(&key).is_some_and(|entry| {
            entry.stamp == stamp && entry.lora.target_fingerprint() == target.fingerprint()
        });
        if fresh {
            if let Some(entry) = self.entries.get_mut(&key) {
                entry.last_used = self.clock;
            }
        } else {
            // Drop a stale copy before reading the new one.
            self.entries.remove(&key);
            let lora = LoraWeights::load(path, target)?;
            self.loads += 1;
            self.entries.insert(
                key.clone(),
                Entry {
                    lora,
                    stamp,
                    last_used: self.clock,
                },
            );
        }
        Ok(key)
    }

    /// Drops least recently used entries other than `keep` until the bound holds (or only
    /// `keep` is left).
    fn evict(&mut self, keep: &[PathBuf]) {
        let mut held = self.bytes();
        while held > self.max_bytes {
            let oldest = self
                .entries
                .iter()
                .filter(|(key, _)| !keep.contains(key))
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(key, _)| key.clone());
            let Some(oldest) = oldest else {
                break;
            };
            if let Some(entry) = self.entries.remove(&oldest) {
                held -= entry.lora.bytes();
            }
        }
    }
}
