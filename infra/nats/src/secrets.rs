//! The users' passwords: generated once into a private folder (`<role>.password`, mode 0600),
//! read back on every render, so regenerating the config keeps every client's credentials.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use rand::Rng as _;
use rand::distr::Alphanumeric;

use crate::permissions::Role;

/// Length of a generated password (alphanumeric: ~190 bits).
pub const PASSWORD_LEN: usize = 32;

/// Reading or writing the secrets folder failed.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A password file holds something that is not a password.
    #[error("{path}: not a password (expected letters and digits only)")]
    Invalid {
        /// The path.
        path: PathBuf,
    },
}

/// The file holding `role`'s password in `dir`.
pub fn password_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{}.password", role.user()))
}

/// A new random password.
pub fn generate_password() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(PASSWORD_LEN)
        .map(char::from)
        .collect()
}

/// Every role's password from `dir`, generating (and saving) the missing ones; the folder is
/// created private (0700) if needed.
pub fn load_or_create(dir: &Path) -> Result<BTreeMap<Role, String>, SecretsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SecretsError::Io { path, source }
    };
    create_private_dir(dir).map_err(io(dir))?;
    let mut passwords = BTreeMap::new();
    for role in Role::ALL {
        let path = password_path(dir, role);
        let password = match fs::read_to_string(&path) {
            Ok(text) => {
                let password = text.trim().to_owned();
                if password.is_empty() || !password.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(SecretsError::Invalid { path });
                }
                password
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let password = generate_password();
                write_private(&path, &password).map_err(io(&path))?;
                password
            }
            Err(error) => return Err(io(&path)(error)),
        };
        passwords.insert(role, password);
    }
    Ok(passwords)
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }
    #[cfg(not(unix))]
    {
        fs::create_dir_all(dir)
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    writeln!(file, "{text}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_generated_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("nats-auth");
        let first = load_or_create(&secrets).unwrap();
        assert_eq!(first.len(), Role::ALL.len());
        assert!(first.values().all(|p| p.len() == PASSWORD_LEN));
        assert_ne!(first[&Role::Ingest], first[&Role::Preprocess]);
        let second = load_or_create(&secrets).unwrap();
        assert_eq!(first, second);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(password_path(&secrets, Role::Ingest))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
        }
    }

    #[test]
    fn a_mangled_password_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        fs::write(password_path(dir.path(), Role::Notifier), "not one\"").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(SecretsError::Invalid { .. })
        ));
    }
}
