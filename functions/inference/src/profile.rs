//! libtorch's profiler (Kineto), which `tch` does not bind: which ATen operations a piece of code
//! dispatched and, on a GPU, which kernels ran and for how long (`csrc/profiler.cpp`).
//!
//! `darkroom-bench --kernel-profile` prints where one image's time goes with it: the GPU time by
//! [`KernelClass`] (matrix products, attention, normalisation…) and the longest kernels, or on
//! the CPU the operations the pipeline called. That is the measurement behind each kernel change
//! of the engine (which share of a denoising step a fusion can remove).

// FFI into the shim: two calls, each with pointers this module owns.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::c_char;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};

use crate::{EngineError, Result};

unsafe extern "C" {
    fn darkroom_profiler_start(cuda: bool, error: *mut *mut c_char);
    fn darkroom_profiler_stop(error: *mut *mut c_char) -> *mut c_char;
}

/// libtorch has one profiler per process: one [`record`] at a time.
static PROFILER: Mutex<()> = Mutex::new(());

/// What a [`ProfiledEvent`] was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// An ATen operation dispatched on the CPU (`aten::linear`), including those other
    /// operations call.
    Op,
    /// A kernel on the GPU.
    Kernel,
    /// A copy on the GPU (host↔device or device↔device).
    Memcpy,
    /// A fill on the GPU.
    Memset,
}

/// One event the profiler recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfiledEvent {
    /// What it was.
    pub kind: EventKind,
    /// The operation's name (`aten::add`) or the kernel's (a C++ signature).
    pub name: String,
    /// The host thread that started it.
    pub thread: u64,
    /// Start, in nanoseconds on the profiler's clock.
    pub start_ns: u64,
    /// How long it ran.
    pub duration_ns: u64,
}

impl ProfiledEvent {
    fn end_ns(&self) -> u64 {
        self.start_ns.saturating_add(self.duration_ns)
    }
}

/// Calls and time of one name (or one [`KernelClass`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    /// The operation, kernel or class.
    pub name: String,
    /// How many times it ran.
    pub calls: u64,
    /// Its total duration.
    pub total_ns: u64,
}

/// What a GPU kernel does, from its name: the groups a denoising step's time is discussed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelClass {
    /// Matrix products (cuBLAS, CUTLASS): the linear layers.
    MatrixProduct,
    /// Fused attention (cuDNN, FlashAttention, memory-efficient) and softmax.
    Attention,
    /// Convolutions (cuDNN).
    Convolution,
    /// GroupNorm and LayerNorm, libtorch's or Darkroom's fused ones.
    Normalisation,
    /// Elementwise work: additions, activations, GEGLU, dtype casts.
    Elementwise,
    /// Layout changes and copies: NCHW↔NHWC transposes, concatenations, `copy_`, GPU memcpy and
    /// memset.
    Layout,
    /// Nearest-neighbour upsampling.
    Upsample,
    /// Reductions and everything else.
    Other,
}

impl KernelClass {
    /// Every class, in table order.
    pub const ALL: [KernelClass; 8] = [
        KernelClass::MatrixProduct,
        KernelClass::Attention,
        KernelClass::Convolution,
        KernelClass::Normalisation,
        KernelClass::Elementwise,
        KernelClass::Layout,
        KernelClass::Upsample,
        KernelClass::Other,
    ];

    /// The class of a GPU event: memcpy and memset are [`KernelClass::Layout`], kernels go by
    /// their name. The tests are ordered: cuDNN's convolutions are implicit GEMMs, its attention
    /// kernels mention softmax, so the narrower classes are tried first.
    pub fn of(kind: EventKind, name: &str) -> KernelClass {
        if matches!(kind, EventKind::Memcpy | EventKind::Memset) {
            return KernelClass::Layout;
        }
        let name = name.to_ascii_lowercase();
        let has = |parts: &[&str]| parts.iter().any(|part| name.contains(part));
        if has(&[
            "group_norm",
            "groupnorm",
            "layer_norm",
            "layernorm",
            "rowwisemoments",
        ]) {
            KernelClass::Normalisation
        } else if has(&["flash", "fmha", "sdpa", "attention", "softmax"]) {
            KernelClass::Attention
        } else if has(&["nchwtonhwc", "nhwctonchw", "transpose", "catarray", "copy"]) {
            KernelClass::Layout
        } else if has(&["fprop", "conv", "implicit_convolve", "winograd", "dgrad"]) {
            KernelClass::Convolution
        } else if has(&["gemm", "cublas", "cutlass", "xmma", "splitk"]) {
            KernelClass::MatrixProduct
        } else if has(&["upsample"]) {
            KernelClass::Upsample
        } else if has(&["elementwise", "geglu", "vectorized", "unrolled"]) {
            KernelClass::Elementwise
        } else {
            KernelClass::Other
        }
    }

    /// The name in tables.
    pub fn label(self) -> &'static str {
        match self {
            KernelClass::MatrixProduct => "matrix products",
            KernelClass::Attention => "attention",
            KernelClass::Convolution => "convolutions",
            KernelClass::Normalisation => "GroupNorm / LayerNorm",
            KernelClass::Elementwise => "elementwise",
            KernelClass::Layout => "layout and copies",
            KernelClass::Upsample => "upsampling",
            KernelClass::Other => "other",
        }
    }
}

/// What ran while [`record`] watched.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    events: Vec<ProfiledEvent>,
}

/// Runs `f` under libtorch's profiler: CPU operations, and GPU activity when `gpu` is set (a
/// CUDA build; replays of CUDA graphs are recorded kernel by kernel). One profile runs at a
/// time in a process; others wait. On the GPU, synchronise inside `f` so its work has finished
/// when it returns.
///
/// # Errors
/// [`EngineError::Profiler`] when libtorch cannot start or stop its profiler (e.g. one started
/// elsewhere is running).
pub fn record<T>(gpu: bool, f: impl FnOnce() -> T) -> Result<(T, Profile)> {
    let _only_one = PROFILER.lock().unwrap_or_else(PoisonError::into_inner);
    // SAFETY: no pointers besides the error slot.
    crate::shim::call(|error| unsafe { darkroom_profiler_start(gpu, error) })
        .map_err(EngineError::Profiler)?;
    let running = Running;
    let value = f();
    let profile = running.stop()?;
    Ok((value, profile))
}

/// The profiler between start and stop: stopped on drop if `f` panics, so the next one starts.
struct Running;

impl Running {
    fn stop(self) -> Result<Profile> {
        std::mem::forget(self);
        // SAFETY: no pointers besides the error slot.
        let text = crate::shim::call(|error| unsafe { darkroom_profiler_stop(error) })
            .map_err(EngineError::Profiler)?;
        if text.is_null() {
            return Err(EngineError::Profiler(
                "the shim returned no events".to_owned(),
            ));
        }
        // SAFETY: a strdup'ed string from the shim, used only here.
        let text = unsafe { crate::shim::take_string(text) };
        Profile::parse(&text)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: as in `stop`; the events of a panicking `f` are dropped.
        if let Ok(text) = crate::shim::call(|error| unsafe { darkroom_profiler_stop(error) })
            && !text.is_null()
        {
            // SAFETY: a strdup'ed string from the shim, freed here.
            drop(unsafe { crate::shim::take_string(text) });
        }
    }
}

impl Profile {
    /// A profile of these events (for tables of events recorded elsewhere, and tests).
    pub fn from_events(events: Vec<ProfiledEvent>) -> Profile {
        Profile { events }
    }

    /// Reads the shim's lines: `kind \t thread \t start_ns \t duration_ns \t name`.
    fn parse(text: &str) -> Result<Profile> {
        let bad = |line: &str| EngineError::Profiler(format!("unreadable event line {line:?}"));
        let mut events = Vec::new();
        for line in text.lines().filter(|line| !line.is_empty()) {
            let mut fields = line.splitn(5, '\t');
            let mut next = || fields.next().ok_or_else(|| bad(line));
            let kind = match next()? {
                "op" => EventKind::Op,
                "kernel" => EventKind::Kernel,
                "memcpy" => EventKind::Memcpy,
                "memset" => EventKind::Memset,
                _ => return Err(bad(line)),
            };
            let number = |field: &str| field.parse::<u64>().map_err(|_| bad(line));
            let thread = number(next()?)?;
            let start_ns = number(next()?)?;
            let duration_ns = number(next()?)?;
            let name = next()?.to_owned();
            events.push(ProfiledEvent {
                kind,
                name,
                thread,
                start_ns,
                duration_ns,
            });
        }
        Ok(Profile { events })
    }

    /// Every event, in the profiler's order.
    pub fn events(&self) -> &[ProfiledEvent] {
        &self.events
    }

    /// The GPU events: kernels, copies and fills.
    pub fn device_events(&self) -> impl Iterator<Item = &ProfiledEvent> {
        self.events.iter().filter(|e| e.kind != EventKind::Op)
    }

    /// The operations called from outside any other operation: what the code itself asked
    /// libtorch for (`aten::linear`, not the `aten::addmm` it runs), in start order.
    pub fn top_level_ops(&self) -> Vec<&ProfiledEvent> {
        let mut ops: Vec<&ProfiledEvent> = self
            .events
            .iter()
            .filter(|e| e.kind == EventKind::Op)
            .collect();
        // Enclosing operations first: by thread, start, longest first.
        ops.sort_by(|a, b| {
            (a.thread, a.start_ns, std::cmp::Reverse(a.duration_ns)).cmp(&(
                b.thread,
                b.start_ns,
                std::cmp::Reverse(b.duration_ns),
            ))
        });
        let mut top = Vec::new();
        let mut open: Option<(u64, u64)> = None; // (thread, end) of the last top-level op
        for op in ops {
            let inside =
                open.is_some_and(|(thread, end)| thread == op.thread && op.end_ns() <= end);
            if !inside {
                open = Some((op.thread, op.end_ns()));
                top.push(op);
            }
        }
        top.sort_by_key(|op| op.start_ns);
        top
    }

    /// Calls and total time per name of `events`, longest total first.
    pub fn tally<'a>(events: impl IntoIterator<Item = &'a ProfiledEvent>) -> Vec<Tally> {
        let by_name = calls_and_time(events, |event| event.name.as_str());
        sorted(by_name.into_iter().map(|(name, (calls, total_ns))| Tally {
            name: name.to_owned(),
            calls,
            total_ns,
        }))
    }

    /// Calls and GPU time per [`KernelClass`], in [`KernelClass::ALL`]'s order (classes that did
    /// not run are left out).
    pub fn by_class(&self) -> Vec<(KernelClass, Tally)> {
        let by_class = calls_and_time(self.device_events(), |event| {
            KernelClass::of(event.kind, &event.name)
        });
        KernelClass::ALL
            .into_iter()
            .filter_map(|class| {
                let (calls, total_ns) = by_class.get(&class)?;
                Some((
                    class,
                    Tally {
                        name: class.label().to_owned(),
                        calls: *calls,
                        total_ns: *total_ns,
                    },
                ))
            })
            .collect()
    }

    /// A Markdown report: with GPU events, the time by class and the `top` longest kernels;
    /// otherwise the `top` longest top-level operations. `per`: divide times and calls by this
    /// (e.g. the steps of a generation) for a second column; 1 to leave it out.
    pub fn report(&self, top: usize, per: (usize, &str)) -> String {
        let mut out = String::new();
        let device_total: u64 = self.device_events().map(|e| e.duration_ns).sum();
        if device_total > 0 {
            let kernels = self.device_events().count();
            let _ = writeln!(
                out,
                "GPU time {:.1} ms in {kernels} kernels, copies and fills\n",
                ms(device_total)
            );
            let classes: Vec<Tally> = self.by_class().into_iter().map(|(_, t)| t).collect();
            table(&mut out, "kernels", &classes, device_total, per);
            out.push('\n');
            let longest = Profile::tally(self.device_events());
            table(
                &mut out,
                "kernel",
                &longest[..top.min(longest.len())],
                device_total,
                per,
            );
        } else {
            let ops = self.top_level_ops();
            let total: u64 = ops.iter().map(|op| op.duration_ns).sum();
            let _ = writeln!(
                out,
                "CPU time {:.1} ms in {} operations called by the pipeline (top level)\n",
                ms(total),
                ops.len()
            );
            let longest = Profile::tally(ops);
            table(
                &mut out,
                "operation",
                &longest[..top.min(longest.len())],
                total,
                per,
            );
        }
        out
    }
}

/// Calls and total duration of `events` by `key`.
fn calls_and_time<'a, K: std::hash::Hash + Eq>(
    events: impl IntoIterator<Item = &'a ProfiledEvent>,
    key: impl Fn(&'a ProfiledEvent) -> K,
) -> HashMap<K, (u64, u64)> {
    let mut totals: HashMap<K, (u64, u64)> = HashMap::new();
    for event in events {
        let entry = totals.entry(key(event)).or_default();
        entry.0 += 1;
        entry.1 += event.duration_ns;
    }
    totals
}

fn sorted(tallies: impl Iterator<Item = Tally>) -> Vec<Tally> {
    let mut tallies: Vec<Tally> = tallies.collect();
    tallies.sort_by(|a, b| {
        b.total_ns
            .cmp(&a.total_ns)
            .then_with(|| a.name.cmp(&b.name))
    });
    tallies
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Kernel names are long C++ signatures: the start says which kernel it is.
fn shortened(name: &str, width: usize) -> String {
    let cut = match name.char_indices().nth(width) {
        Some((end, _)) => format!("{}…", &name[..end]),
        None => name.to_owned(),
    };
    cut.replace('|', "\\|")
}

fn table(out: &mut String, what: &str, rows: &[Tally], total_ns: u64, per: (usize, &str)) {
    let (per_count, per_name) = per;
    let per_column = per_count > 1;
    let _ = write!(out, "| {what} | calls | ms | share |");
    if per_column {
        let _ = write!(out, " calls/{per_name} | ms/{per_name} |");
    }
    out.push('\n');
    out.push_str(if per_column {
        "|---|---:|---:|---:|---:|---:|\n"
    } else {
        "|---|---:|---:|---:|\n"
    });
    for row in rows {
        let share = 100.0 * row.total_ns as f64 / total_ns.max(1) as f64;
        let _ = write!(
            out,
            "| {} | {} | {:.2} | {share:.1} % |",
            shortened(&row.name, 90),
            row.calls,
            ms(row.total_ns)
        );
        if per_column {
            let _ = write!(
                out,
                " {:.1} | {:.3} |",
                row.calls as f64 / per_count as f64,
                ms(row.total_ns) / per_count as f64
            );
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(
        kind: EventKind,
        name: &str,
        thread: u64,
        start_ns: u64,
        duration_ns: u64,
    ) -> ProfiledEvent {
        ProfiledEvent {
            kind,
            name: name.to_owned(),
            thread,
            start_ns,
            duration_ns,
        }
    }

    #[test]
    fn the_shims_lines_are_read_and_bad_ones_refused() {
        let profile = Profile::parse(
            "op\t7\t100\t50\taten::linear\nkernel\t7\t120\t10\tvoid gemm<float, 128>(int, float*)\n",
        )
        .expect("two good lines");
        assert_eq!(
            profile.events(),
            [
                event(EventKind::Op, "aten::linear", 7, 100, 50),
                event(
                    EventKind::Kernel,
                    "void gemm<float, 128>(int, float*)",
                    7,
                    120,
                    10
                ),
            ]
        );
        for bad in [
            "op\t7\t100\taten::linear\n",
            "cpu\t7\t1\t2\tx\n",
            "op\tx\t1\t2\ty\n",
        ] {
            assert!(
                matches!(Profile::parse(bad), Err(EngineError::Profiler(_))),
                "{bad:?} was read"
            );
        }
    }

    #[test]
    fn only_operations_outside_others_are_top_level() {
        let profile = Profile::from_events(vec![
            event(EventKind::Op, "aten::linear", 1, 100, 50),
            event(EventKind::Op, "aten::addmm", 1, 110, 30),
            event(EventKind::Op, "aten::t", 1, 101, 5),
            event(EventKind::Op, "aten::add", 1, 160, 10),
            // Same start as its child, longer: the enclosing one.
            event(EventKind::Op, "aten::empty", 1, 200, 1),
            event(EventKind::Op, "aten::zeros", 1, 200, 9),
            // Another thread at the same time is its own top level.
            event(EventKind::Op, "aten::mul", 2, 120, 5),
            event(EventKind::Kernel, "gemm", 1, 115, 20),
        ]);
        let names: Vec<&str> = profile
            .top_level_ops()
            .iter()
            .map(|op| op.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["aten::linear", "aten::mul", "aten::add", "aten::zeros"]
        );
    }

    #[test]
    fn kernels_are_classed_by_what_they_do() {
        let cases = [
            (
                "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64",
                KernelClass::MatrixProduct,
            ),
            (
                "void cutlass::Kernel2<cutlass_80_wmma_tensorop_f16_s161616gemm_f16_32x32_128x1_nn_align8>(Params)",
                KernelClass::MatrixProduct,
            ),
            (
                "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x256x64",
                KernelClass::Convolution,
            ),
            (
                "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3",
                KernelClass::Attention,
            ),
            (
                "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>(Flash_fwd_params)",
                KernelClass::Attention,
            ),
            (
                "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half>(long, c10::Half, c10::Half const*, float*, float*)",
                KernelClass::Normalisation,
            ),
            (
                "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::(anonymous namespace)::GroupNormKernelImplInternal<c10::Half, float>>>",
                KernelClass::Normalisation,
            ),
            (
                "darkroom_group_norm_apply_nhwc_f16_v8",
                KernelClass::Normalisation,
            ),
            (
                "darkroom_add_layer_norm_f16_vec",
                KernelClass::Normalisation,
            ),
            ("darkroom_geglu_f16_vec", KernelClass::Elementwise),
            (
                "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>, std::array<char*, 3ul>>(int, at::native::CUDAFunctor_add<c10::Half>, std::array<char*, 3ul>)",
                KernelClass::Elementwise,
            ),
            (
                "void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true, (cudnnKernelDataType_t)0>(cudnn::ops::nchw2nhwc_params_t<float>, __half const*, __half*)",
                KernelClass::Layout,
            ),
            (
                "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, unsigned int, 4, 64, 64>",
                KernelClass::Layout,
            ),
            (
                "void at::native::(anonymous namespace)::upsample_nearest2d_out_frame<c10::Half, &at::native::nearest_idx>",
                KernelClass::Upsample,
            ),
            (
                "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>",
                KernelClass::Other,
            ),
        ];
        for (name, class) in cases {
            assert_eq!(KernelClass::of(EventKind::Kernel, name), class, "{name}");
        }
        assert_eq!(
            KernelClass::of(EventKind::Memcpy, "Memcpy HtoD (Pageable -> Device)"),
            KernelClass::Layout
        );
    }

    #[test]
    fn the_report_sums_time_by_class_and_per_step() {
        let profile = Profile::from_events(vec![
            event(EventKind::Op, "aten::linear", 1, 0, 1_000_000),
            event(EventKind::Kernel, "sm90_xmma_gemm_f16", 1, 0, 3_000_000),
            event(EventKind::Kernel, "sm90_xmma_gemm_f16", 1, 0, 3_000_000),
            event(EventKind::Kernel, "darkroom_geglu_f16_vec", 1, 0, 2_000_000),
            event(EventKind::Memset, "Memset (Device)", 1, 0, 2_000_000),
        ]);
        let classes = profile.by_class();
        let tallies: Vec<(KernelClass, u64, u64)> = classes
            .iter()
            .map(|(class, t)| (*class, t.calls, t.total_ns))
            .collect();
        assert_eq!(
            tallies,
            [
                (KernelClass::MatrixProduct, 2, 6_000_000),
                (KernelClass::Elementwise, 1, 2_000_000),
                (KernelClass::Layout, 1, 2_000_000),
            ]
        );
        let report = profile.report(5, (2, "step"));
        assert!(
            report.starts_with("GPU time 10.0 ms in 4 kernels"),
            "{report}"
        );
        assert!(
            report.contains("| matrix products | 2 | 6.00 | 60.0 % | 1.0 | 3.000 |"),
            "{report}"
        );
        assert!(
            report.contains("| sm90_xmma_gemm_f16 | 2 | 6.00 | 60.0 % |"),
            "{report}"
        );
        let cpu_only =
            Profile::from_events(vec![event(EventKind::Op, "aten::linear", 1, 0, 1_000_000)]);
        let report = cpu_only.report(5, (1, "step"));
        assert!(
            report.contains("| aten::linear | 1 | 1.00 | 100.0 % |\n"),
            "{report}"
        );
    }

    #[test]
    fn libtorch_reports_the_operations_code_calls() {
        let a = tch::Tensor::ones([64, 32], (tch::Kind::Float, tch::Device::Cpu));
        let b = tch::Tensor::ones([32, 16], (tch::Kind::Float, tch::Device::Cpu));
        let (sum, recorded) = record(false, || (a.matmul(&b) + 1.0).sum(tch::Kind::Float))
            .expect("the CPU profiler runs");
        assert_eq!(sum.double_value(&[]), 64.0 * 16.0 * 33.0);
        let top: Vec<&str> = recorded
            .top_level_ops()
            .iter()
            .map(|op| op.name.as_str())
            .collect();
        assert_eq!(
            top,
            ["aten::matmul", "aten::add", "aten::sum"],
            "{recorded:?}"
        );
        // The matrix product libtorch ran inside matmul is recorded, not top level.
        assert!(recorded.events().iter().any(|e| e.name == "aten::mm"));
        assert_eq!(recorded.device_events().count(), 0);
        // Nothing is recorded once it has stopped, and it starts again.
        let (_, again) = record(false, || ()).expect("a second profile");
        assert!(again.top_level_ops().is_empty(), "{again:?}");
    }

    #[test]
    fn a_panic_inside_stops_the_profiler() {
        let panicked = std::panic::catch_unwind(|| record(false, || panic!("inside")));
        assert!(panicked.is_err());
        let (_, after) = record(false, || tch::Tensor::ones([2], tch::kind::FLOAT_CPU) * 2.0)
            .expect("the profiler starts after a panic");
        assert_eq!(after.top_level_ops().len(), 2, "{after:?}");
    }

    #[test]
    fn long_kernel_names_are_cut_at_a_character() {
        assert_eq!(shortened("abc", 5), "abc");
        assert_eq!(shortened("ab|cdef", 4), "ab\\|c…");
        assert_eq!(shortened("éééé", 2), "éé…");
    }
}
