//! Values computed once from a tensor and kept for every later call over that same tensor: the
//! text's cross-attention keys and values, a control image's conditioning embedding. "The same
//! tensor" is the same memory seen the same way; the memo holds the key tensor, so its memory
//! cannot be reused by another while the entry exists.

use std::sync::{Mutex, MutexGuard, PoisonError};

use tch::Tensor;

/// Whether `a` and `b` are the same tensor: the same memory seen the same way.
pub(crate) fn same_tensor(a: &Tensor, b: &Tensor) -> bool {
    a.data_ptr() == b.data_ptr()
        && a.size() == b.size()
        && a.stride() == b.stride()
        && a.kind() == b.kind()
        && a.device() == b.device()
}

/// Values by key tensor.
#[derive(Debug, Default)]
pub(crate) struct TensorMemo {
    entries: Mutex<Vec<(Tensor, Tensor)>>,
}

impl TensorMemo {
    fn entries(&self) -> MutexGuard<'_, Vec<(Tensor, Tensor)>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `value` for `key`. An existing value is overwritten in place, so its memory stays
    /// where a recorded CUDA graph reads it.
    pub(crate) fn store(&self, key: &Tensor, value: Tensor) {
        let mut entries = self.entries();
        match entries.iter_mut().find(|(k, _)| same_tensor(k, key)) {
            Some((_, stored)) => {
                let mut stored = stored.shallow_clone();
                stored.copy_(&value);
            }
            None => entries.push((key.shallow_clone(), value)),
        }
    }

    /// The value kept for `key`.
    pub(crate) fn get(&self, key: &Tensor) -> Option<Tensor> {
        self.entries()
            .iter()
            .find(|(k, _)| same_tensor(k, key))
            .map(|(_, value)| value.shallow_clone())
    }

    /// Drops the value kept for `key`.
    pub(crate) fn forget(&self, key: &Tensor) {
        self.entries().retain(|(k, _)| !same_tensor(k, key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::kind::FLOAT_CPU;

    #[test]
    fn values_are_kept_by_tensor_and_overwritten_in_place() {
        let memo = TensorMemo::default();
        let key = Tensor::zeros([2, 3], FLOAT_CPU);
        let twin = Tensor::zeros([2, 3], FLOAT_CPU);
        memo.store(&key, Tensor::ones([4], FLOAT_CPU));
        let first = memo.get(&key).expect("stored");
        assert!(memo.get(&twin).is_none(), "equal contents, another tensor");
        assert!(memo.get(&key.view([3, 2])).is_none(), "another view");
        memo.store(&key, Tensor::full([4], 7.0, FLOAT_CPU));
        let second = memo.get(&key).expect("stored");
        assert_eq!(second.data_ptr(), first.data_ptr(), "overwritten in place");
        assert_eq!(first.double_value(&[0]), 7.0);
        memo.forget(&key);
        assert!(memo.get(&key).is_none());
    }
}
