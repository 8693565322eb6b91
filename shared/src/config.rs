//! Configuration: plain serde structs, defaults in code, overridden by an optional TOML file
//! (path in `DARKROOM_CONFIG`) and then by `DARKROOM_<FIELD>` environment variables.
//!
//! A function's own settings live in its own struct that flattens [`RuntimeConfig`]:
//!
//! ```
//! #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
//! #[serde(default)]
//! struct IngestConfig {
//!     #[serde(flatten)]
//!     runtime: darkroom_shared::RuntimeConfig,
//!     /// Read from DARKROOM_INGEST_LISTEN.
//!     ingest_listen: String,
//! }
//! let config: IngestConfig = darkroom_shared::config::load().unwrap();
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::topology::{StorageBounds, Topology};
use crate::{Result, RuntimeError};

/// Environment variable naming an optional TOML config file.
pub const CONFIG_FILE_VAR: &str = "DARKROOM_CONFIG";
/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "DARKROOM_";

/// Settings every function shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeConfig {
    /// NATS server URL(s), comma-separated (`DARKROOM_NATS_URL`, default `nats://127.0.0.1:4222`).
    pub nats_url: String,
    /// NATS credentials file (`.creds`, JWT + NKey) for decentralised auth.
    pub nats_creds: Option<PathBuf>,
    /// File holding this function's NKey user seed (`SU…`, one line) for a server that names
    /// its users by NKey public keys, as Darkroom's own does (`DARKROOM_NATS_NKEY_FILE`; see
    /// infra/nats). The file must be private: no access for others, at most read for the
    /// group (what Kubernetes' `fsGroup` gives a mounted Secret).
    pub nats_nkey_file: Option<PathBuf>,
    /// The NKey user seed itself (`DARKROOM_NATS_NKEY_SEED`), where a file is awkward (a
    /// Lambda's environment); set this or [`Self::nats_nkey_file`], not both.
    pub nats_nkey_seed: Option<String>,
    /// PEM file of the certificate authorities to trust for the NATS servers' certificates
    /// (`DARKROOM_NATS_TLS_CA_FILE`): a private CA's `ca.crt`. Unset, the system's roots are
    /// trusted. Setting it makes TLS required.
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Refuse a NATS connection that is not TLS (`DARKROOM_NATS_TLS_REQUIRED`, default
    /// `false`); a `tls://` URL, a CA file or a client certificate imply it.
    pub nats_tls_required: bool,
    /// PEM file of this client's certificate, for a NATS server that verifies its clients
    /// (`DARKROOM_NATS_TLS_CERT_FILE`, with [`Self::nats_tls_key_file`]: both or neither).
    pub nats_tls_cert_file: Option<PathBuf>,
    /// PEM file of the private key of [`Self::nats_tls_cert_file`]
    /// (`DARKROOM_NATS_TLS_KEY_FILE`).
    pub nats_tls_key_file: Option<PathBuf>,
    /// NATS user, with [`Self::nats_password`] (a server of your own; not with an NKey).
    pub nats_user: Option<String>,
    /// NATS password.
    pub nats_password: Option<String>,
    /// NATS token.
    pub nats_token: Option<String>,
    /// S3 endpoint for non-AWS servers (`http://127.0.0.1:8333`); unset on AWS.
    pub s3_endpoint: Option<String>,
    /// S3 region (default `us-east-1`).
    pub s3_region: String,
    /// Path-style addressing (`endpoint/bucket/key`); default: on when an endpoint is set.
    pub s3_force_path_style: Option<bool>,
    /// Static S3 access key, for S3-compatible servers; unset, the AWS credential chain is used.
    pub s3_access_key_id: Option<String>,
    /// Static S3 secret key, with [`Self::s3_access_key_id`].
    pub s3_secret_access_key: Option<String>,
    /// Seconds to wait for a TCP (and TLS) connection to S3 (default 5).
    pub s3_connect_timeout_secs: f64,
    /// Seconds to wait for the first byte of an S3 response (default 30): a server that
    /// accepts and never answers costs this, not a job held for ever.
    pub s3_read_timeout_secs: f64,
    /// Seconds one S3 call may take in all, retries included (default 120: room for a
    /// 64 MiB body on a slow link).
    pub s3_operation_timeout_secs: f64,
    /// The bucket Darkroom watches and writes to (default `darkroom`).
    pub bucket: String,
    /// Log format: `text` (default) or `json`.
    pub log_format: LogFormat,
    /// Log filter in `tracing` `EnvFilter` syntax (default `info,async_nats=warn`;
    /// `RUST_LOG` wins when set).
    pub log_filter: String,
    /// Address to serve Prometheus metrics on (`/metrics`); none by default.
    pub metrics_addr: Option<SocketAddr>,
    /// Address to serve `/healthz` (alive) and `/readyz` (ready to take work) on; none by
    /// default. The inference worker is ready only once its model is loaded.
    pub health_addr: Option<SocketAddr>,
    /// Replicas of every stream and KV bucket (default 1; 3 on a NATS cluster).
    pub jetstream_replicas: usize,
    /// Seconds a consumer waits for an ack before redelivering (default 60); workers send
    /// in-progress acks every third of it, so a long job is never redelivered while its worker
    /// lives, and a dead worker's job is redelivered after this long.
    pub ack_wait_secs: f64,
    /// Deliveries before a message is dead-lettered (default 5).
    pub max_deliver: i64,
    /// GPU slots of the whole inference fleet: how many jobs may render at once across every
    /// worker (`DARKROOM_INFERENCE_SLOTS`, default 8). Set it to the most workers you run (the
    /// autoscaler's `maxReplicaCount`); `infra/k8s/check` holds the two equal.
    pub inference_slots: i64,
    /// On SIGTERM, how long the message in hand may still take before it is handed back for
    /// another consumer, in seconds (default 30; a GPU worker wants its slowest job's time,
    /// below the orchestrator's termination grace).
    pub shutdown_grace_secs: u64,
    /// Longest a CPU function (preprocess, notifier) may handle one message, in seconds
    /// (default 300; 0: no limit): past it the message is given up and retried like a
    /// transient failure, so a call that never returns cannot hold a message for good. The
    /// inference worker does not apply it: a render cannot be stopped halfway.
    pub handling_timeout_secs: u64,
    /// Seconds upload notifications are kept in `DARKROOM_UPLOADS` (default 7 days).
    pub uploads_max_age_secs: u64,
    /// Seconds lifecycle events are kept in `DARKROOM_EVENTS` (default 7 days); also how long
    /// the notifier remembers what it delivered.
    pub events_max_age_secs: u64,
    /// Seconds the notifier's fan-out is kept in `DARKROOM_NOTIFY` (default 1 day).
    pub notify_max_age_secs: u64,
    /// Seconds dead letters are kept in `DARKROOM_DLQ` (default 30 days).
    pub dlq_max_age_secs: u64,
    /// Seconds job records are kept in the `darkroom_jobs` bucket (default 30 days).
    pub jobs_max_age_secs: u64,
    /// Most bytes `DARKROOM_UPLOADS` holds (default 1 GiB); full, it refuses new uploads
    /// (the S3 event is retried, the reconciler finds the object later).
    pub uploads_max_bytes: i64,
    /// Most bytes the `DARKROOM_JOBS` work queue holds (default 1 GiB); full, preprocess
    /// retries and then dead-letters.
    pub jobs_stream_max_bytes: i64,
    /// Most bytes `DARKROOM_EVENTS` holds (default 5 GiB); full, it refuses new events.
    pub events_max_bytes: i64,
    /// Most bytes `DARKROOM_NOTIFY` holds (default 2 GiB); full, its oldest replay history
    /// goes.
    pub notify_max_bytes: i64,
    /// Most bytes `DARKROOM_DLQ` holds (default 1 GiB); full, dead-lettering is retried.
    pub dlq_max_bytes: i64,
    /// Most bytes the job records (`darkroom_jobs`) hold (default 3 GiB).
    pub jobs_max_bytes: i64,
    /// Most bytes the notifier's ledger (`darkroom_notifier_deliveries`) holds (default 1 GiB).
    pub deliveries_max_bytes: i64,
    /// Whether a function creates and updates the topology at start (default `true`). Set it
    /// to `false` (`DARKROOM_JETSTREAM_PROVISION=false`) where the function's NATS user may not
    /// change streams (see infra/nats): it then only checks that its streams, buckets and
    /// consumers exist, and provisioning is the provisioner's job.
    pub jetstream_provision: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let defaults = Topology::default();
        RuntimeConfig {
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            nats_creds: None,
            nats_nkey_file: None,
            nats_nkey_seed: None,
            nats_tls_ca_file: None,
            nats_tls_required: false,
            nats_tls_cert_file: None,
            nats_tls_key_file: None,
            nats_user: None,
            nats_password: None,
            nats_token: None,
            s3_endpoint: None,
            s3_region: "us-east-1".to_owned(),
            s3_force_path_style: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_connect_timeout_secs: 5.0,
            s3_read_timeout_secs: 30.0,
            s3_operation_timeout_secs: 120.0,
            bucket: "darkroom".to_owned(),
            log_format: LogFormat::Text,
            log_filter: "info,async_nats=warn".to_owned(),
            metrics_addr: None,
            health_addr: None,
            jetstream_replicas: 1,
            ack_wait_secs: 60.0,
            max_deliver: 5,
            inference_slots: defaults.inference_slots,
            shutdown_grace_secs: 30,
            handling_timeout_secs: 300,
            uploads_max_age_secs: defaults.uploads_max_age.as_secs(),
            events_max_age_secs: defaults.events_max_age.as_secs(),
            notify_max_age_secs: defaults.notify_max_age.as_secs(),
            dlq_max_age_secs: defaults.dlq_max_age.as_secs(),
            jobs_max_age_secs: defaults.jobs_kv_max_age.as_secs(),
            uploads_max_bytes: defaults.bounds.uploads,
            jobs_stream_max_bytes: defaults.bounds.jobs_stream,
            events_max_bytes: defaults.bounds.events,
            notify_max_bytes: defaults.bounds.notify,
            dlq_max_bytes: defaults.bounds.dlq,
            jobs_max_bytes: defaults.bounds.jobs_kv,
            deliveries_max_bytes: defaults.bounds.deliveries_kv,
            jetstream_provision: true,
        }
    }
}

impl RuntimeConfig {
    /// Settings of the consumer loop on `consumer` of `stream`: the topology's AckWait and
    /// MaxDeliver, and this configuration's shutdown grace.
    pub fn consumer_settings(
        &self,
        stream: &str,
        consumer: &str,
    ) -> crate::consumer::ConsumerSettings {
        crate::consumer::ConsumerSettings {
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            handling_timeout: (self.handling_timeout_secs > 0)
                .then(|| Duration::from_secs(self.handling_timeout_secs)),
            ..crate::consumer::ConsumerSettings::new(&self.topology(), stream, consumer)
        }
    }

    /// The JetStream topology these settings describe: [`Topology::default`] with the replica
    /// count, AckWait, MaxDeliver and max ages set here. The functions (through
    /// [`Topology::ensure`]) and `darkroom-infra` both derive what they want from this, so with
    /// the same settings they want the same thing.
    pub fn topology(&self) -> Topology {
        Topology {
            uploads_max_age: Duration::from_secs(self.uploads_max_age_secs),
            events_max_age: Duration::from_secs(self.events_max_age_secs),
            notify_max_age: Duration::from_secs(self.notify_max_age_secs),
            dlq_max_age: Duration::from_secs(self.dlq_max_age_secs),
            jobs_kv_max_age: Duration::from_secs(self.jobs_max_age_secs),
            replicas: self.jetstream_replicas.max(1),
            ack_wait: Duration::try_from_secs_f64(self.ack_wait_secs)
                .unwrap_or(Duration::from_secs(60))
                .max(Duration::from_millis(100)),
            max_deliver: self.max_deliver.max(1),
            inference_slots: self.inference_slots.max(1),
            bounds: StorageBounds {
                uploads: self.uploads_max_bytes.max(1),
                jobs_stream: self.jobs_stream_max_bytes.max(1),
                events: self.events_max_bytes.max(1),
                notify: self.notify_max_bytes.max(1),
                dlq: self.dlq_max_bytes.max(1),
                jobs_kv: self.jobs_max_bytes.max(1),
                deliveries_kv: self.deliveries_max_bytes.max(1),
            },
            ..Topology::default()
        }
    }
}

impl RuntimeConfig {
    /// Makes the topology ready at a function's start: [`Topology::ensure`] when
    /// [`Self::jetstream_provision`] is on, [`Topology::check`] (read-only) when it is off.
    pub async fn prepare_topology(&self, js: &async_nats::jetstream::Context) -> Result<()> {
        let topology = self.topology();
        if self.jetstream_provision {
            topology.ensure(js).await
        } else {
            topology.check(js).await
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Loads `T` from its defaults, the file named by `DARKROOM_CONFIG` and `DARKROOM_*` variables.
pub fn load<T: Serialize + DeserializeOwned + Default>() -> Result<T> {
    figment::<T>()
        .extract()
        .map_err(|e| RuntimeError::Config(Box::new(e)))
}

/// [`load`] for a program's `main`: on a bad setting, prints one line naming the variable,
/// the value and the form expected (`program: DARKROOM_X=value: expected …`) and exits with
/// status 2, with no backtrace and no library error dump.
pub fn load_or_exit<T: Serialize + DeserializeOwned + Default>(program: &str) -> T {
    match figment::<T>().extract() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{program}: {}", describe(&error));
            std::process::exit(2)
        }
    }
}

/// A settings error in one line per bad setting (joined by `; `): where it came from (the
/// `DARKROOM_*` variable or the file's key), the value given and the form expected.
pub fn describe(error: &figment::Error) -> String {
    error
        .clone()
        .into_iter()
        .map(|one| describe_one(&one))
        .collect::<Vec<_>>()
        .join("; ")
}

fn describe_one(error: &figment::Error) -> String {
    use figment::error::Kind;
    let key = error.path.join(".");
    let from_env = error
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment variable"));
    let place = if from_env {
        // Every setting is a top-level field (functions flatten RuntimeConfig); deeper path
        // parts are items inside the variable's value.
        let field = error.path.first().map(String::as_str).unwrap_or_default();
        let variable = format!("{ENV_PREFIX}{}", field.to_ascii_uppercase());
        match std::env::var(&variable) {
            Ok(value) => format!("{variable}={value}"),
            Err(_) => variable,
        }
    } else if let Some(metadata) = &error.metadata {
        format!("{key} (in {})", metadata.name)
    } else if key.is_empty() {
        "settings".to_owned()
    } else {
        key
    };
    let problem = match &error.kind {
        Kind::InvalidType(actual, expected) => {
            format!("{} ({actual} given)", expected_form(expected))
        }
        Kind::InvalidValue(actual, expected) => {
            format!("{} ({actual} given)", expected_form(expected))
        }
        Kind::UnknownVariant(given, variants) => {
            format!("expected one of {} (`{given}` given)", variants.join(", "))
        }
        Kind::InvalidLength(given, expected) => format!("expected {expected} ({given} given)"),
        Kind::Message(message) => message.clone(),
        other => other.to_string(),
    };
    format!("{place}: {problem}")
}

/// serde's "expected …" with the form a variable takes for lists, which serde calls sequences.
fn expected_form(expected: &str) -> String {
    if expected.contains("sequence") {
        format!("expected {expected}: a list in brackets, e.g. [a, b]")
    } else {
        format!("expected {expected}")
    }
}

/// The layered sources behind [`load`], for callers that add their own.
pub fn figment<T: Serialize + Default>() -> Figment {
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = std::env::var_os(CONFIG_FILE_VAR) {
        figment = figment.merge(Toml::file_exact(PathBuf::from(path)));
    }
    figment.merge(Env::prefixed(ENV_PREFIX).ignore(&["config"]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_file_then_environment() {
        figment::Jail::expect_with(|jail| {
            // Start from a clean environment: local-dev/env.sh exports DARKROOM_* variables.
            jail.clear_env();
            jail.create_file(
                "darkroom.toml",
                "bucket = \"from-file\"\ns3_region = \"eu-west-1\"",
            )?;
            jail.set_env("DARKROOM_CONFIG", "darkroom.toml");
            jail.set_env("DARKROOM_BUCKET", "from-env");
            jail.set_env("DARKROOM_METRICS_ADDR", "127.0.0.1:9464");
            let config: RuntimeConfig = load().unwrap();
            assert_eq!(config.bucket, "from-env");
            assert_eq!(config.s3_region, "eu-west-1");
            assert_eq!(config.nats_url, "nats://127.0.0.1:4222");
            assert_eq!(config.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_names_the_field() {
        figment::Jail::expect_with(|jail| {
            // Start from a clean environment: local-dev/env.sh exports DARKROOM_* variables.
            jail.clear_env();
            jail.set_env("DARKROOM_LOG_FORMAT", "xml");
            let error = load::<RuntimeConfig>().unwrap_err().to_string();
            assert!(error.contains("LOG_FORMAT"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn a_bad_setting_is_one_line_naming_the_variable_the_value_and_the_form() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            let line = || {
                let error = figment::<RuntimeConfig>()
                    .extract::<RuntimeConfig>()
                    .unwrap_err();
                describe(&error)
            };
            jail.set_env("DARKROOM_MAX_DELIVER", "five");
            let text = line();
            assert!(!text.contains('\n'), "{text}");
            assert!(
                text.starts_with("DARKROOM_MAX_DELIVER=five: expected i64"),
                "{text}"
            );
            jail.set_env("DARKROOM_MAX_DELIVER", "5");
            jail.set_env("DARKROOM_LOG_FORMAT", "xml");
            let text = line();
            assert!(
                text.starts_with("DARKROOM_LOG_FORMAT=xml: expected one of text, json"),
                "{text}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        figment::Jail::expect_with(|jail| {
            // Start from a clean environment: local-dev/env.sh exports DARKROOM_* variables.
            jail.clear_env();
            jail.set_env("DARKROOM_CONFIG", "nope.toml");
            assert!(load::<RuntimeConfig>().is_err());
            Ok(())
        });
    }
}
