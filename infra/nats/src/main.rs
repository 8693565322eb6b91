//! `darkroom-nats-config`: writes a `nats-server` config with Darkroom's account, users and
//! permissions, generating missing NKey seeds into a private folder.
//!
//! ```text
//! darkroom-nats-config render --secrets-dir DIR --out nats.conf [--listen 127.0.0.1:4222]
//!     [--monitor 127.0.0.1:8222] [--store-dir DIR] [--server-name NAME]
//!     [--cluster-name NAME --cluster-listen 0.0.0.0:6222 --route nats-route://HOST:6222 ...]
//! darkroom-nats-config new-seed     # a fresh user seed (SU…) on stdout
//! darkroom-nats-config public-key [--seed-file FILE]   # the U… key of a seed (stdin by default)
//! darkroom-nats-config table        # the permission table in Markdown
//! darkroom-nats-config k8s-account  # the account block of the Kubernetes config
//! ```

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::io::Read as _;

use darkroom_nats_auth::{
    ClusterSettings, ServerSettings, UserKey, render, secrets, server_config,
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
        } => {
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
            };
            write_private(&out, &render(&settings, &secrets::public_keys(&keys)))
                .with_context(|| format!("write {}", out.display()))?;
            println!(
                "wrote {} ({} users; their seeds in {})",
                out.display(),
                keys.len(),
                secrets_dir.display()
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

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)?.write_all(text.as_bytes())
}
