//! The text conditioning of recent prompts, kept on the device.
//!
//! A service renders the same preset prompts over and over: for them the two text encoders
//! (about a second per image on a CPU at SDXL's size, ~600 launch-bound operations on a GPU) need
//! not run again. Entries hold the batch the UNet reads — hidden states and pooled embeddings,
//! negative half first under guidance — for the text encoders' weights at the time; whoever
//! changes those weights (a LoRA switch) clears the cache.

use std::collections::VecDeque;

use tch::Tensor;

/// How many prompts a pipeline remembers by default (each ~0.3 MB at f16 on the device).
pub(crate) const DEFAULT_ENTRIES: usize = 16;

/// What the text conditioning depends on besides the text encoders' weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PromptKey {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub guided: bool,
}

/// The most recently used prompts' conditioning, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct PromptCache {
    capacity: usize,
    /// Most recently used first.
    entries: VecDeque<(PromptKey, Tensor, Tensor)>,
}

impl PromptCache {
    pub(crate) fn new(capacity: usize) -> Self {
        PromptCache {
            capacity,
            entries: VecDeque::new(),
        }
    }

    /// The `(hidden states, pooled)` batch remembered for `key`, now the most recent entry.
    pub(crate) fn get(&mut self, key: &PromptKey) -> Option<(Tensor, Tensor)> {
        let position = self.entries.iter().position(|(k, _, _)| k == key)?;
        let entry = self.entries.remove(position)?;
        let found = (entry.1.shallow_clone(), entry.2.shallow_clone());
        self.entries.push_front(entry);
        Some(found)
    }

    /// Remembers `key`'s batch, dropping the least recently used entry when full.
    pub(crate) fn insert(&mut self, key: PromptKey, hidden: &Tensor, pooled: &Tensor) {
        if self.capacity == 0 {
            return;
        }
        self.entries.retain(|(k, _, _)| k != &key);
        self.entries.truncate(self.capacity - 1);
        self.entries
            .push_front((key, hidden.shallow_clone(), pooled.shallow_clone()));
    }

    /// Forgets everything (the text encoders' weights changed).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// Keeps at most `capacity` entries from now on (0: none).
    pub(crate) fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.entries.truncate(capacity);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prompt: &str) -> PromptKey {
        PromptKey {
            prompt: prompt.to_owned(),
            negative_prompt: None,
            guided: true,
        }
    }

    fn value(v: f64) -> Tensor {
        Tensor::from_slice(&[v])
    }

    #[test]
    fn remembers_the_most_recently_used() {
        let mut cache = PromptCache::new(2);
        cache.insert(key("a"), &value(1.0), &value(10.0));
        cache.insert(key("b"), &value(2.0), &value(20.0));
        // Using "a" makes "b" the oldest: "c" pushes it out.
        assert!(cache.get(&key("a")).is_some());
        cache.insert(key("c"), &value(3.0), &value(30.0));
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&key("b")).is_none());
        let (hidden, pooled) = cache.get(&key("a")).expect("kept");
        assert_eq!(hidden.double_value(&[0]), 1.0);
        assert_eq!(pooled.double_value(&[0]), 10.0);
    }

    #[test]
    fn every_part_of_the_key_counts() {
        let mut cache = PromptCache::new(4);
        cache.insert(key("a"), &value(1.0), &value(1.0));
        let unguided = PromptKey {
            guided: false,
            ..key("a")
        };
        let negative = PromptKey {
            negative_prompt: Some(String::new()),
            ..key("a")
        };
        assert!(cache.get(&unguided).is_none());
        assert!(cache.get(&negative).is_none());
        cache.insert(key("a"), &value(2.0), &value(2.0));
        assert_eq!(cache.len(), 1, "re-inserting replaces");
    }

    #[test]
    fn capacity_zero_and_clear_keep_nothing() {
        let mut cache = PromptCache::new(0);
        cache.insert(key("a"), &value(1.0), &value(1.0));
        assert_eq!(cache.len(), 0);
        cache.set_capacity(3);
        cache.insert(key("a"), &value(1.0), &value(1.0));
        cache.insert(key("b"), &value(1.0), &value(1.0));
        cache.set_capacity(1);
        assert_eq!(cache.len(), 1);
        assert!(cache.get(&key("b")).is_some());
        cache.clear();
        assert_eq!(cache.len(), 0);
    }
}
