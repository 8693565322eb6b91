//! An rpath to libtorch's `lib/` for the inference worker binary this package builds, so it
//! runs without `LD_LIBRARY_PATH` (the worker crate's own build script covers only its targets).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
