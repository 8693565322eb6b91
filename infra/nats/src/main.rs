//! `darkroom-nats-config`: writes a `nats-server` config with Darkroom's account, users and
//! permissions, generating missing NKey seeds into a private folder.
//!
//! ```text
//! darkroom-nats-config render --secrets-dir DIR --out nats.conf [--listen 127.0.0.1:4222]
//!     [--monitor 127.0.0.1:8222] [--store-dir DIR] [--server-name NAME]
//!     [--cluster-name NAME --cluster-listen 0.0.0.0:6222 --route nats-route://HOST:6222 ...]
//!     [--tls-cert tls.crt --tls-key tls.key [--tls-ca ca.crt] [--tls-verify]]
//! darkroom-nats-config tls-certs --out-dir DIR --name HOST [--name HOST ...] [--days N]
//!     # a self-signed CA (ca.crt) and a server certificate for HOSTs (tls.crt, tls.key)
//! darkroom-nats-config new-seed     # a fresh user seed (SU…) on stdout
//! darkroom-nats-config public-key [--seed-file FILE]   # the U… key of a seed (stdin by default)
//! darkroom-nats-config table        # the permission table in Markdown
//! darkroom-nats-config k8s-account  # the account block of the Kubernetes config
//! ```

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::io::Read as _;

use darkroom_nats_auth::tls::{CA_FILE, CERT_FILE, CertificateAuthority, KEY_FILE};
use darkroom_nats_auth::{
    ClusterSettings, ServerSettings, ServerTls, UserKey, render, secrets, server_config,
};

#[derive(Debug, Parser)]
#[command(
    name = "darkroom-nats-config",
    about = "Darkroom's nats-server config: account, users, permissions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Write the config, generating the seeds that do not exist yet.
    Render {
        /// Folder of `<user>.nk` seed files (created 0700, files 0600; never commit it).
        #[arg(long)]
        secrets_dir: PathBuf,
        /// Where to write the config (it holds public keys only; written 0600 all the same).
        #[arg(long)]
        out: PathBuf,
        /// Client listen address.
        #[arg(long, default_value = "0.0.0.0:4222")]
        listen: String,
        /// Monitoring address; keep it on localhost or a cluster-internal address.
        #[arg(long, default_value = "127.0.0.1:8222")]
        monitor: String,
        /// JetStream store directory.
        #[arg(long)]
        store_dir: Option<PathBuf>,
        /// Server name (required in a cluster).
        #[arg(long)]
        server_name: Option<String>,
        /// Cluster name: renders a `cluster {}` block (with --cluster-listen and --route).
        #[arg(long, requires = "cluster_listen")]
        cluster_name: Option<String>,
        /// Route listen address of this server.
        #[arg(long, requires = "cluster_name")]
        cluster_listen: Option<String>,
        /// Route URL of another server (repeat for each).
        #[arg(long = "route", requires = "cluster_name")]
        routes: Vec<String>,
        /// The server's PEM certificate: serve TLS only, to clients and (clustered) on routes.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// PEM CA certificates that sign the peers' certificates (required on routes, where
        /// the servers verify each other, and with --tls-verify).
        #[arg(long, requires = "tls_cert")]
        tls_ca: Option<PathBuf>,
        /// Clients must present a certificate signed by --tls-ca (mutual TLS, on top of NKeys).
        #[arg(long, requires = "tls_ca")]
        tls_verify: bool,
    },
    /// Write a new self-signed CA (`ca.crt`) and a server certificate it signs for the given
    /// names (`tls.crt`, `tls.key` 0600): test or bootstrap certificates for --tls-cert. The
    /// CA's key is not kept: to rotate, run it again and roll the servers and clients.
    TlsCerts {
        /// Folder to write the files into (created if need be).
        #[arg(long)]
        out_dir: PathBuf,
        /// A DNS name or IP address clients (and routes) reach the server by (repeat).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Days the certificates are valid (at most ten years).
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
    },
    /// Print a new random NKey user seed (`SU…`), for a secret store.
    NewSeed,
    /// Print the public key (`U…`) of a user seed.
    PublicKey {
        /// The seed file; the seed is read from stdin without it (never give it as an argument:
        /// command lines are visible to other users).
        #[arg(long)]
        seed_file: Option<PathBuf>,
    },
    /// Print the permission table in Markdown.
    Table,
    /// Print the `DARKROOM` account with `$NATS_NKEY_<USER>` public keys, for the Kubernetes
    /// NATS config (infra/k8s/base/nats/config.yaml, between its markers).
    K8sAccount,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Render {
            secrets_dir,
            out,
            listen,
            monitor,
            store_dir,
            server_name,
            cluster_name,
            cluster_listen,
            routes,
            tls_cert,
            tls_key,
            tls_ca,
            tls_verify,
        } => {
            let tls = tls_cert
                .zip(tls_key)
                .map(|(cert_file, key_file)| ServerTls {
                    cert_file,
                    key_file,
                    ca_file: tls_ca,
                    verify_clients: tls_verify,
                });
            if cluster_name.is_some() && tls.as_ref().is_some_and(|tls| tls.ca_file.is_none()) {
                anyhow::bail!(
                    "--tls-cert with --cluster-name needs --tls-ca: the servers verify each other on the routes"
                );
            }
            let keys = secrets::load_or_create(&secrets_dir)?;
            let settings = ServerSettings {
                listen,
                monitor: Some(monitor),
                store_dir,
                server_name,
                cluster: cluster_name
                    .zip(cluster_listen)
                    .map(|(name, listen)| ClusterSettings {
                        name,
                        listen,
                        routes,
                    }),
                tls,
            };
            darkroom_nats_auth::tls::write_private(
                &out,
                &render(&settings, &secrets::public_keys(&keys)),
            )
            .with_context(|| format!("write {}", out.display()))?;
            println!(
                "wrote {} ({} users; their seeds in {})",
                out.display(),
                keys.len(),
                secrets_dir.display()
            );
        }
        Command::TlsCerts {
            out_dir,
            names,
            days,
        } => {
            let validity = std::time::Duration::from_secs(days.saturating_mul(86_400));
            let ca = CertificateAuthority::generate("Darkroom NATS CA", validity)?;
            let server = ca.issue_server(&names)?;
            ca.write_server_files(&out_dir, &server)?;
            println!(
                "wrote {dir}/{CA_FILE}, {dir}/{CERT_FILE} and {dir}/{KEY_FILE} (for {names}, {days} days)",
                dir = out_dir.display(),
                names = names.join(", ")
            );
        }
        Command::NewSeed => println!("{}", UserKey::generate().seed()),
        Command::PublicKey { seed_file } => {
            let key = match seed_file {
                Some(path) => secrets::read_seed_file(&path)?,
                None => {
                    let mut text = String::new();
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .context("read the seed from stdin")?;
                    UserKey::from_seed(&text).context("stdin")?
                }
            };
            println!("{}", key.public_key());
        }
        Command::Table => print!("{}", server_config::markdown_table()),
        Command::K8sAccount => print!("{}", server_config::account_block_with_variables()),
    }
    Ok(())
}
