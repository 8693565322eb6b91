//! What the workspace's tests share, whatever crate they test: the project venv's Python (which
//! `local-dev/install` fills with torch, diffusers, OpenCV, Pillow and scikit-image) and running
//! reference or fixture scripts with it. Test-only: failures panic with the script's stderr.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `$VIRTUAL_ENV/bin/python` (set by `local-dev/env.sh`), else `<workspace>/.venv/bin/python`.
pub fn python() -> PathBuf {
    match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) => PathBuf::from(venv).join("bin/python"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"),
    }
}

/// Runs `python script args…` offline (`HF_HUB_OFFLINE=1`) and returns its stdout.
///
/// # Panics
/// When Python cannot be started or the script exits unsuccessfully (with its stderr).
pub fn run_script<I, S>(script: &Path, args: I) -> Vec<u8>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let python = python();
    let output = Command::new(&python)
        .arg(script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (did local-dev/install run?): {e}",
                python.display()
            )
        });
    assert!(
        output.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

static GENERATING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `<reference_dir>/<script>.py --out DIR ARGS…` unless its output is cached, and returns
/// DIR: `<target>/darkroom-fixtures/<script>-<hash>`, the hash over every `.py` script of
/// `reference_dir` but `exclude` (scripts import each other), the script name and the arguments.
/// Generated into a scratch folder and renamed, so no test ever sees half a fixture.
///
/// # Panics
/// When the scripts cannot be read or the script fails.
pub fn fixture(reference_dir: &Path, script: &str, args: &[&str], exclude: &[&str]) -> PathBuf {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};

    let mut hasher = DefaultHasher::new();
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(reference_dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", reference_dir.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "py"))
        .filter(|path| {
            !exclude
                .iter()
                .any(|name| path.file_name().is_some_and(|file| file == *name))
        })
        .collect();
    scripts.sort();
    for path in &scripts {
        std::fs::read(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            .hash(&mut hasher);
    }
    script.hash(&mut hasher);
    args.hash(&mut hasher);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target
        .join("darkroom-fixtures")
        .join(format!("{script}-{:016x}", hasher.finish()));
    let done = dir.join(".done");
    let _guard = GENERATING.lock().unwrap_or_else(|e| e.into_inner());
    if done.exists() {
        return dir;
    }
    let scratch = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let mut script_args = vec![std::ffi::OsString::from("--out"), scratch.clone().into()];
    script_args.extend(args.iter().map(std::ffi::OsString::from));
    run_script(&reference_dir.join(format!("{script}.py")), &script_args);
    std::fs::write(scratch.join(".done"), b"")
        .unwrap_or_else(|e| panic!("write {}: {e}", scratch.display()));
    if std::fs::rename(&scratch, &dir).is_err() {
        // Another test binary finished the same fixture first.
        let _ = std::fs::remove_dir_all(&scratch);
    }
    assert!(
        done.exists(),
        "fixture {} missing after generation",
        dir.display()
    );
    dir
}

/// The tiny random-weight studio of `functions/inference/reference/tiny_studio.py` (SDXL
/// model, the ControlNets and LoRA the built-in presets name), generated once and cached.
pub fn tiny_studio() -> PathBuf {
    let reference =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../functions/inference/reference");
    fixture(&reference, "tiny_studio", &[], &["bench_diffusers.py"])
}

/// The chunk types of a PNG, in order (`["IHDR", "IDAT", "IEND"]` for one without metadata).
///
/// # Panics
/// When `png` does not start with the PNG signature.
pub fn png_chunks(png: &[u8]) -> Vec<String> {
    assert_eq!(png.get(..8), Some(&b"\x89PNG\r\n\x1a\n"[..]), "not a PNG");
    let mut kinds = Vec::new();
    let mut at = 8;
    while at + 8 <= png.len() {
        let mut len = [0u8; 4];
        len.copy_from_slice(&png[at..at + 4]);
        kinds.push(String::from_utf8_lossy(&png[at + 4..at + 8]).into_owned());
        at += 12 + u32::from_be_bytes(len) as usize;
    }
    kinds
}
