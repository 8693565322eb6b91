//! TLS of the NATS connection: which roots the client trusts, whether it insists on TLS, and
//! the certificate it shows a server that verifies its clients. The files are checked at start
//! (present, readable, PEM of the right kind, a key that belongs to its certificate), so a bad
//! path or a swapped file is a typed error that names the file and its setting, not a failed
//! handshake later.
//!
//! The connection itself is async-nats' own TLS (rustls): [`NatsTls::apply`] hands it the same
//! files through `require_tls`, `add_root_certificates` and `add_client_certificate`.

use std::path::{Path, PathBuf};

use async_nats::ConnectOptions;
use async_nats::rustls;
use async_nats::rustls::RootCertStore;
use async_nats::rustls::pki_types::pem::{self, PemObject};
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use async_nats::rustls::sign::CertifiedKey;

use crate::{Result, RuntimeConfig, RuntimeError};

/// The setting naming the PEM file of the roots to trust.
pub const CA_FILE_VAR: &str = "DARKROOM_NATS_TLS_CA_FILE";
/// The setting naming the client certificate's PEM file.
pub const CERT_FILE_VAR: &str = "DARKROOM_NATS_TLS_CERT_FILE";
/// The setting naming the client key's PEM file.
pub const KEY_FILE_VAR: &str = "DARKROOM_NATS_TLS_KEY_FILE";

/// Why a configured TLS file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsProblem {
    /// The file does not exist.
    #[error("no such file")]
    Missing,
    /// The file exists but cannot be read.
    #[error("cannot read it: {0}")]
    Unreadable(std::io::Error),
    /// The file holds no PEM block of the kind the setting wants.
    #[error("no PEM {expected} in it")]
    NoPem {
        /// What was looked for (`CERTIFICATE`, `PRIVATE KEY`).
        expected: &'static str,
    },
    /// PEM, but broken (bad base64, an unterminated block).
    #[error("not valid PEM: {0}")]
    BadPem(String),
    /// A certificate that cannot be a root of trust (not X.509 DER, say).
    #[error("not a usable CA certificate: {0}")]
    BadCertificate(String),
    /// A private key of a type rustls cannot sign with.
    #[error("not a usable private key: {0}")]
    BadKey(String),
    /// The key is not the one of the certificate.
    #[error("the key does not belong to the certificate in {certificate}: {reason}")]
    KeyMismatch {
        /// The certificate file.
        certificate: String,
        /// What rustls said.
        reason: String,
    },
    /// A client certificate without its key, or a key without its certificate.
    #[error("set {missing} too (a client certificate needs both its certificate and its key)")]
    Unpaired {
        /// The setting that is missing.
        missing: &'static str,
    },
}

/// The TLS a connection needs, from [`RuntimeConfig`]'s `nats_tls_*` settings, with every file
/// checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatsTls {
    /// Whether the client refuses a connection that is not TLS: set by
    /// [`RuntimeConfig::nats_tls_required`], by a `tls://` server URL, and by any TLS file
    /// (a client given a CA to check its server with never falls back to plaintext).
    pub required: bool,
    /// The PEM roots to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// The client certificate and its key (PEM), for a server that verifies its clients.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

impl NatsTls {
    /// The TLS the configuration asks for, its files checked: see [`TlsProblem`].
    pub fn from_config(config: &RuntimeConfig) -> Result<Self> {
        let ca_file = match &config.nats_tls_ca_file {
            Some(path) => {
                check_ca_file(path).map_err(tls_error(CA_FILE_VAR, path))?;
                Some(path.clone())
            }
            None => None,
        };
        let client_certificate = match (&config.nats_tls_cert_file, &config.nats_tls_key_file) {
            (None, None) => None,
            (Some(cert), None) => {
                return Err(tls_error(CERT_FILE_VAR, cert)(TlsProblem::Unpaired {
                    missing: KEY_FILE_VAR,
                }));
            }
            (None, Some(key)) => {
                return Err(tls_error(KEY_FILE_VAR, key)(TlsProblem::Unpaired {
                    missing: CERT_FILE_VAR,
                }));
            }
            (Some(cert), Some(key)) => {
                check_client_certificate(cert, key)?;
                Some((cert.clone(), key.clone()))
            }
        };
        let tls_url = crate::nats::server_urls(&config.nats_url)
            .iter()
            .any(|url| url.to_ascii_lowercase().starts_with("tls://"));
        Ok(NatsTls {
            required: config.nats_tls_required
                || tls_url
                || ca_file.is_some()
                || client_certificate.is_some(),
            ca_file,
            client_certificate,
        })
    }

    /// `options` with this TLS: async-nats' own `require_tls`, `add_root_certificates` and
    /// `add_client_certificate`. It also makes sure rustls has a crypto provider, which any
    /// connection may need: a server that requires TLS upgrades even a client that did not ask
    /// for it.
    pub fn apply(&self, mut options: ConnectOptions) -> ConnectOptions {
        install_crypto_provider();
        if self.required {
            options = options.require_tls(true);
        }
        if let Some(ca_file) = &self.ca_file {
            options = options.add_root_certificates(ca_file.clone());
        }
        if let Some((cert, key)) = &self.client_certificate {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options
    }
}

/// Makes ring rustls' process-wide crypto provider unless one is installed already. async-nats
/// builds its TLS config with rustls' default provider, and rustls picks none on its own when,
/// as in this workspace, both ring (async-nats) and aws-lc-rs (the AWS SDK) are compiled in: it
/// panics instead.
fn install_crypto_provider() {
    if async_nats::rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: then that one is the default.
        let _ = async_nats::rustls::crypto::ring::default_provider().install_default();
    }
}

fn tls_error(setting: &'static str, path: &Path) -> impl FnOnce(TlsProblem) -> RuntimeError {
    let path = path.display().to_string();
    move |problem| RuntimeError::NatsTls {
        setting,
        path,
        problem,
    }
}

fn read(path: &Path) -> std::result::Result<Vec<u8>, TlsProblem> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TlsProblem::Missing,
        _ => TlsProblem::Unreadable(e),
    })
}

fn certificates(bytes: &[u8]) -> std::result::Result<Vec<CertificateDer<'static>>, TlsProblem> {
    let certificates = CertificateDer::pem_slice_iter(bytes)
        .collect::<std::result::Result<Vec<_>, pem::Error>>()
        .map_err(|e| TlsProblem::BadPem(e.to_string()))?;
    if certificates.is_empty() {
        return Err(TlsProblem::NoPem {
            expected: "CERTIFICATE",
        });
    }
    Ok(certificates)
}

/// Every certificate in the file must be a root rustls can trust.
fn check_ca_file(path: &Path) -> std::result::Result<(), TlsProblem> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(&read(path)?)? {
        roots
            .add(certificate)
            .map_err(|e| TlsProblem::BadCertificate(e.to_string()))?;
    }
    Ok(())
}

fn check_client_certificate(cert: &Path, key: &Path) -> Result<()> {
    let chain = read(cert)
        .and_then(|bytes| certificates(&bytes))
        .map_err(tls_error(CERT_FILE_VAR, cert))?;
    let signing_key = read(key)
        .and_then(|bytes| {
            PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
                pem::Error::NoItemsFound => TlsProblem::NoPem {
                    expected: "PRIVATE KEY",
                },
                other => TlsProblem::BadPem(other.to_string()),
            })
        })
        .and_then(|der| {
            async_nats::rustls::crypto::ring::sign::any_supported_type(&der)
                .map_err(|e| TlsProblem::BadKey(e.to_string()))
        })
        .map_err(tls_error(KEY_FILE_VAR, key))?;
    match CertifiedKey::new(chain, signing_key).keys_match() {
        // A key type whose public half rustls cannot derive: the handshake will tell.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(e) => Err(tls_error(KEY_FILE_VAR, key)(TlsProblem::KeyMismatch {
            certificate: cert.display().to_string(),
            reason: e.to_string(),
        })),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A CA certificate and a client certificate with its key, and a key of no certificate,
    /// as PEM files in a temporary folder.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let client_key = rcgen::KeyPair::generate().unwrap();
            let client = rcgen::CertificateParams::new(vec!["client".to_owned()])
                .unwrap()
                .signed_by(&client_key, &issuer)
                .unwrap();
            let other_key = rcgen::KeyPair::generate().unwrap();
            let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text);
            write("ca.crt", ca_cert.pem()).unwrap();
            write("client.crt", client.pem()).unwrap();
            write("client.key", client_key.serialize_pem()).unwrap();
            write("other.key", other_key.serialize_pem()).unwrap();
            write("garbage.pem", "not pem at all\n".to_owned()).unwrap();
            Files { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    /// The problem `NatsTls::from_config` reports, after checking that the error names
    /// `setting` and the file `file`.
    fn problem(config: &RuntimeConfig, setting: &str, file: &str) -> TlsProblem {
        let error = NatsTls::from_config(config).unwrap_err();
        let message = error.to_string();
        assert!(message.contains(setting), "{message}");
        assert!(message.contains(file), "{message}");
        match error {
            RuntimeError::NatsTls { problem, .. } => problem,
            other => panic!("expected a TLS error, got {other:?}"),
        }
    }

    #[test]
    fn tls_is_required_by_the_setting_a_tls_url_or_any_tls_file() {
        let plain = NatsTls::from_config(&RuntimeConfig::default()).unwrap();
        assert_eq!(plain, NatsTls::default());
        assert!(!plain.required);

        let flag = RuntimeConfig {
            nats_tls_required: true,
            ..RuntimeConfig::default()
        };
        assert!(NatsTls::from_config(&flag).unwrap().required);

        let url = RuntimeConfig {
            nats_url: "nats://a:4222, TLS://b:4222".to_owned(),
            ..RuntimeConfig::default()
        };
        assert!(NatsTls::from_config(&url).unwrap().required);

        let files = Files::new();
        let with_ca = RuntimeConfig {
            nats_tls_ca_file: Some(files.path("ca.crt")),
            nats_tls_cert_file: Some(files.path("client.crt")),
            nats_tls_key_file: Some(files.path("client.key")),
            ..RuntimeConfig::default()
        };
        assert_eq!(
            NatsTls::from_config(&with_ca).unwrap(),
            NatsTls {
                required: true,
                ca_file: Some(files.path("ca.crt")),
                client_certificate: Some((files.path("client.crt"), files.path("client.key"))),
            }
        );
    }

    #[test]
    fn an_unusable_ca_file_is_a_typed_error_naming_it_and_its_setting() {
        let files = Files::new();
        let ca = |name: &str| RuntimeConfig {
            nats_tls_ca_file: Some(files.path(name)),
            ..RuntimeConfig::default()
        };
        assert!(matches!(
            problem(&ca("nope.crt"), CA_FILE_VAR, "nope.crt"),
            TlsProblem::Missing
        ));
        assert!(matches!(
            problem(&ca("garbage.pem"), CA_FILE_VAR, "garbage.pem"),
            TlsProblem::NoPem {
                expected: "CERTIFICATE"
            }
        ));
        // The key where the CA should be: PEM, but no certificate in it.
        assert!(matches!(
            problem(&ca("client.key"), CA_FILE_VAR, "client.key"),
            TlsProblem::NoPem {
                expected: "CERTIFICATE"
            }
        ));
        std::fs::write(
            files.path("broken.crt"),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(matches!(
            problem(&ca("broken.crt"), CA_FILE_VAR, "broken.crt"),
            TlsProblem::BadCertificate(_)
        ));
        #[cfg(unix)]
        {
            // A folder reads as an I/O error other than "not found".
            assert!(matches!(
                problem(&ca(""), CA_FILE_VAR, files.dir.path().to_str().unwrap()),
                TlsProblem::Unreadable(_)
            ));
        }
    }

    #[test]
    fn a_client_certificate_needs_its_own_key() {
        let files = Files::new();
        let client = |cert: Option<&str>, key: Option<&str>| RuntimeConfig {
            nats_tls_cert_file: cert.map(|name| files.path(name)),
            nats_tls_key_file: key.map(|name| files.path(name)),
            ..RuntimeConfig::default()
        };
        assert!(matches!(
            problem(
                &client(Some("client.crt"), None),
                CERT_FILE_VAR,
                "client.crt"
            ),
            TlsProblem::Unpaired {
                missing: KEY_FILE_VAR
            }
        ));
        assert!(matches!(
            problem(
                &client(None, Some("client.key")),
                KEY_FILE_VAR,
                "client.key"
            ),
            TlsProblem::Unpaired {
                missing: CERT_FILE_VAR
            }
        ));
        assert!(matches!(
            problem(
                &client(Some("client.crt"), Some("other.key")),
                KEY_FILE_VAR,
                "other.key"
            ),
            TlsProblem::KeyMismatch { .. }
        ));
        assert!(matches!(
            problem(
                &client(Some("client.crt"), Some("client.crt")),
                KEY_FILE_VAR,
                "client.crt"
            ),
            TlsProblem::NoPem {
                expected: "PRIVATE KEY"
            }
        ));
        assert!(matches!(
            problem(
                &client(Some("client.key"), Some("client.key")),
                CERT_FILE_VAR,
                "client.key"
            ),
            TlsProblem::NoPem {
                expected: "CERTIFICATE"
            }
        ));
        assert!(
            NatsTls::from_config(&client(Some("client.crt"), Some("client.key")))
                .unwrap()
                .client_certificate
                .is_some()
        );
    }
}
