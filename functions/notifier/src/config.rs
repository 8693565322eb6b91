//! The function's settings: plain data with documented defaults, read like every Darkroom
//! function's (defaults, then the TOML file named by `DARKROOM_CONFIG`, then `DARKROOM_*`
//! environment variables; see `darkroom_shared::config`).

use std::path::PathBuf;
use std::time::Duration;

use darkroom_shared::RuntimeConfig;
use serde::{Deserialize, Serialize};

use crate::breaker::BreakerSettings;
use crate::endpoint::{EndpointError, Registry};
use crate::network::AllowedNetwork;
use crate::retry::Backoff;
use crate::webhook::RequestLimits;

/// The notifier's settings. Each field `notifier_x` is read from `DARKROOM_NOTIFIER_X`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NotifierConfig {
    /// Settings every function shares (NATS, logs, metrics).
    #[serde(flatten)]
    pub runtime: RuntimeConfig,
    /// The webhook endpoint file (`[[endpoints]]` tables, see the crate README); default none:
    /// no webhooks, fan-out to subjects only.
    pub notifier_endpoints_file: Option<PathBuf>,
    /// Restricted networks every endpoint may reach (default none). `[loopback]` for local
    /// development and tests; in the environment, `DARKROOM_NOTIFIER_ALLOW_NETWORKS='[loopback]'`.
    pub notifier_allow_networks: Vec<AllowedNetwork>,
    /// Attempts per webhook delivery before it is dead-lettered (default 8). The notifier
    /// consumer's MaxDeliver (8) caps it.
    pub notifier_max_attempts: u32,
    /// Backoff ceiling after the first failed attempt, in milliseconds (default 5 000); it
    /// doubles per attempt, and each delay is drawn from zero to the ceiling.
    pub notifier_backoff_base_ms: u64,
    /// Largest backoff ceiling, in milliseconds (default 600 000: 10 min).
    pub notifier_backoff_max_ms: u64,
    /// Longest `Retry-After` honoured, in seconds (default 3 600); longer requests wait this.
    pub notifier_retry_after_max_secs: u64,
    /// Connection timeout, in milliseconds (default 5 000).
    pub notifier_connect_timeout_ms: u64,
    /// Timeout of a whole request, response included, in milliseconds (default 15 000).
    pub notifier_request_timeout_ms: u64,
    /// Bytes of a response body read (default 65 536).
    pub notifier_max_response_bytes: usize,
    /// Events handled at once: pullers on the `notifier` consumer (default 4), so a slow
    /// endpoint holds up one of them for at most the request timeout.
    pub notifier_concurrency: usize,
    /// Failed attempts in a row after which an endpoint is cut off for a cool-down: its
    /// deliveries wait without a request (default 5; 0: never cut off).
    pub notifier_breaker_failures: u32,
    /// The first cool-down, in milliseconds (default 30 000); it doubles each time the
    /// trial attempt after it fails.
    pub notifier_breaker_cooldown_ms: u64,
    /// The longest cool-down, in milliseconds (default 600 000: 10 min).
    pub notifier_breaker_cooldown_max_ms: u64,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        let limits = RequestLimits::default();
        NotifierConfig {
            runtime: RuntimeConfig::default(),
            notifier_endpoints_file: None,
            notifier_allow_networks: Vec::new(),
            notifier_max_attempts: 8,
            notifier_backoff_base_ms: 5_000,
            notifier_backoff_max_ms: 600_000,
            notifier_retry_after_max_secs: 3_600,
            notifier_connect_timeout_ms: millis(limits.connect_timeout),
            notifier_request_timeout_ms: millis(limits.request_timeout),
            notifier_max_response_bytes: limits.max_response_bytes,
            notifier_concurrency: 4,
            notifier_breaker_failures: 5,
            notifier_breaker_cooldown_ms: 30_000,
            notifier_breaker_cooldown_max_ms: 600_000,
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl NotifierConfig {
    /// The endpoints of [`Self::notifier_endpoints_file`], or none.
    ///
    /// # Errors
    /// An unreadable or invalid file.
    pub fn registry(&self) -> Result<Registry, EndpointError> {
        match &self.notifier_endpoints_file {
            Some(path) => Registry::load(path, &self.notifier_allow_networks),
            None => Ok(Registry::empty()),
        }
    }

    /// The retry backoff these settings describe.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            base: Duration::from_millis(self.notifier_backoff_base_ms),
            max: Duration::from_millis(self.notifier_backoff_max_ms),
        }
    }

    /// The request limits these settings describe.
    pub fn limits(&self) -> RequestLimits {
        RequestLimits {
            connect_timeout: Duration::from_millis(self.notifier_connect_timeout_ms),
            request_timeout: Duration::from_millis(self.notifier_request_timeout_ms),
            max_response_bytes: self.notifier_max_response_bytes,
        }
    }

    /// The endpoint breakers these settings describe.
    pub fn breaker(&self) -> BreakerSettings {
        BreakerSettings {
            failures: self.notifier_breaker_failures,
            cooldown: Duration::from_millis(self.notifier_breaker_cooldown_ms),
            cooldown_max: Duration::from_millis(self.notifier_breaker_cooldown_max_ms),
        }
    }

    /// The longest `Retry-After` honoured.
    pub fn retry_after_max(&self) -> Duration {
        Duration::from_secs(self.notifier_retry_after_max_secs)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() {
        let config = NotifierConfig::default();
        assert_eq!(config.limits(), RequestLimits::default());
        assert_eq!(config.backoff().base, Duration::from_secs(5));
        assert_eq!(config.backoff().max, Duration::from_secs(600));
        assert_eq!(config.retry_after_max(), Duration::from_secs(3600));
        assert_eq!(config.notifier_max_attempts, 8);
        assert_eq!(
            config.breaker(),
            BreakerSettings {
                failures: 5,
                cooldown: Duration::from_secs(30),
                cooldown_max: Duration::from_secs(600),
            }
        );
        assert!(config.registry().unwrap().endpoints().is_empty());
    }

    #[test]
    fn environment_overrides_by_field_name() {
        figment::Jail::expect_with(|jail| {
            // local-dev/env.sh exports DARKROOM_* variables: start clean.
            jail.clear_env();
            jail.create_file(
                "hooks.toml",
                "[[endpoints]]\nid = \"dev\"\nurl = \"http://127.0.0.1:9/\"\n\
                 secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n",
            )?;
            jail.set_env("DARKROOM_NOTIFIER_ENDPOINTS_FILE", "hooks.toml");
            jail.set_env("DARKROOM_NOTIFIER_ALLOW_NETWORKS", "[loopback]");
            jail.set_env("DARKROOM_NOTIFIER_MAX_ATTEMPTS", "3");
            jail.set_env("DARKROOM_NOTIFIER_BACKOFF_BASE_MS", "100");
            let config: NotifierConfig = darkroom_shared::config::load().unwrap();
            assert_eq!(config.notifier_allow_networks, [AllowedNetwork::Loopback]);
            assert_eq!(config.notifier_max_attempts, 3);
            assert_eq!(config.backoff().base, Duration::from_millis(100));
            let registry = config.registry().unwrap();
            let local = "127.0.0.1".parse().unwrap();
            assert!(registry.endpoints()[0].policy.permits(local));
            Ok(())
        });
    }

    #[test]
    fn a_cidr_where_class_names_go_is_one_line_naming_the_variable_and_the_form() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("DARKROOM_NOTIFIER_ALLOW_NETWORKS", "127.0.0.1/32");
            let error = darkroom_shared::config::figment::<NotifierConfig>()
                .extract::<NotifierConfig>()
                .unwrap_err();
            let line = darkroom_shared::config::describe(&error);
            assert!(!line.contains('\n'), "{line}");
            assert!(
                line.starts_with("DARKROOM_NOTIFIER_ALLOW_NETWORKS=127.0.0.1/32: expected a"),
                "{line}"
            );
            assert!(line.contains("[a, b]"), "{line}");

            // In brackets, a CIDR is still no class name: the classes are listed.
            jail.set_env("DARKROOM_NOTIFIER_ALLOW_NETWORKS", "[127.0.0.1/32]");
            let error = darkroom_shared::config::figment::<NotifierConfig>()
                .extract::<NotifierConfig>()
                .unwrap_err();
            let line = darkroom_shared::config::describe(&error);
            assert!(line.contains("expected one of"), "{line}");
            assert!(line.contains("loopback"), "{line}");
            Ok(())
        });
    }
}
