//! Link settings `tch` cannot pass on to dependents, and the C++ shim over what tch does not bind.
//!
//! - An rpath to libtorch's `lib/` (torch-sys exports it as `DEP_TCH_LIBTORCH_LIB`), so binaries
//!   and tests run without `LD_LIBRARY_PATH`.
//! - The shim in `csrc/`, compiled against libtorch's headers: on every build the profiler
//!   (`profiler.cpp`, libtorch's Kineto profiler) and what the shim shares (`shim.cpp`).
//! - With the `cuda` feature, `libtorch_cuda` linked with `--no-as-needed`: nothing references
//!   its symbols directly, so the linker would drop it and CUDA would never be available. And
//!   the CUDA part of the shim: CUDA graphs and allocator statistics (`cuda_graph.cpp`), and the
//!   fused kernels (`fused_kernels.cpp`, which compiles `kernels.cu` with NVRTC at run time).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .ok()
        .map(PathBuf::from);
    if let Some(lib) = &lib {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    build_shim(lib.as_deref());
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        #[cfg(feature = "cuda")]
        build_cuda_shim(lib.as_deref());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// A C++ build with the flags torch-sys uses for its own C++ (C++17, the wheel's
/// `_GLIBCXX_USE_CXX11_ABI`, which torch-sys reads from `LIBTORCH_CXX11_ABI`, default 1) and
/// libtorch's headers.
fn libtorch_cpp(torch: &std::path::Path) -> cc::Build {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        .warnings(false);
    build
}

/// libtorch's `lib/` and libtorch's directory (its parent).
fn libtorch_dirs(lib: Option<&std::path::Path>) -> (&std::path::Path, &std::path::Path) {
    let Some(lib) = lib else {
        panic!("the C++ shim needs torch-sys's DEP_TCH_LIBTORCH_LIB");
    };
    (lib, lib.parent().unwrap_or(lib))
}

/// Compiles the part of the shim every build has: the profiler.
fn build_shim(lib: Option<&std::path::Path>) {
    let (_, torch) = libtorch_dirs(lib);
    for file in ["csrc/shim.h", "csrc/shim.cpp", "csrc/profiler.cpp"] {
        println!("cargo:rerun-if-changed={file}");
    }
    libtorch_cpp(torch)
        .file("csrc/shim.cpp")
        .file("csrc/profiler.cpp")
        .compile("darkroom_shim");
}

/// Compiles the CUDA part of the shim.
#[cfg(feature = "cuda")]
fn build_cuda_shim(lib: Option<&std::path::Path>) {
    let (lib, torch) = libtorch_dirs(lib);
    let cuda = cuda_root(torch);
    for file in [
        "csrc/launch.h",
        "csrc/cuda_graph.cpp",
        "csrc/fused_kernels.cpp",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    libtorch_cpp(torch)
        .file("csrc/cuda_graph.cpp")
        .file("csrc/fused_kernels.cpp")
        .include(cuda.join("include"))
        .compile("darkroom_cuda");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=c10");
    // libtorch's headers call the CUDA runtime inline (events, guards): link the runtime torch
    // itself loads (the wheel's libcudart.so.13 has no unversioned name).
    let cuda_lib = cuda.join("lib");
    println!("cargo:rustc-link-search=native={}", cuda_lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cuda_lib.display());
    // NVRTC compiles csrc/kernels.cu at run time (csrc/fused_kernels.cpp); the wheel ships it.
    for library in ["cudart", "nvrtc"] {
        match versioned_library(&cuda_lib, library) {
            Some(name) => println!("cargo:rustc-link-lib=dylib:+verbatim={name}"),
            None => println!("cargo:rustc-link-lib=dylib={library}"),
        }
    }
}

/// `lib<name>.so.N` in `dir` (the wheel's libraries have no unversioned name).
#[cfg(feature = "cuda")]
fn versioned_library(dir: &std::path::Path, name: &str) -> Option<String> {
    let prefix = format!("lib{name}.so.");
    std::fs::read_dir(dir).ok().and_then(|entries| {
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|file| file.starts_with(&prefix))
    })
}

/// `$CUDA_HOME`, else the wheel's CUDA runtime next to torch (`include/` and `lib/`).
#[cfg(feature = "cuda")]
fn cuda_root(torch: &std::path::Path) -> PathBuf {
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        return PathBuf::from(home);
    }
    let site_packages = torch.parent().unwrap_or(torch);
    for candidate in ["nvidia/cu13", "nvidia/cuda_runtime"] {
        let dir = site_packages.join(candidate);
        if dir.join("include/cuda_runtime_api.h").exists() {
            if !dir.join("include/crt/host_config.h").exists() {
                panic!(
                    "{} lacks crt/host_config.h: install nvidia-cuda-crt (local-dev/install does)",
                    dir.display()
                );
            }
            return dir;
        }
    }
    panic!(
        "no CUDA headers found under {}: set CUDA_HOME",
        site_packages.display()
    );
}
