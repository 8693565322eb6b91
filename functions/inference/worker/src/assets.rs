//! The files jobs name — LoRAs, ControlNets and LUTs — resolved under the worker's folders.
//!
//! Jobs carry plain names (`storybook-style.safetensors`, `controlnet-canny-sdxl-1.0`), never
//! paths: a name with a path separator, a leading `.` or a NUL is refused, so no job can make
//! the worker read outside its folders.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::WorkerConfig;

/// What kind of file a job names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    /// A LoRA `.safetensors` file.
    Lora,
    /// A diffusers ControlNet folder.
    ControlNet,
    /// A `.cube` 3D LUT.
    Lut,
}

impl fmt::Display for AssetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AssetKind::Lora => "LoRA",
            AssetKind::ControlNet => "ControlNet",
            AssetKind::Lut => "LUT",
        })
    }
}

/// Why a named file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssetError {
    /// The name is not a plain file or folder name.
    #[error("{kind} name {name:?} is not a plain file name")]
    BadName {
        /// What it names.
        kind: AssetKind,
        /// The name.
        name: String,
    },
    /// Nothing of that name in the worker's folder.
    #[error("this worker has no {kind} {name:?} (looked in {})", dir.display())]
    Missing {
        /// What it names.
        kind: AssetKind,
        /// The name.
        name: String,
        /// The folder looked in.
        dir: PathBuf,
    },
}

/// The worker's asset folders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetDirs {
    /// LoRA files.
    pub loras: PathBuf,
    /// ControlNet folders.
    pub controlnets: PathBuf,
    /// LUT files.
    pub luts: PathBuf,
}

impl AssetDirs {
    /// The folders a configuration names.
    pub fn from_config(config: &WorkerConfig) -> Self {
        AssetDirs {
            loras: config.lora_dir.clone(),
            controlnets: config.controlnet_dir.clone(),
            luts: config.lut_dir.clone(),
        }
    }

    /// The folder of `kind`.
    pub fn dir(&self, kind: AssetKind) -> &Path {
        match kind {
            AssetKind::Lora => &self.loras,
            AssetKind::ControlNet => &self.controlnets,
            AssetKind::Lut => &self.luts,
        }
    }

    /// The path of `name` in the folder of `kind`, once checked to be a plain name that
    /// exists there (a file for LoRAs and LUTs, a folder for ControlNets).
    pub fn resolve(&self, kind: AssetKind, name: &str) -> Result<PathBuf, AssetError> {
        let plain = !name.is_empty()
            && name.len() <= 255
            && !name.starts_with('.')
            && !name.contains(['/', '\\', '\0'])
            && Path::new(name).file_name() == Some(name.as_ref());
        if !plain {
            return Err(AssetError::BadName {
                kind,
                name: name.to_owned(),
            });
        }
        let dir = self.dir(kind);
        let path = dir.join(name);
        let found = match kind {
            AssetKind::ControlNet => path.is_dir(),
            AssetKind::Lora | AssetKind::Lut => path.is_file(),
        };
        if found {
            Ok(path)
        } else {
            Err(AssetError::Missing {
                kind,
                name: name.to_owned(),
                dir: dir.to_owned(),
            })
        }
    }
}

impl AssetDirs {
    /// The names a job may give, by kind: the LoRA and LUT files and ControlNet folders in the
    /// folders now, sorted (a missing folder holds nothing).
    pub fn inventory(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        (
            self.names(AssetKind::Lora),
            self.names(AssetKind::ControlNet),
            self.names(AssetKind::Lut),
        )
    }

    fn names(&self, kind: AssetKind) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir(kind)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| self.resolve(kind, name).is_ok())
            .collect();
        names.sort();
        names
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dirs(root: &Path) -> AssetDirs {
        AssetDirs {
            loras: root.join("loras"),
            controlnets: root.join("controlnets"),
            luts: root.join("luts"),
        }
    }

    #[test]
    fn plain_names_resolve_inside_their_folder() {
        let root = tempfile::tempdir().unwrap();
        let dirs = dirs(root.path());
        std::fs::create_dir_all(dirs.controlnets.join("canny")).unwrap();
        std::fs::create_dir_all(&dirs.loras).unwrap();
        std::fs::write(dirs.loras.join("style.safetensors"), b"x").unwrap();
        assert_eq!(
            dirs.resolve(AssetKind::Lora, "style.safetensors").unwrap(),
            dirs.loras.join("style.safetensors")
        );
        assert_eq!(
            dirs.resolve(AssetKind::ControlNet, "canny").unwrap(),
            dirs.controlnets.join("canny")
        );
        // A folder is not a LoRA, a file is not a ControlNet.
        assert!(matches!(
            dirs.resolve(AssetKind::ControlNet, "style.safetensors"),
            Err(AssetError::Missing { .. })
        ));
        std::fs::write(dirs.loras.join(".partial"), b"x").unwrap();
        assert_eq!(
            dirs.inventory(),
            (
                vec!["style.safetensors".to_owned()],
                vec!["canny".to_owned()],
                Vec::new()
            )
        );
        let missing = dirs.resolve(AssetKind::Lut, "film.cube").unwrap_err();
        assert!(
            missing.to_string().contains("no LUT \"film.cube\""),
            "{missing}"
        );
    }

    #[test]
    fn names_that_would_leave_the_folder_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dirs = dirs(root.path());
        for name in [
            "",
            "..",
            "../x",
            "/etc/passwd",
            ".hidden",
            "a/b",
            "a\\b",
            "a\0b",
        ] {
            assert!(
                matches!(
                    dirs.resolve(AssetKind::Lora, name),
                    Err(AssetError::BadName { .. })
                ),
                "{name:?}"
            );
        }
    }
}
