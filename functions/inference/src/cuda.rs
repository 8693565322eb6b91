//! CUDA graphs and the caching allocator's statistics, which `tch` does not bind: a small C++
//! shim over libtorch (`csrc/cuda_graph.cpp`, built by build.rs with the `cuda` feature).
//!
//! A [`CudaGraph`] records the kernels a closure launches once and replays them with one launch,
//! removing the per-operation host overhead of eager execution (about 3,000 kernels per SDXL
//! UNet step). What a replay reads and writes are the *same* device buffers as at capture time:
//! copy new inputs into the tensors the closure read, and read results from the tensors it
//! returned. Scalars passed as Rust values are baked into the recording.

// The FFI calls below are the crate's only unsafe code besides the weights' memory map. Each is
// a call into the shim with pointers this module owns; the shim catches every C++ exception.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_void};
use std::ptr::NonNull;

use tch::Tensor;

use crate::{EngineError, Result};

unsafe extern "C" {
    fn darkroom_graph_new(device: i32, error: *mut *mut c_char) -> *mut c_void;
    fn darkroom_graph_free(graph: *mut c_void);
    fn darkroom_graph_enter_stream(graph: *mut c_void, error: *mut *mut c_char);
    fn darkroom_graph_exit_stream(graph: *mut c_void, error: *mut *mut c_char);
    fn darkroom_graph_capture_begin(
        graph: *mut c_void,
        pool_a: u64,
        pool_b: u64,
        error: *mut *mut c_char,
    );
    fn darkroom_graph_capture_end(graph: *mut c_void, error: *mut *mut c_char);
    fn darkroom_graph_pool(
        graph: *mut c_void,
        pool_a: *mut u64,
        pool_b: *mut u64,
        error: *mut *mut c_char,
    );
    fn darkroom_graph_replay(graph: *mut c_void, error: *mut *mut c_char);
    fn darkroom_cuda_memory(device: i32, out: *mut u64, error: *mut *mut c_char);
    fn darkroom_cuda_reset_peak_memory(device: i32, error: *mut *mut c_char);
    fn darkroom_cuda_empty_cache(error: *mut *mut c_char);
    fn darkroom_cuda_set_cudnn_benchmark(enabled: bool, error: *mut *mut c_char);
    fn darkroom_cuda_set_attention(fa3: bool, cudnn_first: bool, error: *mut *mut c_char);
    fn darkroom_kernels_load(device: i32, source: *const c_char, error: *mut *mut c_char);
    fn darkroom_group_norm(
        xs: *const c_void,
        shift: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        groups: i64,
        eps: f64,
        silu: bool,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn darkroom_geglu(input: *const c_void, error: *mut *mut c_char) -> *mut c_void;
    fn darkroom_add_layer_norm(
        a: *const c_void,
        b: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        eps: f64,
        sum: *mut *mut c_void,
        normed: *mut *mut c_void,
        error: *mut *mut c_char,
    ) -> bool;
}

/// Runs one shim call with an error slot; a set slot becomes [`EngineError::Cuda`].
fn call<R>(what: &'static str, f: impl FnOnce(*mut *mut c_char) -> R) -> Result<R> {
    crate::shim::call(f).map_err(|message| EngineError::Cuda { what, message })
}

/// A memory pool of recorded graphs; graphs captured into one pool share its memory, which is
/// safe when they are replayed one after another on one stream (as the denoising loop does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPool(u64, u64);

/// A recorded sequence of CUDA work (see the module documentation).
#[derive(Debug)]
pub struct CudaGraph {
    raw: NonNull<c_void>,
}

// SAFETY: the graph is an owned C++ object with no thread affinity: it can be replayed from any
// thread (on that thread's current stream) and is only reached through `&mut`/`&` of this
// struct; `replay` takes `&self` but CUDA serialises launches on a stream.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// Runs `f` once eagerly (a warm-up: cuBLAS/cuDNN workspaces and lazy initialisation must
    /// not happen during a capture), then records a second run of it. Both run on a side stream
    /// after the work already queued; the caller's stream waits for them before this returns.
    /// `pool`: share another graph's memory pool, or `None` for a new one.
    ///
    /// # Errors
    /// [`EngineError::Cuda`] when the shim fails, or `f`'s error (the capture is then ended and
    /// discarded). `f` must not synchronise with the host or allocate pinned host memory.
    pub fn capture<R>(
        device: usize,
        pool: Option<MemoryPool>,
        mut f: impl FnMut() -> Result<R>,
    ) -> Result<(CudaGraph, R)> {
        let device = i32::try_from(device).map_err(|_| EngineError::Cuda {
            what: "graph",
            message: format!("device index {device} is out of range"),
        })?;
        // SAFETY: plain constructor; null only with an error set.
        let raw = call("graph", |e| unsafe { darkroom_graph_new(device, e) })?;
        let raw = NonNull::new(raw).ok_or(EngineError::Cuda {
            what: "graph",
            message: "the shim returned no graph".to_owned(),
        })?;
        let graph = CudaGraph { raw };
        let ptr = graph.raw.as_ptr();
        // SAFETY: `ptr` is this live graph for every call below.
        call("graph stream", |e| unsafe {
            darkroom_graph_enter_stream(ptr, e)
        })?;
        let recorded = (|| -> Result<R> {
            f()?;
            let (a, b) = pool.map_or((0, 0), |p| (p.0, p.1));
            call("graph capture", |e| unsafe {
                darkroom_graph_capture_begin(ptr, a, b, e)
            })?;
            let value = f();
            let ended = call("graph capture", |e| unsafe {
                darkroom_graph_capture_end(ptr, e)
            });
            let value = value?;
            ended?;
            Ok(value)
        })();
        let exited = call("graph stream", |e| unsafe {
            darkroom_graph_exit_stream(ptr, e)
        });
        let value = recorded?;
        exited?;
        Ok((graph, value))
    }

    /// The graph's memory pool, to capture further graphs into.
    pub fn pool(&self) -> Result<MemoryPool> {
        let (mut a, mut b) = (0u64, 0u64);
        let ptr = self.raw.as_ptr();
        // SAFETY: live graph; the out-pointers are locals.
        call("graph pool", |e| unsafe {
            darkroom_graph_pool(ptr, &mut a, &mut b, e)
        })?;
        Ok(MemoryPool(a, b))
    }

    /// Launches the recorded work on the current stream.
    pub fn replay(&self) -> Result<()> {
        let ptr = self.raw.as_ptr();
        // SAFETY: live graph.
        call("graph replay", |e| unsafe { darkroom_graph_replay(ptr, e) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: created by darkroom_graph_new, freed once.
        unsafe { darkroom_graph_free(self.raw.as_ptr()) }
    }
}

/// The caching allocator's view of one device, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Held by live tensors now.
    pub allocated: u64,
    /// Most held by live tensors since the last [`reset_peak_memory`].
    pub peak_allocated: u64,
    /// Reserved from the driver now (live tensors plus the allocator's cache).
    pub reserved: u64,
    /// Most reserved since the last [`reset_peak_memory`].
    pub peak_reserved: u64,
}

/// The caching allocator's statistics for CUDA device `device`.
pub fn memory_stats(device: usize) -> Result<MemoryStats> {
    let device = i32::try_from(device).unwrap_or(i32::MAX);
    let mut out = [0u64; 4];
    // SAFETY: `out` has the 4 slots the shim writes.
    call("memory stats", |e| unsafe {
        darkroom_cuda_memory(device, out.as_mut_ptr(), e)
    })?;
    Ok(MemoryStats {
        allocated: out[0],
        peak_allocated: out[1],
        reserved: out[2],
        peak_reserved: out[3],
    })
}

/// Restarts the peaks of [`memory_stats`].
pub fn reset_peak_memory(device: usize) -> Result<()> {
    let device = i32::try_from(device).unwrap_or(i32::MAX);
    // SAFETY: no pointers besides the error slot.
    call("memory stats", |e| unsafe {
        darkroom_cuda_reset_peak_memory(device, e)
    })
}

/// Returns the allocator's cached, unused blocks to the driver.
pub fn empty_cache() -> Result<()> {
    // SAFETY: no pointers besides the error slot.
    call("empty cache", |e| unsafe { darkroom_cuda_empty_cache(e) })
}

/// Turns cuDNN's autotuning on or off, process-wide: with it, each convolution shape times the
/// available algorithms once and keeps the fastest.
pub fn set_cudnn_benchmark(enabled: bool) -> Result<()> {
    // SAFETY: no pointers besides the error slot.
    call("cudnn benchmark", |e| unsafe {
        darkroom_cuda_set_cudnn_benchmark(enabled, e)
    })
}

/// Which fused attention kernels scaled-dot-product attention prefers, process-wide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernels {
    /// libtorch's default order (FlashAttention 2, memory-efficient, math, cuDNN).
    #[default]
    Default,
    /// FlashAttention 3 (Hopper GPUs) where the build has it, else the default order.
    Flash3,
    /// cuDNN's fused attention first.
    CuDnn,
}

/// Sets the attention kernels' preference (see [`AttentionKernels`]).
pub fn set_attention_kernels(kernels: AttentionKernels) -> Result<()> {
    let (fa3, cudnn_first) = match kernels {
        AttentionKernels::Default => (false, false),
        AttentionKernels::Flash3 => (true, false),
        AttentionKernels::CuDnn => (false, true),
    };
    // SAFETY: no pointers besides the error slot.
    call("attention kernels", |e| unsafe {
        darkroom_cuda_set_attention(fa3, cudnn_first, e)
    })
}

/// The fused kernels' CUDA source (compiled by NVRTC for the device at run time).
const KERNELS_SOURCE: &CStr = {
    match CStr::from_bytes_until_nul(concat!(include_str!("../csrc/kernels.cu"), "\0").as_bytes()) {
        Ok(source) => source,
        Err(_) => panic!("csrc/kernels.cu contains a NUL byte"),
    }
};

/// Compiles the fused kernels (`csrc/kernels.cu`) for CUDA device `device`'s architecture and
/// loads them; once per architecture (about a second), later calls return at once.
pub fn load_fused_kernels(device: usize) -> Result<()> {
    let device = i32::try_from(device).unwrap_or(i32::MAX);
    // SAFETY: the source is a NUL-terminated static string.
    call("fused kernels", |e| unsafe {
        darkroom_kernels_load(device, KERNELS_SOURCE.as_ptr(), e)
    })
}

/// Takes ownership of a tensor the shim allocated (null: the shim reported an error instead).
fn owned_tensor(what: &'static str, raw: *mut c_void) -> Result<Tensor> {
    if raw.is_null() {
        return Err(EngineError::Cuda {
            what,
            message: "the shim returned no tensor".to_owned(),
        });
    }
    // SAFETY: the shim returns a `new at::Tensor`, tch's tensor handle, owned by nobody else.
    Ok(unsafe { Tensor::from_ptr(raw.cast()) })
}

/// GroupNorm of `xs` `[n, c, ...]` (contiguous, on a CUDA device whose kernels are loaded), with
/// `shift` `[n, c]` added per channel first and SiLU applied after when asked: two kernels (the
/// statistics, then normalisation and activation) in place of libtorch's four or five.
pub fn fused_group_norm(
    xs: &Tensor,
    shift: Option<&Tensor>,
    weight: &Tensor,
    bias: &Tensor,
    groups: i64,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let shift = shift.map_or(std::ptr::null(), |s| s.as_ptr().cast::<c_void>());
    // SAFETY: every pointer is a live tch tensor handle (or null for no shift), only read.
    let raw = call("fused group norm", |e| unsafe {
        darkroom_group_norm(
            xs.as_ptr().cast(),
            shift,
            weight.as_ptr().cast(),
            bias.as_ptr().cast(),
            groups,
            eps,
            silu,
            e,
        )
    })?;
    owned_tensor("fused group norm", raw)
}

/// GEGLU of `input` `[..., 2 × inner]` (contiguous, CUDA): the first half times the exact GELU
/// of the second, `[..., inner]`, in one kernel.
pub fn fused_geglu(input: &Tensor) -> Result<Tensor> {
    // SAFETY: `input` is a live tch tensor handle, only read.
    let raw = call("fused geglu", |e| unsafe {
        darkroom_geglu(input.as_ptr().cast(), e)
    })?;
    owned_tensor("fused geglu", raw)
}

/// `(a + b, layer_norm(a + b))` over the last dimension of two like tensors (contiguous, CUDA):
/// a residual addition and the next LayerNorm in one kernel.
pub fn fused_add_layer_norm(
    a: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let (mut sum, mut normed) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: live tch tensor handles, only read; the out-pointers are locals.
    call("fused add layer norm", |e| unsafe {
        darkroom_add_layer_norm(
            a.as_ptr().cast(),
            b.as_ptr().cast(),
            weight.as_ptr().cast(),
            bias.as_ptr().cast(),
            eps,
            &mut sum,
            &mut normed,
            e,
        )
    })?;
    Ok((
        owned_tensor("fused add layer norm", sum)?,
        owned_tensor("fused add layer norm", normed)?,
    ))
}
