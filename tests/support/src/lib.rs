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
