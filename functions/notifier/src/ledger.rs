//! What the notifier has done, in two KV buckets, so that a redelivered or re-sent event is
//! neither announced nor delivered twice, and a `410 Gone` outlives the process.
//!
//! `darkroom_notifier_deliveries` (entries expire with the events, 7 days):
//!
//! - `fanout.<id>`: the event's fan-out messages were published;
//! - `webhook.<webhook-id>`: one delivery of one event to one endpoint, a JSON
//!   [`DeliveryRecord`]: `sending` (claimed until `lease_until`), `failed`, `delivered` or
//!   `gone`.
//!
//! A delivery is *claimed* before its request goes out, by compare-and-set on the entry's
//! revision, so two workers holding copies of the same event never send it at the same time;
//! a claim left by a crashed worker lapses after its lease.
//!
//! `darkroom_webhook_endpoints` (kept until deleted): `<endpoint id>` → [`DisabledEndpoint`],
//! written on a `410 Gone`. It applies while the endpoint's configured URL is the one that
//! answered 410; an operator re-enables an endpoint by deleting the key
//! (`nats kv del darkroom_webhook_endpoints <id>`) or by configuring a new URL.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use darkroom_events::subjects::{NOTIFIER_DELIVERIES_KV, WEBHOOK_ENDPOINTS_KV};
use darkroom_shared::RuntimeError;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::endpoint::Endpoint;

/// Namespace of the UUIDs in `webhook-id`s and ledger keys. Changing it would make every
/// delivered event look new.
const NOTIFIER_NAMESPACE: Uuid = Uuid::from_u128(0x9d4c6a2e_51b7_4f0e_a3c8_7e2f1b9d0c45);

/// The `webhook-id` of an event's delivery to an endpoint: `msg_` and 32 hex digits of a
/// UUID v5 over the CloudEvent id and the endpoint id. The same on every retry, and again if
/// the same event is sent again.
pub fn webhook_id(event_id: &str, endpoint_id: &str) -> String {
    let name = serde_json::json!([event_id, endpoint_id]).to_string();
    format!(
        "msg_{}",
        Uuid::new_v5(&NOTIFIER_NAMESPACE, name.as_bytes()).simple()
    )
}

fn fanout_key(event_id: &str) -> String {
    format!(
        "fanout.{}",
        Uuid::new_v5(&NOTIFIER_NAMESPACE, event_id.as_bytes()).simple()
    )
}

fn webhook_key(webhook_id: &str) -> String {
    format!("webhook.{webhook_id}")
}

/// Where one delivery stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DeliveryState {
    /// A worker is sending it; others keep off until the lease lapses.
    Sending {
        /// End of the claim.
        lease_until: DateTime<Utc>,
    },
    /// The last attempt failed; the next one may claim it.
    Failed {
        /// Attempts made so far (the event's delivery count).
        attempts: u32,
        /// What went wrong last.
        last_error: String,
    },
    /// The receiver answered 2xx.
    Delivered {
        /// Its status code.
        status: u16,
    },
    /// The receiver answered 410; the endpoint is disabled.
    Gone,
}

/// The ledger entry of one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// The endpoint.
    pub endpoint: String,
    /// Where it stands.
    #[serde(flatten)]
    pub state: DeliveryState,
    /// When it was written.
    pub updated_at: DateTime<Utc>,
}

/// An endpoint disabled by `410 Gone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisabledEndpoint {
    /// The URL that answered 410.
    pub url: String,
    /// When.
    pub disabled_at: DateTime<Utc>,
    /// The `webhook-id` of the request it answered.
    pub webhook_id: String,
}

/// The outcome of claiming a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Ours to send.
    Granted,
    /// Already delivered, or the endpoint is gone: nothing to do.
    Settled(DeliveryState),
    /// Another worker holds it until then.
    Busy(DateTime<Utc>),
}

/// The two KV buckets.
#[derive(Clone)]
pub struct Ledger {
    deliveries: kv::Store,
    endpoints: kv::Store,
}

impl Ledger {
    /// Opens the buckets (they must exist: see `Topology::ensure`).
    ///
    /// # Errors
    /// A bucket is missing or NATS is unreachable.
    pub async fn open(js: &jetstream::Context) -> Result<Self, RuntimeError> {
        let open = |name: &'static str| async move {
            js.get_key_value(name)
                .await
                .map_err(|e| RuntimeError::jetstream(format!("open KV {name}"), e))
        };
        Ok(Ledger {
            deliveries: open(NOTIFIER_DELIVERIES_KV).await?,
            endpoints: open(WEBHOOK_ENDPOINTS_KV).await?,
        })
    }

    /// Whether the event's fan-out was already published.
    ///
    /// # Errors
    /// NATS trouble.
    pub async fn fanned_out(&self, event_id: &str) -> Result<bool, RuntimeError> {
        let key = fanout_key(event_id);
        let entry = self
            .deliveries
            .entry(key.clone())
            .await
            .map_err(|e| RuntimeError::jetstream(format!("read {key}"), e))?;
        Ok(entry.is_some_and(|e| e.operation == kv::Operation::Put))
    }

    /// Records that the event's fan-out was published.
    ///
    /// # Errors
    /// NATS trouble.
    pub async fn mark_fanned_out(&self, event_id: &str) -> Result<(), RuntimeError> {
        let key = fanout_key(event_id);
        self.deliveries
            .put(&key, Bytes::from_static(b"{\"state\":\"published\"}"))
            .await
            .map_err(|e| RuntimeError::jetstream(format!("write {key}"), e))?;
        Ok(())
    }

    /// The delivery's record, if any.
    ///
    /// # Errors
    /// NATS trouble.
    pub async fn delivery(&self, webhook_id: &str) -> Result<Option<DeliveryRecord>, RuntimeError> {
        Ok(self.entry(webhook_id).await?.map(|(record, _)| record))
    }

    async fn entry(&self, webhook_id: &str) -> Result<Option<(DeliveryRecord, u64)>, RuntimeError> {
        darkroom_shared::kv::read_json(&self.deliveries, &webhook_key(webhook_id)).await
    }

    /// Claims a delivery for `lease`: granted when it is new, failed before, or its last
    /// claim lapsed.
    ///
    /// # Errors
    /// NATS trouble.
    pub async fn claim(
        &self,
        webhook_id: &str,
        endpoint: &str,
        lease: Duration,
    ) -> Result<Claim, RuntimeError> {
        let key = webhook_key(webhook_id);
        let now = Utc::now();
        let sending = encode(&DeliveryRecord {
            endpoint: endpoint.to_owned(),
            state: DeliveryState::Sending {
                lease_until: now
                    + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX),
            },
            updated_at: now,
        });
        // Compare-and-set; a lost race is re-read once more before giving way.
        for _ in 0..3 {
            match self.entry(webhook_id).await? {
                None => match self.deliveries.create(&key, sending.clone()).await {
                    Ok(_) => return Ok(Claim::Granted),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(RuntimeError::jetstream(format!("claim {key}"), e)),
                },
                Some((record, revision)) => {
                    match record.state {
                        DeliveryState::Delivered { .. } | DeliveryState::Gone => {
                            return Ok(Claim::Settled(record.state));
                        }
                        DeliveryState::Sending { lease_until } if lease_until > now => {
                            return Ok(Claim::Busy(lease_until));
                        }
                        DeliveryState::Sending { .. } | DeliveryState::Failed { .. } => {}
                    }
                    match self
                        .deliveries
                        .update(&key, sending.clone(), revision)
                        .await
                    {
                        Ok(_) => return Ok(Claim::Granted),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                        Err(e) => return Err(RuntimeError::jetstream(format!("claim {key}"), e)),
                    }
                }
            }
        }
        Ok(Claim::Busy(now + chrono::Duration::seconds(1)))
    }

    /// Records where a delivery stands after an attempt.
    ///
    /// # Errors
    /// NATS trouble.
    pub async fn record(
        &self,
        webhook_id: &str,
        endpoint: &str,
        state: DeliveryState,
    ) -> Result<(), RuntimeError> {
        let key = webhook_key(webhook_id);
        let record = DeliveryRecord {
            endpoint: endpoint.to_owned(),
            state,
            updated_at: Utc::now(),
        };
        self.deliveries
            .put(&key, encode(&record))
            .await
            .map_err(|e| RuntimeError::jetstream(format!("write {key}"), e))?;
        Ok(())
    }

    /// The endpoint's 410 record, when it applies to its configured URL.
    ///
    /// # Errors
    /// NATS trouble, or a corrupt record.
    pub async fn disabled(
        &self,
        endpoint: &Endpoint,
    ) -> Result<Option<DisabledEndpoint>, RuntimeError> {
        let record: Option<(DisabledEndpoint, u64)> =
            darkroom_shared::kv::read_json(&self.endpoints, &endpoint.id).await?;
        Ok(record
            .map(|(record, _)| record)
            .filter(|record| record.url == endpoint.url.as_str()))
    }

    /// Disables the endpoint (its URL answered 410).
    ///
    /// # Errors
    /// NATS trouble.
    pub async fn disable(&self, endpoint: &Endpoint, webhook_id: &str) -> Result<(), RuntimeError> {
        let record = DisabledEndpoint {
            url: endpoint.url.to_string(),
            disabled_at: Utc::now(),
            webhook_id: webhook_id.to_owned(),
        };
        let value = serde_json::to_vec(&record).map_err(|source| RuntimeError::CorruptRecord {
            key: endpoint.id.clone(),
            source,
        })?;
        self.endpoints
            .put(&endpoint.id, value.into())
            .await
            .map_err(|e| RuntimeError::jetstream(format!("disable endpoint {}", endpoint.id), e))?;
        Ok(())
    }
}

fn encode(record: &DeliveryRecord) -> Bytes {
    // Strings, numbers and timestamps only: serialising cannot fail.
    serde_json::to_vec(record)
        .unwrap_or_else(|_| unreachable!("delivery records always serialise"))
        .into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn webhook_ids_are_stable_and_distinct_per_endpoint() {
        let a = webhook_id("0ec57537-bd70-58a8-a1bd-91b1fc1ee2a8", "studio-app");
        assert_eq!(
            a,
            webhook_id("0ec57537-bd70-58a8-a1bd-91b1fc1ee2a8", "studio-app")
        );
        assert_ne!(
            a,
            webhook_id("0ec57537-bd70-58a8-a1bd-91b1fc1ee2a8", "other")
        );
        assert_ne!(a, webhook_id("another-event", "studio-app"));
        assert!(a.starts_with("msg_"));
        assert_eq!(a.len(), 4 + 32);
        // The parts stay apart: ("a.b", "c") is not ("a", "b.c").
        assert_ne!(webhook_id("a.b", "c"), webhook_id("a", "b.c"));
    }

    #[test]
    fn ledger_keys_are_valid_kv_keys() {
        let valid = |key: &str| {
            key.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
        };
        assert!(valid(&fanout_key("any id: with spaces/and ✓")));
        assert!(valid(&webhook_key(&webhook_id("any id", "studio-app"))));
    }

    #[test]
    fn records_read_back_as_written() {
        let record = DeliveryRecord {
            endpoint: "studio-app".to_owned(),
            state: DeliveryState::Failed {
                attempts: 2,
                last_error: "HTTP 500".to_owned(),
            },
            updated_at: Utc::now(),
        };
        let json: serde_json::Value = serde_json::from_slice(&encode(&record)).unwrap();
        assert_eq!(json["state"], "failed");
        assert_eq!(json["attempts"], 2);
        let back: DeliveryRecord = serde_json::from_slice(&encode(&record)).unwrap();
        assert_eq!(back, record);
    }
}
