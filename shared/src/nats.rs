//! The NATS connection, and the NKey seed a function authenticates with.

use std::path::Path;

use async_nats::ConnectOptions;
use nkeys::{KeyPair, KeyPairType};

use crate::{Result, RuntimeConfig, RuntimeError};

/// The setting that gives the seed inline, as an error names it.
const NKEY_SEED_VAR: &str = "DARKROOM_NATS_NKEY_SEED";

/// Why a configured NKey seed cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NkeyProblem {
    /// The seed file does not exist.
    #[error("no such file")]
    Missing,
    /// The seed file exists but cannot be read.
    #[error("cannot read it: {0}")]
    Unreadable(std::io::Error),
    /// Others may read the seed file, or its group may change it.
    #[error(
        "its mode {mode:o} lets others at the seed (allowed: owner, and read for the group): chmod 600 it"
    )]
    NotPrivate {
        /// The file's permission bits.
        mode: u32,
    },
    /// Not an NKey seed at all.
    #[error("not an NKey seed (expected one line `SU…`): {0}")]
    Malformed(String),
    /// A seed of another kind of key (account, operator, …).
    #[error("a seed of a {0} key, not of a user (`SU…`)")]
    NotAUser(String),
    /// The seed is given together with other credentials of the same kind.
    #[error("also set: {0}; give one seed one way, and no user and password with it")]
    Ambiguous(&'static str),
}

/// The NKey user seed the configuration gives, from [`RuntimeConfig::nats_nkey_file`] or
/// [`RuntimeConfig::nats_nkey_seed`], checked: a private file, a user seed (`SU…`), and one
/// source only. `None` when neither is set.
pub fn configured_nkey_seed(config: &RuntimeConfig) -> Result<Option<String>> {
    let error = |origin: String| move |problem| RuntimeError::NkeySeed { origin, problem };
    let password = config.nats_user.is_some() || config.nats_password.is_some();
    match (&config.nats_nkey_file, &config.nats_nkey_seed) {
        (None, None) => Ok(None),
        (Some(path), Some(_)) => Err(error(path.display().to_string())(NkeyProblem::Ambiguous(
            NKEY_SEED_VAR,
        ))),
        (Some(path), None) => {
            let origin = path.display().to_string();
            if password {
                return Err(error(origin)(NkeyProblem::Ambiguous(
                    "DARKROOM_NATS_USER / DARKROOM_NATS_PASSWORD",
                )));
            }
            read_seed_file(path).map(Some).map_err(error(origin))
        }
        (None, Some(seed)) => {
            let origin = NKEY_SEED_VAR.to_owned();
            if password {
                return Err(error(origin)(NkeyProblem::Ambiguous(
                    "DARKROOM_NATS_USER / DARKROOM_NATS_PASSWORD",
                )));
            }
            user_seed(seed).map(Some).map_err(error(origin))
        }
    }
}

/// The user seed in the file `path`: the file must exist, be private (no access for others, at
/// most read for its group) and hold one NKey user seed.
pub fn read_seed_file(path: &Path) -> std::result::Result<String, NkeyProblem> {
    let metadata = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => NkeyProblem::Missing,
        _ => NkeyProblem::Unreadable(e),
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o037 != 0 {
            return Err(NkeyProblem::NotPrivate { mode });
        }
    }
    #[cfg(not(unix))]
    let _ = metadata;
    let text = std::fs::read_to_string(path).map_err(NkeyProblem::Unreadable)?;
    user_seed(&text)
}

/// `text` (surrounding whitespace ignored) when it is an NKey user seed.
pub fn user_seed(text: &str) -> std::result::Result<String, NkeyProblem> {
    let seed = text.trim();
    let pair = KeyPair::from_seed(seed).map_err(|e| NkeyProblem::Malformed(e.to_string()))?;
    match pair.key_pair_type() {
        KeyPairType::User => Ok(seed.to_owned()),
        other => Err(NkeyProblem::NotAUser(format!("{other:?}").to_lowercase())),
    }
}

/// Connects to NATS as `client_name` with the configured credentials: an NKey seed
/// ([`configured_nkey_seed`], checked before anything is sent), a credentials file, a user and
/// password, or a token; over TLS as [`NatsTls`](crate::nats_tls::NatsTls) says (its files
/// checked before anything is sent too).
///
/// The first connection must succeed (a function that cannot reach its bus should fail loudly at
/// start); after that the client reconnects on its own for as long as the process lives.
pub async fn connect(config: &RuntimeConfig, client_name: &str) -> Result<async_nats::Client> {
    let connect_error = |message: String| RuntimeError::Connect {
        url: config.nats_url.clone(),
        message,
    };
    let nkey_seed = configured_nkey_seed(config)?;
    let tls = crate::nats_tls::NatsTls::from_config(config)?;
    let mut options = tls.apply(ConnectOptions::new().name(client_name).max_reconnects(None));
    if let Some(seed) = nkey_seed {
        options = options.nkey(seed);
    }
    if let Some(path) = &config.nats_creds {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| connect_error(format!("credentials file {}: {e}", path.display())))?;
    }
    if let (Some(user), Some(password)) = (&config.nats_user, &config.nats_password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.nats_token {
        options = options.token(token.clone());
    }
    options
        .connect(server_urls(&config.nats_url))
        .await
        .map_err(|e| connect_error(e.to_string()))
}

/// The server URLs of a comma-separated list (`nats://a:4222, nats://b:4222`): the client
/// connects to one of them and learns the rest of a cluster from it, but a list of every seed
/// lets it start (and reconnect) while any one of them is down.
pub fn server_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn with_file(contents: &str, mode: u32) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ingest.nk");
        std::fs::write(&path, contents).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        (dir, path)
    }

    fn nkey_file_config(path: &Path) -> RuntimeConfig {
        RuntimeConfig {
            nats_nkey_file: Some(path.to_path_buf()),
            ..RuntimeConfig::default()
        }
    }

    /// The problem `configured_nkey_seed` reports, and that its message names `origin`.
    fn problem(config: &RuntimeConfig, origin: &str) -> NkeyProblem {
        let error = configured_nkey_seed(config).unwrap_err();
        assert!(error.to_string().contains(origin), "{error}");
        match error {
            RuntimeError::NkeySeed { problem, .. } => problem,
            other => panic!("expected an NKey seed error, got {other:?}"),
        }
    }

    #[test]
    fn a_private_user_seed_file_gives_its_seed() {
        let seed = KeyPair::new_user().seed().unwrap();
        let (_dir, path) = with_file(&format!("{seed}\n"), 0o600);
        assert_eq!(
            configured_nkey_seed(&nkey_file_config(&path)).unwrap(),
            Some(seed.clone())
        );
        // Kubernetes' fsGroup makes a mounted Secret group-readable: still private enough.
        let (_dir, path) = with_file(&seed, 0o440);
        assert_eq!(
            configured_nkey_seed(&nkey_file_config(&path)).unwrap(),
            Some(seed.clone())
        );
        let inline = RuntimeConfig {
            nats_nkey_seed: Some(seed.clone()),
            ..RuntimeConfig::default()
        };
        assert_eq!(configured_nkey_seed(&inline).unwrap(), Some(seed));
        assert_eq!(
            configured_nkey_seed(&RuntimeConfig::default()).unwrap(),
            None
        );
    }

    #[test]
    fn an_unusable_seed_file_is_a_typed_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.nk");
        assert!(matches!(
            problem(&nkey_file_config(&missing), "nope.nk"),
            NkeyProblem::Missing
        ));

        let seed = KeyPair::new_user().seed().unwrap();
        #[cfg(unix)]
        {
            let (_dir, path) = with_file(&seed, 0o644);
            assert!(matches!(
                problem(&nkey_file_config(&path), "ingest.nk"),
                NkeyProblem::NotPrivate { mode: 0o644 }
            ));
        }

        let (_dir, path) = with_file("hunter2", 0o600);
        assert!(matches!(
            problem(&nkey_file_config(&path), "ingest.nk"),
            NkeyProblem::Malformed(_)
        ));

        let account = KeyPair::new_account().seed().unwrap();
        let (_dir, path) = with_file(&account, 0o600);
        assert!(matches!(
            problem(&nkey_file_config(&path), "ingest.nk"),
            NkeyProblem::NotAUser(kind) if kind == "account"
        ));
    }

    #[test]
    fn an_inline_seed_is_checked_and_one_source_only() {
        let public = KeyPair::new_user().public_key();
        let inline = RuntimeConfig {
            nats_nkey_seed: Some(public),
            ..RuntimeConfig::default()
        };
        assert!(matches!(
            problem(&inline, NKEY_SEED_VAR),
            NkeyProblem::Malformed(_)
        ));

        let seed = KeyPair::new_user().seed().unwrap();
        let (_dir, path) = with_file(&seed, 0o600);
        let both = RuntimeConfig {
            nats_nkey_seed: Some(seed.clone()),
            ..nkey_file_config(&path)
        };
        assert!(matches!(
            problem(&both, "ingest.nk"),
            NkeyProblem::Ambiguous(NKEY_SEED_VAR)
        ));
        let with_password = RuntimeConfig {
            nats_user: Some("operator".to_owned()),
            nats_password: Some("secret".to_owned()),
            nats_nkey_seed: Some(seed),
            ..RuntimeConfig::default()
        };
        assert!(matches!(
            problem(&with_password, NKEY_SEED_VAR),
            NkeyProblem::Ambiguous(_)
        ));
    }

    #[test]
    fn a_comma_separated_list_gives_every_server() {
        assert_eq!(
            server_urls("nats://a:1, nats://b:2,,nats://c:3 "),
            ["nats://a:1", "nats://b:2", "nats://c:3"]
        );
        assert_eq!(
            server_urls("nats://127.0.0.1:4222"),
            ["nats://127.0.0.1:4222"]
        );
    }
}
