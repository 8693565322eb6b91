//! The link settings the engine's build script gives its own binaries, for this crate's:
//! an rpath to libtorch's `lib/` (so the worker runs without `LD_LIBRARY_PATH`) and, with the
//! `cuda` feature, `libtorch_cuda` kept although no symbol of it is referenced (see
//! `functions/inference/build.rs`).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
