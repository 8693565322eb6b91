//! Copying validated stored values into a store's variables, on the CPU or a GPU.
//!
//! - **CPU variables** of the stored dtype are filled straight from the mapped file (no tensor in
//!   between), over several threads for large tensors. Anything else — another dtype, a
//!   transpose — goes through one CPU tensor of the stored values and libtorch's `copy_`.
//! - **GPU variables** are uploaded through two pinned staging buffers. The host fills one buffer
//!   with the next tensors' bytes while the GPU copies the other's asynchronously (a pinned source
//!   needs no host synchronisation); on the device the bytes become each variable, converted and
//!   transposed there. A fresh pageable tensor per parameter, uploaded synchronously, costs a page
//!   fault per 4 KiB of each new allocation, a second host copy inside the driver and no overlap:
//!   SDXL's 6.9 GB took 2.65–3.06 s that way on an H100.
//!
//! The staging path runs on the CPU too (plain buffers, real copies) so its bookkeeping — tensors
//! packed into a buffer, tensors larger than a buffer split over several — is tested without a
//! GPU.

use std::ops::Range;

use tch::{Device, Kind, TchError, Tensor};

/// Bytes per staging buffer: large enough that each flush's synchronisation is negligible next
/// to its copy, small enough that pinning two costs a few milliseconds.
pub(super) const STAGING_BYTES: usize = 32 << 20;

/// Below this many bytes per thread a copy stays on one thread.
const BYTES_PER_THREAD: usize = 4 << 20;

/// One parameter's stored values: its bytes in the mapped file and how they lie.
pub(super) struct StoredValues<'a> {
    /// The bytes (only the part's, for a split tensor).
    pub bytes: &'a [u8],
    /// The stored element type.
    pub kind: Kind,
    /// The shape the bytes have as stored (before `transpose`).
    pub shape: Vec<i64>,
    /// Whether the parameter is the transpose of the stored 2-D tensor.
    pub transpose: bool,
}

impl StoredValues<'_> {
    /// The values as a new CPU tensor of the stored dtype, the parameter's shape.
    pub(super) fn to_cpu_tensor(&self) -> Result<Tensor, TchError> {
        let tensor = Tensor::f_from_data_size(self.bytes, &self.shape, self.kind)?;
        if self.transpose {
            tensor.f_tr()
        } else {
            Ok(tensor)
        }
    }

    /// Whether the bytes are the variable's memory image: same dtype, no transpose, a
    /// contiguous variable.
    fn is_image_of(&self, var: &Tensor) -> bool {
        var.kind() == self.kind && !self.transpose && var.is_contiguous()
    }
}

/// libtorch failed while copying one parameter.
#[derive(Debug)]
pub(super) struct CopyFailed {
    /// The parameter (the store's name).
    pub name: String,
    /// What libtorch said.
    pub source: TchError,
}

impl CopyFailed {
    /// Turns libtorch's errors into failures to copy `name`.
    pub(super) fn naming(name: &str) -> impl Fn(TchError) -> CopyFailed + '_ {
        move |source| CopyFailed {
            name: name.to_owned(),
            source,
        }
    }
}

/// Copies stored values into variables; [`Upload::finish`] once after the last
/// [`Upload::put`] — only then are GPU variables guaranteed to hold their values.
pub(super) struct Upload<'a> {
    staging: Option<Staging<'a>>,
    staging_bytes: usize,
    stage_on_cpu: bool,
}

impl<'a> Upload<'a> {
    /// Straight copies on the CPU, staged uploads to GPUs.
    pub(super) fn new() -> Self {
        Upload {
            staging: None,
            staging_bytes: STAGING_BYTES,
            stage_on_cpu: false,
        }
    }

    /// Every copy staged, CPU variables included, through buffers of `bytes` each: the GPU's
    /// bookkeeping, checked where there is no GPU.
    #[cfg(test)]
    fn staged_everywhere(bytes: usize) -> Self {
        Upload {
            staging: None,
            staging_bytes: bytes.max(1),
            stage_on_cpu: true,
        }
    }

    /// Copies `values` into `var` (named `name` in errors), whose shape the caller checked.
    pub(super) fn put(
        &mut self,
        name: &str,
        var: &Tensor,
        values: &StoredValues<'a>,
    ) -> Result<(), CopyFailed> {
        let failed = CopyFailed::naming(name);
        let device = var.device();
        if device == Device::Cpu && !self.stage_on_cpu {
            return put_on_cpu(var, values).map_err(failed);
        }
        if self.staging.as_ref().is_some_and(|s| s.device != device) {
            self.finish()?;
        }
        let staging = match &mut self.staging {
            Some(staging) => staging,
            empty => empty.insert(Staging::new(device, self.staging_bytes).map_err(failed)?),
        };
        staging.put(name, var, values)
    }

    /// Completes every copy still queued and waits for the device.
    pub(super) fn finish(&mut self) -> Result<(), CopyFailed> {
        match self.staging.take() {
            Some(mut staging) => staging.finish(),
            None => Ok(()),
        }
    }
}

/// A CPU variable: its memory written from the map, or `copy_` from a tensor of the values.
fn put_on_cpu(var: &Tensor, values: &StoredValues<'_>) -> Result<(), TchError> {
    let mut var = var.shallow_clone();
    if values.is_image_of(&var) {
        copy_bytes(host_bytes_mut(&mut var)?, values.bytes);
        Ok(())
    } else {
        var.f_copy_(&values.to_cpu_tensor()?)
    }
}

/// Two host buffers (pinned for a GPU) and what goes into and out of the one being filled.
struct Staging<'a> {
    device: Device,
    buffers: [Tensor; 2],
    /// The buffer being filled.
    current: usize,
    /// Bytes of it taken so far.
    filled: usize,
    /// What the current buffer's taken bytes are, in order: they are copied in at the flush, over
    /// several threads however small each parameter is.
    sources: Vec<&'a [u8]>,
    /// Copies out of the current buffer, issued when it is flushed.
    queued: Vec<Queued>,
}

/// One piece of a buffer and where it goes.
struct Queued {
    name: String,
    range: Range<usize>,
    destination: Destination,
}

enum Destination {
    /// A whole parameter's bytes: they become `var`.
    Whole { var: Tensor, layout: Layout },
    /// Bytes at `at` of a parameter larger than a buffer, gathered in `gathered` on the device;
    /// the last piece also makes the gathered bytes `var`.
    Piece {
        gathered: Tensor,
        at: i64,
        last: Option<(Tensor, Layout)>,
    },
}

/// How a parameter's bytes are read: dtype, stored shape, transpose.
#[derive(Clone)]
struct Layout {
    kind: Kind,
    shape: Vec<i64>,
    transpose: bool,
}

impl<'a> Staging<'a> {
    fn new(device: Device, bytes: usize) -> Result<Self, TchError> {
        let buffer = || -> Result<Tensor, TchError> {
            let len = i64::try_from(bytes).unwrap_or(i64::MAX);
            let host = Tensor::f_empty([len], (Kind::Uint8, Device::Cpu))?;
            match device {
                Device::Cpu => Ok(host),
                gpu => host.f_pin_memory(gpu),
            }
        };
        Ok(Staging {
            device,
            buffers: [buffer()?, buffer()?],
            current: 0,
            filled: 0,
            sources: Vec::new(),
            queued: Vec::new(),
        })
    }

    fn capacity(&self) -> usize {
        self.buffers[0].numel()
    }

    fn put(
        &mut self,
        name: &str,
        var: &Tensor,
        values: &StoredValues<'a>,
    ) -> Result<(), CopyFailed> {
        let failed = CopyFailed::naming(name);
        let layout = Layout {
            kind: values.kind,
            shape: values.shape.clone(),
            transpose: values.transpose,
        };
        let bytes = values.bytes;
        if bytes.len() <= self.capacity() {
            if bytes.len() > self.capacity() - self.filled {
                self.flush()?;
            }
            let range = self.take(bytes);
            self.queued.push(Queued {
                name: name.to_owned(),
                range,
                destination: Destination::Whole {
                    var: var.shallow_clone(),
                    layout,
                },
            });
            return Ok(());
        }
        let len = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
        let gathered = Tensor::f_empty([len], (Kind::Uint8, self.device)).map_err(failed)?;
        let mut at = 0;
        let pieces = bytes.chunks(self.capacity()).count();
        for (index, piece) in bytes.chunks(self.capacity()).enumerate() {
            if piece.len() > self.capacity() - self.filled {
                self.flush()?;
            }
            let range = self.take(piece);
            let last = (index + 1 == pieces).then(|| (var.shallow_clone(), layout.clone()));
            self.queued.push(Queued {
                name: name.to_owned(),
                range,
                destination: Destination::Piece {
                    gathered: gathered.shallow_clone(),
                    at,
                    last,
                },
            });
            at += i64::try_from(piece.len()).unwrap_or(i64::MAX);
        }
        Ok(())
    }

    /// Takes the next `bytes.len()` bytes of the current buffer for `bytes`; the range.
    fn take(&mut self, bytes: &'a [u8]) -> Range<usize> {
        let range = self.filled..self.filled + bytes.len();
        self.sources.push(bytes);
        self.filled = range.end;
        range
    }

    /// Fills the current buffer, issues its copies and switches buffers.
    ///
    /// The buffer was last copied from two flushes ago, and the previous flush waited for that.
    /// After filling, the device is synchronised: that waits for the *other* buffer's copies
    /// (issued at the previous flush, running while this one was filled), which is what filling
    /// it next needs; this buffer's copies, issued after, run as the host fills the other.
    fn flush(&mut self) -> Result<(), CopyFailed> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let fill = host_bytes_mut(&mut self.buffers[self.current]).map(|buffer| {
            copy_concatenated(&mut buffer[..self.filled], &self.sources);
        });
        if let Err(source) = fill {
            let name = self.queued[0].name.clone();
            return Err(CopyFailed { name, source });
        }
        self.sources.clear();
        self.synchronize();
        let buffer = &self.buffers[self.current];
        for queued in self.queued.drain(..) {
            issue(buffer, &queued, self.device).map_err(CopyFailed::naming(&queued.name))?;
        }
        self.current = 1 - self.current;
        self.filled = 0;
        Ok(())
    }

    fn synchronize(&self) {
        if let Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(i64::try_from(index).unwrap_or_default());
        }
    }

    fn finish(&mut self) -> Result<(), CopyFailed> {
        self.flush()?;
        self.synchronize();
        Ok(())
    }
}

/// One queued copy: the piece to the device (asynchronous from pinned memory), then into place.
fn issue(buffer: &Tensor, queued: &Queued, device: Device) -> Result<(), TchError> {
    let start = i64::try_from(queued.range.start).unwrap_or(i64::MAX);
    let len = i64::try_from(queued.range.len()).unwrap_or(i64::MAX);
    // `copy = true`: on the CPU (staging checked without a GPU) a real copy, not a view of a
    // buffer that is about to be refilled.
    let on_device =
        buffer
            .f_narrow(0, start, len)?
            .f_to_device_(device, Kind::Uint8, true, true)?;
    match &queued.destination {
        Destination::Whole { var, layout } => assign(var, &on_device, layout),
        Destination::Piece { gathered, at, last } => {
            gathered.f_narrow(0, *at, len)?.f_copy_(&on_device)?;
            match last {
                Some((var, layout)) => assign(var, gathered, layout),
                None => Ok(()),
            }
        }
    }
}

/// Makes a parameter's bytes (on the variable's device) the variable's values.
fn assign(var: &Tensor, bytes: &Tensor, layout: &Layout) -> Result<(), TchError> {
    let values = bytes.f_view_dtype(layout.kind)?.f_view(&*layout.shape)?;
    let values = if layout.transpose {
        values.f_tr()?
    } else {
        values
    };
    var.shallow_clone().f_copy_(&values)
}

/// Copies `src` into `dst` (the same length) over up to libtorch's thread count (at most 8)
/// when it is large: reading a page-cache-backed map runs at a few GB/s per core.
fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    copy_concatenated(dst, &[src]);
}

/// Copies the concatenation of `sources` into `dst` (their total length), split into equal parts
/// over up to libtorch's thread count (at most 8) when it is large — parts cut across sources,
/// so many small tensors spread over the threads as well as one large one.
fn copy_concatenated(dst: &mut [u8], sources: &[&[u8]]) {
    let threads = (dst.len() / BYTES_PER_THREAD).clamp(1, copy_threads());
    if threads == 1 {
        copy_from_concatenation(dst, sources, 0);
        return;
    }
    let part = dst.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (index, dst) in dst.chunks_mut(part).enumerate() {
            scope.spawn(move || copy_from_concatenation(dst, sources, index * part));
        }
    });
}

/// Fills `dst` from the concatenation of `sources`, starting `start` bytes into it.
fn copy_from_concatenation(dst: &mut [u8], sources: &[&[u8]], mut start: usize) {
    let mut dst = dst;
    for source in sources {
        if dst.is_empty() {
            return;
        }
        if start >= source.len() {
            start -= source.len();
            continue;
        }
        let source = &source[start..];
        start = 0;
        let n = source.len().min(dst.len());
        let (head, tail) = dst.split_at_mut(n);
        head.copy_from_slice(&source[..n]);
        dst = tail;
    }
}

fn copy_threads() -> usize {
    usize::try_from(tch::get_num_threads())
        .unwrap_or(1)
        .clamp(1, 8)
}

/// The memory of a contiguous CPU tensor (pinned or not), to write into.
#[allow(unsafe_code)]
fn host_bytes_mut(tensor: &mut Tensor) -> Result<&mut [u8], TchError> {
    if tensor.device() != Device::Cpu || !tensor.is_contiguous() {
        return Err(TchError::Kind(format!(
            "expected a contiguous CPU tensor, got one on {:?}",
            tensor.device()
        )));
    }
    let len = tensor.numel() * tensor.kind().elt_size_in_bytes();
    if len == 0 {
        return Ok(&mut []);
    }
    let data = tensor.data_ptr().cast::<u8>();
    // SAFETY: a defined, contiguous CPU tensor of `numel` elements owns `len` initialised,
    // writable bytes from `data_ptr` (checked above: device and layout; `numel` > 0, so the
    // pointer is not null). The slice borrows `tensor` mutably, so it cannot outlive it; other
    // handles to the same storage (the variable store's) are not used while it lives — the
    // loader holds the only reference that reads or writes the values during the copy.
    Ok(unsafe { std::slice::from_raw_parts_mut(data, len) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameters of every kind of shape the loader meets, with their expected values.
    fn cases() -> Vec<(Tensor, Tensor, bool)> {
        tch::manual_seed(7);
        let mut cases = Vec::new();
        // (stored, variable of the parameter's shape and dtype, transpose)
        for (shape, stored_kind, var_kind) in [
            (vec![3_i64, 5], Kind::Float, Kind::Float),
            (vec![1], Kind::Half, Kind::Half),
            (vec![40, 7], Kind::Float, Kind::Half),
            (vec![2, 3, 3, 3], Kind::BFloat16, Kind::Float),
            (vec![129], Kind::Half, Kind::Half),
            (vec![17, 4], Kind::Float, Kind::BFloat16),
        ] {
            let stored = Tensor::randn(&*shape, (Kind::Float, Device::Cpu)).to_kind(stored_kind);
            let var = Tensor::zeros(&*shape, (var_kind, Device::Cpu));
            cases.push((stored, var, false));
        }
        let stored = Tensor::randn([6, 11], (Kind::Float, Device::Cpu));
        cases.push((
            stored,
            Tensor::zeros([11, 6], (Kind::Half, Device::Cpu)),
            true,
        ));
        cases
    }

    fn bytes_of(tensor: &Tensor) -> Vec<u8> {
        let mut bytes = vec![0_u8; tensor.numel() * tensor.kind().elt_size_in_bytes()];
        tensor
            .f_copy_data_u8(&mut bytes, tensor.numel())
            .expect("CPU tensor bytes");
        bytes
    }

    fn load_all(make: impl FnOnce() -> Upload<'static>) {
        let cases = cases();
        let stored_bytes: Vec<Vec<u8>> = cases.iter().map(|(s, _, _)| bytes_of(s)).collect();
        let mut upload = make();
        for (i, ((stored, var, transpose), bytes)) in cases.iter().zip(&stored_bytes).enumerate() {
            let values = StoredValues {
                bytes,
                kind: stored.kind(),
                shape: stored.size(),
                transpose: *transpose,
            };
            upload.put(&format!("p{i}"), var, &values).expect("copied");
        }
        upload.finish().expect("finished");
        for (i, (stored, var, transpose)) in cases.iter().enumerate() {
            let expected = if *transpose {
                stored.tr()
            } else {
                stored.shallow_clone()
            };
            let expected = expected.to_kind(var.kind());
            assert!(var.equal(&expected), "parameter {i} differs");
        }
    }

    #[test]
    fn straight_copies_on_the_cpu() {
        load_all(Upload::new);
    }

    /// Buffer sizes that pack several parameters into one buffer, split parameters over several
    /// buffers (at byte offsets inside elements) and fill a buffer exactly.
    #[test]
    fn staged_copies_pack_and_split() {
        for bytes in [1, 7, 16, 60, 258, 4096] {
            load_all(|| Upload::staged_everywhere(bytes));
        }
    }

    /// One large source, and many small ones of odd lengths, split over threads at offsets
    /// inside sources.
    #[test]
    fn large_copies_use_several_threads_and_stay_exact() {
        let src: Vec<u8> = (0..3 * BYTES_PER_THREAD + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut dst = vec![0_u8; src.len()];
        copy_bytes(&mut dst, &src);
        assert!(dst == src);

        let mut sources = Vec::new();
        let mut rest = src.as_slice();
        for len in (0..).map(|i| 1 + (i * 7919) % 100_003) {
            if rest.is_empty() {
                break;
            }
            let (head, tail) = rest.split_at(len.min(rest.len()));
            sources.push(head);
            rest = tail;
        }
        let mut dst = vec![0_u8; src.len()];
        copy_concatenated(&mut dst, &sources);
        assert!(dst == src);
    }

    #[test]
    fn writing_needs_a_contiguous_cpu_tensor() {
        let mut transposed = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)).tr();
        assert!(host_bytes_mut(&mut transposed).is_err());
    }
}
