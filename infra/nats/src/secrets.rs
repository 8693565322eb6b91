//! The users' NKeys: one ed25519 user seed per role, generated once into a private folder
//! (`<user>.nk`, mode 0600, folder 0700) and read back on every render, so regenerating the
//! config keeps every client's key. The server config only ever holds the public keys
//! (`U…`); a seed (`SU…`) stays with its client, which signs the server's challenge with it
//! and never sends it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use nkeys::{KeyPair, KeyPairType};

use crate::permissions::Role;

/// Extension of a seed file in the secrets folder (the name `nsc` uses too).
pub const SEED_EXTENSION: &str = "nk";

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
    /// A seed file holds something that is not an NKey user seed.
    #[error("{path}: {problem}")]
    Invalid {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        problem: SeedError,
    },
}

/// Text that should be an NKey user seed and is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedError {
    /// Not an NKey seed at all (bad prefix, length or checksum).
    #[error("not an NKey seed (expected one line `SU…`): {0}")]
    Malformed(String),
    /// A valid seed, but of another kind of key (account, operator, server…).
    #[error("an NKey seed of a {0} key, not of a user (`SU…`)")]
    NotAUser(String),
}

/// A user's NKey: the secret seed (`SU…`) and the public key (`U…`) derived from it.
///
/// `Debug` shows the public key only.
#[derive(Clone, PartialEq, Eq)]
pub struct UserKey {
    seed: String,
    public_key: String,
}

impl UserKey {
    /// A new random user key.
    pub fn generate() -> Self {
        let pair = KeyPair::new_user();
        let seed = pair
            .seed()
            .expect("a key pair made from random bytes has its seed");
        UserKey {
            seed,
            public_key: pair.public_key(),
        }
    }

    /// The user key of `text`, an encoded user seed (surrounding whitespace ignored).
    pub fn from_seed(text: &str) -> Result<Self, SeedError> {
        let seed = text.trim();
        let pair = KeyPair::from_seed(seed).map_err(|e| SeedError::Malformed(e.to_string()))?;
        match pair.key_pair_type() {
            KeyPairType::User => Ok(UserKey {
                seed: seed.to_owned(),
                public_key: pair.public_key(),
            }),
            other => Err(SeedError::NotAUser(format!("{other:?}").to_lowercase())),
        }
    }

    /// The secret seed (`SU…`): give it only to the client that connects as this user.
    pub fn seed(&self) -> &str {
        &self.seed
    }

    /// The public key (`U…`), what the server config names the user by.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserKey")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

/// The file holding `role`'s seed in `dir`: `<user>.nk`.
pub fn seed_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{}.{SEED_EXTENSION}", role.user()))
}

/// The user key in the seed file `path`.
pub fn read_seed_file(path: &Path) -> Result<UserKey, SecretsError> {
    let text = fs::read_to_string(path).map_err(|source| SecretsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    UserKey::from_seed(&text).map_err(|problem| SecretsError::Invalid {
        path: path.to_path_buf(),
        problem,
    })
}

/// Every role's key from `dir`, generating (and saving, 0600) the missing ones; the folder is
/// created private (0700) if needed. A file that is there but holds no user seed is an error,
/// never replaced.
pub fn load_or_create(dir: &Path) -> Result<BTreeMap<Role, UserKey>, SecretsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SecretsError::Io { path, source }
    };
    create_private_dir(dir).map_err(io(dir))?;
    let mut keys = BTreeMap::new();
    for role in Role::ALL {
        let path = seed_path(dir, role);
        let key = match read_seed_file(&path) {
            Ok(key) => key,
            Err(SecretsError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let key = UserKey::generate();
                write_private(&path, key.seed()).map_err(io(&path))?;
                key
            }
            Err(error) => return Err(error),
        };
        keys.insert(role, key);
    }
    Ok(keys)
}

/// Every role's public key, for [`crate::render`].
pub fn public_keys(keys: &BTreeMap<Role, UserKey>) -> BTreeMap<Role, String> {
    keys.iter()
        .map(|(role, key)| (*role, key.public_key().to_owned()))
        .collect()
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
    fn seeds_are_generated_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("nats-auth");
        let first = load_or_create(&secrets).unwrap();
        assert_eq!(first.len(), Role::ALL.len());
        for key in first.values() {
            assert!(key.seed().starts_with("SU"), "{key:?}");
            assert!(key.public_key().starts_with('U'), "{key:?}");
        }
        assert_ne!(first[&Role::Ingest], first[&Role::Preprocess]);
        let second = load_or_create(&secrets).unwrap();
        assert_eq!(first, second);
        // The file holds the seed the key came from.
        let text = fs::read_to_string(seed_path(&secrets, Role::Ingest)).unwrap();
        assert_eq!(text.trim(), first[&Role::Ingest].seed());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(seed_path(&secrets, Role::Ingest))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
            let mode = fs::metadata(&secrets).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "folder open to others: {mode:o}");
        }
    }

    #[test]
    fn the_public_key_is_derived_from_the_seed() {
        let key = UserKey::generate();
        let again = UserKey::from_seed(&format!("  {}\n", key.seed())).unwrap();
        assert_eq!(again, key);
        let pair = KeyPair::from_public_key(key.public_key()).unwrap();
        assert_eq!(pair.key_pair_type(), KeyPairType::User);
        assert!(!format!("{key:?}").contains(key.seed()));
    }

    #[test]
    fn a_mangled_seed_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let path = seed_path(dir.path(), Role::Notifier);
        fs::write(&path, "not a seed").unwrap();
        let error = load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(&error, SecretsError::Invalid { path: p, problem: SeedError::Malformed(_) } if *p == path),
            "{error:?}"
        );
        assert!(error.to_string().contains("notifier.nk"), "{error}");
        // The mangled file is left for a person to look at, not replaced.
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a seed");
    }

    #[test]
    fn a_seed_of_another_kind_of_key_is_refused() {
        let account = KeyPair::new_account().seed().unwrap();
        assert_eq!(
            UserKey::from_seed(&account),
            Err(SeedError::NotAUser("account".to_owned()))
        );
        // A public key is no seed either.
        let public = UserKey::generate().public_key().to_owned();
        assert!(matches!(
            UserKey::from_seed(&public),
            Err(SeedError::Malformed(_))
        ));
    }
}
