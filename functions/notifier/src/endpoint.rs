//! The registered webhook endpoints, read from the operator's TOML file.
//!
//! Endpoints are configuration, never data: no URL ever comes from an upload or an event. The
//! file holds an `[[endpoints]]` table per receiver:
//!
//! ```toml
//! [[endpoints]]
//! id = "studio-app"                                 # [A-Za-z0-9_-], unique; part of webhook-id
//! url = "https://hooks.example.com/darkroom"        # http or https
//! secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]  # one or more: every request is signed with each
//! kinds = ["completed", "failed"]                   # default: completed and failed
//! bucket = "photos"                                 # only uploads to this bucket (default: any)
//! prefix = "inbox/profile-"                         # only keys starting with this (default: any)
//! enabled = true                                    # default true
//! allow_networks = []                               # loopback, private, link_local, metadata
//! ```
//!
//! An endpoint with a `bucket` or `prefix` filter hears only events whose upload is known (from
//! the event, or the job's record for `started` and `progress`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use darkroom_events::{LifecycleKind, ObjectRef};
use reqwest::Url;
use serde::{Deserialize, Serialize};

use crate::network::{AllowedNetwork, NetworkPolicy};
use crate::signature::{SecretError, WebhookSecret};

/// Longest endpoint id.
pub const MAX_ID_LEN: usize = 64;

/// One `[[endpoints]]` table as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Stable id: `[A-Za-z0-9_-]`, at most 64 characters. Part of every `webhook-id`, so
    /// renaming an endpoint makes already-delivered events look new to it.
    pub id: String,
    /// Where to POST: `http` or `https`.
    pub url: String,
    /// `whsec_` secrets; each request carries one signature per secret.
    pub secrets: Vec<String>,
    /// Event kinds wanted (default `completed` and `failed`).
    #[serde(default = "default_kinds")]
    pub kinds: Vec<LifecycleKind>,
    /// Only events about uploads to this bucket.
    #[serde(default)]
    pub bucket: Option<String>,
    /// Only events about keys starting with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// `false` keeps the endpoint in the file but sends it nothing (default `true`).
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Restricted networks this endpoint may reach, on top of the global allowance.
    #[serde(default)]
    pub allow_networks: Vec<AllowedNetwork>,
}

fn default_kinds() -> Vec<LifecycleKind> {
    vec![LifecycleKind::Completed, LifecycleKind::Failed]
}

fn enabled_by_default() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    #[serde(default)]
    endpoints: Vec<EndpointSpec>,
}

/// Why the endpoint file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The file could not be read.
    #[error("cannot read webhook endpoints from {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid TOML of the expected shape.
    #[error("webhook endpoints: {0}")]
    Toml(#[from] toml::de::Error),
    /// An id that is empty, too long or has other characters.
    #[error("webhook endpoint id {id:?} must be 1–{MAX_ID_LEN} characters of [A-Za-z0-9_-]")]
    InvalidId {
        /// The id.
        id: String,
    },
    /// Two endpoints share an id.
    #[error("webhook endpoint id {id:?} is used twice")]
    DuplicateId {
        /// The id.
        id: String,
    },
    /// The URL does not parse, or is not http(s) with a host.
    #[error("webhook endpoint {id:?}: URL {url:?}: {message}")]
    InvalidUrl {
        /// The endpoint.
        id: String,
        /// The URL.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// No secret given.
    #[error("webhook endpoint {id:?} has no secret")]
    NoSecret {
        /// The endpoint.
        id: String,
    },
    /// A secret is not a valid `whsec_` secret.
    #[error("webhook endpoint {id:?}, secret {index}: {source}")]
    BadSecret {
        /// The endpoint.
        id: String,
        /// Which secret (from 0).
        index: usize,
        /// What is wrong with it.
        source: SecretError,
    },
    /// No event kinds.
    #[error("webhook endpoint {id:?} wants no event kinds")]
    NoKinds {
        /// The endpoint.
        id: String,
    },
}

/// A validated endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Its id.
    pub id: String,
    /// Its URL.
    pub url: Url,
    /// Its secrets, in the order configured.
    pub secrets: Vec<WebhookSecret>,
    /// Kinds it wants.
    pub kinds: HashSet<LifecycleKind>,
    /// Bucket filter.
    pub bucket: Option<String>,
    /// Key prefix filter.
    pub prefix: Option<String>,
    /// Where it may connect.
    pub policy: NetworkPolicy,
}

impl Endpoint {
    /// Validates a spec; `global` is the allowance every endpoint gets.
    ///
    /// # Errors
    /// See [`EndpointError`].
    pub fn from_spec(
        spec: &EndpointSpec,
        global: &[AllowedNetwork],
    ) -> Result<Self, EndpointError> {
        let id = spec.id.clone();
        let valid_id = !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid_id {
            return Err(EndpointError::InvalidId { id });
        }
        let invalid_url = |message: String| EndpointError::InvalidUrl {
            id: id.clone(),
            url: spec.url.clone(),
            message,
        };
        let url = Url::parse(&spec.url).map_err(|e| invalid_url(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid_url(format!(
                "scheme {:?} is not http or https",
                url.scheme()
            )));
        }
        if url.host().is_none() {
            return Err(invalid_url("no host".to_owned()));
        }
        if spec.secrets.is_empty() {
            return Err(EndpointError::NoSecret { id });
        }
        let secrets = spec
            .secrets
            .iter()
            .enumerate()
            .map(|(index, text)| {
                WebhookSecret::parse(text).map_err(|source| EndpointError::BadSecret {
                    id: id.clone(),
                    index,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if spec.kinds.is_empty() {
            return Err(EndpointError::NoKinds { id });
        }
        let policy =
            NetworkPolicy::allowing(global.iter().chain(spec.allow_networks.iter()).copied());
        Ok(Endpoint {
            id,
            url,
            secrets,
            kinds: spec.kinds.iter().copied().collect(),
            bucket: spec.bucket.clone(),
            prefix: spec.prefix.clone(),
            policy,
        })
    }

    /// Whether the endpoint wants an event of `kind` about `source` (unknown: `None`).
    pub fn wants(&self, kind: LifecycleKind, source: Option<&ObjectRef>) -> bool {
        if !self.kinds.contains(&kind) {
            return false;
        }
        if self.bucket.is_none() && self.prefix.is_none() {
            return true;
        }
        let Some(source) = source else {
            return false;
        };
        self.bucket.as_ref().is_none_or(|b| *b == source.bucket)
            && self
                .prefix
                .as_ref()
                .is_none_or(|p| source.key.starts_with(p.as_str()))
    }
}

/// Every enabled endpoint.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    endpoints: Vec<Arc<Endpoint>>,
}

impl Registry {
    /// No endpoints: fan-out to subjects only.
    pub fn empty() -> Self {
        Registry::default()
    }

    /// Reads the endpoint file at `path`.
    ///
    /// # Errors
    /// An unreadable file, or any invalid endpoint (the whole file is refused).
    pub fn load(path: &Path, global: &[AllowedNetwork]) -> Result<Self, EndpointError> {
        let text = std::fs::read_to_string(path).map_err(|source| EndpointError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, global)
    }

    /// Parses an endpoint file's text.
    ///
    /// # Errors
    /// See [`Self::load`].
    pub fn from_toml(text: &str, global: &[AllowedNetwork]) -> Result<Self, EndpointError> {
        let file: EndpointFile = toml::from_str(text)?;
        Self::from_specs(&file.endpoints, global)
    }

    /// Validates specs; disabled ones are left out.
    ///
    /// # Errors
    /// See [`Self::load`].
    pub fn from_specs(
        specs: &[EndpointSpec],
        global: &[AllowedNetwork],
    ) -> Result<Self, EndpointError> {
        let mut seen = HashSet::new();
        let mut endpoints = Vec::new();
        for spec in specs {
            let endpoint = Endpoint::from_spec(spec, global)?;
            if !seen.insert(endpoint.id.clone()) {
                return Err(EndpointError::DuplicateId { id: endpoint.id });
            }
            if spec.enabled {
                endpoints.push(Arc::new(endpoint));
            }
        }
        Ok(Registry { endpoints })
    }

    /// The enabled endpoints.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The enabled endpoints that want an event of `kind` about `source`.
    pub fn matching(&self, kind: LifecycleKind, source: Option<&ObjectRef>) -> Vec<Arc<Endpoint>> {
        self.endpoints
            .iter()
            .filter(|endpoint| endpoint.wants(kind, source))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn registry(text: &str) -> Result<Registry, EndpointError> {
        Registry::from_toml(text, &[])
    }

    #[test]
    fn a_full_file_parses_with_its_defaults() {
        let registry = registry(&format!(
            r#"
            [[endpoints]]
            id = "studio-app"
            url = "https://hooks.example.com/darkroom"
            secrets = ["{SECRET}", "{SECRET}"]

            [[endpoints]]
            id = "warm-only"
            url = "http://10.0.0.7:8080/hook"
            secrets = ["{SECRET}"]
            kinds = ["queued", "progress", "completed"]
            bucket = "photos"
            prefix = "inbox/profile-warm/"
            allow_networks = ["private"]

            [[endpoints]]
            id = "paused"
            url = "https://paused.example.com/"
            secrets = ["{SECRET}"]
            enabled = false
            "#
        ))
        .unwrap();
        let ids: Vec<&str> = registry.endpoints().iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["studio-app", "warm-only"]);
        let studio = &registry.endpoints()[0];
        assert_eq!(studio.secrets.len(), 2);
        assert_eq!(
            studio.kinds,
            HashSet::from([LifecycleKind::Completed, LifecycleKind::Failed])
        );
        let warm = &registry.endpoints()[1];
        assert!(warm.policy.permits("10.0.0.7".parse().unwrap()));
        assert!(!studio.policy.permits("10.0.0.7".parse().unwrap()));
    }

    #[test]
    fn filters_select_by_kind_bucket_and_prefix() {
        let registry = registry(&format!(
            r#"
            [[endpoints]]
            id = "all"
            url = "https://a.example.com/"
            secrets = ["{SECRET}"]
            kinds = ["completed", "started"]

            [[endpoints]]
            id = "warm"
            url = "https://b.example.com/"
            secrets = ["{SECRET}"]
            kinds = ["completed", "started"]
            bucket = "photos"
            prefix = "inbox/profile-warm/"
            "#
        ))
        .unwrap();
        let ids = |kind, source: Option<&ObjectRef>| -> Vec<String> {
            registry
                .matching(kind, source)
                .iter()
                .map(|e| e.id.clone())
                .collect()
        };
        let warm = ObjectRef::new("photos", "inbox/profile-warm/me.jpg");
        let cool = ObjectRef::new("photos", "inbox/profile-cool/me.jpg");
        let elsewhere = ObjectRef::new("other", "inbox/profile-warm/me.jpg");
        assert_eq!(ids(LifecycleKind::Completed, Some(&warm)), ["all", "warm"]);
        assert_eq!(ids(LifecycleKind::Completed, Some(&cool)), ["all"]);
        assert_eq!(ids(LifecycleKind::Completed, Some(&elsewhere)), ["all"]);
        assert_eq!(
            ids(LifecycleKind::Failed, Some(&warm)),
            Vec::<String>::new()
        );
        // Unknown upload: filtered endpoints cannot tell, so they are not sent it.
        assert_eq!(ids(LifecycleKind::Started, None), ["all"]);
    }

    #[test]
    fn bad_endpoints_refuse_the_whole_file() {
        let one = |fields: &str| registry(&format!("[[endpoints]]\n{fields}"));
        let ok_secret = format!("secrets = [\"{SECRET}\"]");
        assert!(matches!(
            one(&format!(
                "id = \"a.b\"\nurl = \"https://x.example/\"\n{ok_secret}"
            )),
            Err(EndpointError::InvalidId { .. })
        ));
        assert!(matches!(
            one(&format!(
                "id = \"\"\nurl = \"https://x.example/\"\n{ok_secret}"
            )),
            Err(EndpointError::InvalidId { .. })
        ));
        assert!(matches!(
            one(&format!(
                "id = \"a\"\nurl = \"ftp://x.example/\"\n{ok_secret}"
            )),
            Err(EndpointError::InvalidUrl { .. })
        ));
        assert!(matches!(
            one(&format!("id = \"a\"\nurl = \"not a url\"\n{ok_secret}")),
            Err(EndpointError::InvalidUrl { .. })
        ));
        assert!(matches!(
            one("id = \"a\"\nurl = \"https://x.example/\"\nsecrets = []"),
            Err(EndpointError::NoSecret { .. })
        ));
        assert!(matches!(
            one("id = \"a\"\nurl = \"https://x.example/\"\nsecrets = [\"hunter2\"]"),
            Err(EndpointError::BadSecret { index: 0, .. })
        ));
        assert!(matches!(
            one(&format!(
                "id = \"a\"\nurl = \"https://x.example/\"\n{ok_secret}\nkinds = []"
            )),
            Err(EndpointError::NoKinds { .. })
        ));
        assert!(matches!(
            one(&format!(
                "id = \"a\"\nurl = \"https://x.example/\"\n{ok_secret}\nkinds = [\"done\"]"
            )),
            Err(EndpointError::Toml(_))
        ));
        assert!(matches!(
            one(&format!(
                "id = \"a\"\nurl = \"https://x.example/\"\n{ok_secret}\nallow_networks = [\"everything\"]"
            )),
            Err(EndpointError::Toml(_))
        ));
        assert!(matches!(
            one(&format!(
                "id = \"a\"\nurl = \"https://x.example/\"\n{ok_secret}\nsecret = \"typo\""
            )),
            Err(EndpointError::Toml(_))
        ));
        let twice = format!(
            "[[endpoints]]\nid = \"a\"\nurl = \"https://x.example/\"\n{ok_secret}\n\
             [[endpoints]]\nid = \"a\"\nurl = \"https://y.example/\"\n{ok_secret}\n"
        );
        assert!(matches!(
            registry(&twice),
            Err(EndpointError::DuplicateId { .. })
        ));
        assert_eq!(registry("").unwrap().endpoints().len(), 0);
    }

    #[test]
    fn the_global_allowance_adds_to_every_endpoint() {
        let text = format!(
            "[[endpoints]]\nid = \"local\"\nurl = \"http://127.0.0.1:9000/\"\nsecrets = [\"{SECRET}\"]\n"
        );
        let strict = Registry::from_toml(&text, &[]).unwrap();
        let dev = Registry::from_toml(&text, &[AllowedNetwork::Loopback]).unwrap();
        let local = "127.0.0.1".parse().unwrap();
        assert!(!strict.endpoints()[0].policy.permits(local));
        assert!(dev.endpoints()[0].policy.permits(local));
    }
}
