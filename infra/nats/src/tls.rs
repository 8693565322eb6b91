//! TLS certificates for the NATS servers: a private certificate authority and the certificates
//! it issues, as PEM. `darkroom-nats-config tls-certs` (and through it
//! `infra/k8s/create-secrets`) writes a self-signed CA and one server certificate for the
//! servers' names; the tests issue client certificates too.
//!
//! A server certificate is good for both ends of a TLS connection (server and client
//! authentication): a NATS server presents it to clients, and to the other servers of its
//! cluster on the routes, where each side verifies the other.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;

/// The CA certificate's file name, as Kubernetes TLS Secrets (and cert-manager) name it.
pub const CA_FILE: &str = "ca.crt";
/// The server certificate's file name.
pub const CERT_FILE: &str = "tls.crt";
/// The server key's file name (written 0600).
pub const KEY_FILE: &str = "tls.key";

/// What can go wrong making or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen refused the parameters (a name that is no DNS name, say) or failed to sign.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A server certificate needs at least one name.
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoNames,
    /// A file could not be written.
    #[error("{path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Result alias of this module.
pub type Result<T, E = TlsError> = std::result::Result<T, E>;

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The certificate (`-----BEGIN CERTIFICATE-----`).
    pub certificate_pem: String,
    /// Its PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`); a secret.
    pub private_key_pem: String,
}

/// A private certificate authority (ECDSA P-256), self-signed, that issues server and client
/// certificates.
#[derive(Debug)]
pub struct CertificateAuthority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    validity: Duration,
}

impl CertificateAuthority {
    /// A new CA named `common_name`; it and what it issues are valid from an hour ago (clocks
    /// drift) for `validity`.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, validity);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(CertificateAuthority { issuer, validity })
    }

    /// The CA certificate: what clients trust (`ca.crt`, `DARKROOM_NATS_TLS_CA_FILE`).
    pub fn certificate_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (DNS names and IP addresses, as clients address the
    /// server: a name that is an IP address becomes an IP SAN), good for server and client
    /// authentication (cluster routes verify both ways).
    pub fn issue_server(&self, names: &[String]) -> Result<IssuedCertificate> {
        let first = names.first().ok_or(TlsError::NoNames)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = name(first);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(params)
    }

    /// A client certificate for `common_name`, for a server that verifies its clients
    /// (`--tls-verify`).
    pub fn issue_client(&self, common_name: &str) -> Result<IssuedCertificate> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<IssuedCertificate> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, self.validity);
        let key = KeyPair::generate()?;
        let certificate = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            certificate_pem: certificate.pem(),
            private_key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.crt` and, for `server`, `tls.crt` and `tls.key` (0600) into `dir` (created
    /// if need be): the layout of a Kubernetes `kubernetes.io/tls` Secret mounted as files.
    pub fn write_server_files(&self, dir: &Path, server: &IssuedCertificate) -> Result<()> {
        let write_error = |path: PathBuf| move |source| TlsError::Write { path, source };
        std::fs::create_dir_all(dir).map_err(write_error(dir.to_path_buf()))?;
        let ca = dir.join(CA_FILE);
        std::fs::write(&ca, self.certificate_pem()).map_err(write_error(ca))?;
        let cert = dir.join(CERT_FILE);
        std::fs::write(&cert, &server.certificate_pem).map_err(write_error(cert))?;
        let key = dir.join(KEY_FILE);
        write_private(&key, &server.private_key_pem).map_err(write_error(key))
    }
}

/// Writes `text` into a new or truncated file only its owner may read (0600 on Unix).
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)?.write_all(text.as_bytes())
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Darkroom");
    name.push(DnType::CommonName, common_name);
    name
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + validity;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_files_are_pem_and_the_key_is_private() {
        let ca = CertificateAuthority::generate("Darkroom test CA", DAY).unwrap();
        let server = ca
            .issue_server(&["nats.example".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        ca.write_server_files(dir.path(), &server).unwrap();
        let read = |file| std::fs::read_to_string(dir.path().join(file)).unwrap();
        assert!(read(CA_FILE).starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(read(CERT_FILE).starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(read(KEY_FILE).starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_ne!(read(CA_FILE), read(CERT_FILE));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_server_certificate_needs_a_name() {
        let ca = CertificateAuthority::generate("Darkroom test CA", DAY).unwrap();
        assert!(matches!(ca.issue_server(&[]), Err(TlsError::NoNames)));
        assert!(matches!(
            ca.issue_server(&["nåts.example".to_owned()]),
            Err(TlsError::Certificate(_))
        ));
    }
}
