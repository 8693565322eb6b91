//! `darkroom-infra plan|apply [--force]`: see the crate's README.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use darkroom_infra::{ProvisionConfig, ProvisionError, Provisioner};

/// Provisions Darkroom's JetStream streams, consumers and KV buckets and its S3 bucket.
#[derive(Debug, Parser)]
#[command(name = "darkroom-infra", version)]
struct Cli {
    /// TOML settings file (default: the file named by DARKROOM_CONFIG, if any); DARKROOM_*
    /// variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints each resource and what would change; changes nothing.
    Plan,
    /// Makes the changes the plan shows; refuses data-losing ones unless --force.
    Apply {
        /// Also make changes that lose data (shorter retention than the data held, fewer
        /// replicas, another retention or storage type, removed subjects, …).
        #[arg(long)]
        force: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(ProvisionError::Refused(plan)) => {
            print!("{plan}");
            eprintln!("darkroom-infra: {}", ProvisionError::Refused(plan));
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("darkroom-infra: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), ProvisionError> {
    let config = ProvisionConfig::load(cli.config.as_deref())?;
    let provisioner = Provisioner::connect(config).await?;
    match cli.command {
        Command::Plan => print!("{}", provisioner.plan().await?),
        Command::Apply { force } => {
            let plan = provisioner.apply(force).await?;
            print!("{plan}");
            if plan.has_changes() {
                println!("applied");
            }
        }
    }
    Ok(())
}
