//! `darkroom-infra`: provisions what Darkroom needs on NATS JetStream and S3, idempotently.
//!
//! - [`config`]: the settings (the functions' [`darkroom_shared::RuntimeConfig`] plus the
//!   lifecycle rule's prefix and days);
//! - [`plan`]: what would change, resource by resource;
//! - [`jetstream`]: streams, KV buckets and consumers, compared field by field with the
//!   diff [`darkroom_shared::topology::Topology::ensure`] uses, so the functions and this
//!   tool never fight;
//! - [`bucket`]: the bucket and its lifecycle rule (the notification is reported as not
//!   managed here).
//!
//! [`Provisioner::apply`] refuses, before changing anything, a plan with a change that would
//! lose data unless forced.

pub mod bucket;
pub mod config;
pub mod jetstream;
pub mod plan;

pub use config::ProvisionConfig;
pub use plan::{Action, Item, Plan};

/// What can go wrong while provisioning.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The settings could not be read.
    #[error("configuration: {0}")]
    Config(#[from] Box<figment::Error>),
    /// A NATS or JetStream request failed.
    #[error("NATS: {0}")]
    Nats(String),
    /// An S3 request failed.
    #[error("S3: {0}")]
    S3(String),
    /// The plan holds changes that would lose data and `--force` was not given; nothing was
    /// changed.
    #[error("refused, nothing changed: {} change(s) would lose data (see the plan; --force makes them)", .0.refusals().len())]
    Refused(Box<Plan>),
}

impl From<darkroom_shared::RuntimeError> for ProvisionError {
    fn from(error: darkroom_shared::RuntimeError) -> Self {
        match error {
            darkroom_shared::RuntimeError::Storage(message) => ProvisionError::S3(message),
            other => ProvisionError::Nats(other.to_string()),
        }
    }
}

/// Plans and applies against one NATS server (or cluster) and one S3 endpoint.
#[derive(Debug, Clone)]
pub struct Provisioner {
    config: ProvisionConfig,
    js: async_nats::jetstream::Context,
    s3: aws_sdk_s3::Client,
}

impl Provisioner {
    /// Connects to NATS and builds the S3 client, both as the functions do.
    pub async fn connect(config: ProvisionConfig) -> Result<Self, ProvisionError> {
        let client = darkroom_shared::nats::connect(&config.runtime, "darkroom-infra").await?;
        let s3 = darkroom_shared::s3::client(&config.runtime).await;
        Ok(Self::new(config, async_nats::jetstream::new(client), s3))
    }

    /// A provisioner on clients the caller made.
    pub fn new(
        config: ProvisionConfig,
        js: async_nats::jetstream::Context,
        s3: aws_sdk_s3::Client,
    ) -> Self {
        Provisioner { config, js, s3 }
    }

    /// What `apply` would do; changes nothing.
    pub async fn plan(&self) -> Result<Plan, ProvisionError> {
        let topology = self.config.runtime.topology();
        let mut items = jetstream::plan(&self.js, &topology).await?;
        items.extend(bucket::plan(&self.s3, &self.config).await?);
        Ok(Plan { items })
    }

    /// Plans, refuses ([`ProvisionError::Refused`], nothing changed) when a change would lose
    /// data unless `force`, then makes every change. Returns the plan it carried out.
    pub async fn apply(&self, force: bool) -> Result<Plan, ProvisionError> {
        let plan = self.plan().await?;
        if !force && !plan.refusals().is_empty() {
            return Err(ProvisionError::Refused(Box::new(plan)));
        }
        if plan.has_changes() {
            jetstream::apply(&self.js, &self.config.runtime.topology()).await?;
            bucket::apply(&self.s3, &self.config).await?;
        }
        Ok(plan)
    }
}
