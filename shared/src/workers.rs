//! What each running inference worker can render: its model and the LoRAs, ControlNets and
//! LUTs in its folders, kept in a KV bucket that forgets a worker which stops refreshing.
//!
//! Workers write their inventory at start and every [`REFRESH`]; preprocess reads the live
//! inventories to refuse, at upload time, a job whose preset names a file no running worker
//! has. With no worker running (scaled to zero, or not started yet) nothing can be known, and
//! the job is queued: the worker that picks it up refuses it then.

use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use darkroom_events::subjects::WORKERS_KV;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{Result, RuntimeError};

/// How often a worker rewrites its inventory.
pub const REFRESH: Duration = Duration::from_secs(30);
/// How long an inventory lives without a refresh (the KV bucket's max age).
pub const EXPIRY: Duration = Duration::from_secs(90);

/// One worker's inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInventory {
    /// The worker's name (its KV key, made subject-safe).
    pub worker: String,
    /// The base model's name.
    pub model: String,
    /// LoRA file names.
    #[serde(default)]
    pub loras: Vec<String>,
    /// ControlNet folder names.
    #[serde(default)]
    pub controlnets: Vec<String>,
    /// LUT file names.
    #[serde(default)]
    pub luts: Vec<String>,
    /// The depth estimator's folder name, when the worker draws depth maps (`None`: it does
    /// not; older workers did not say).
    #[serde(default)]
    pub depth_model: Option<String>,
    /// The pose estimator's file name, when the worker draws pose maps (`None`: it does not;
    /// older workers did not say).
    #[serde(default)]
    pub pose_model: Option<String>,
    /// When it was written.
    pub updated_at: DateTime<Utc>,
}

/// The files a job needs, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssetNeeds<'a> {
    /// LoRA file names.
    pub loras: Vec<&'a str>,
    /// ControlNet folder names.
    pub controlnets: Vec<&'a str>,
    /// LUT file names.
    pub luts: Vec<&'a str>,
    /// A depth ControlNet, whose map the worker draws: it needs a depth estimator.
    pub depth_model: bool,
    /// A pose ControlNet, whose map the worker draws: it needs a pose estimator.
    pub pose_model: bool,
}

impl WorkerInventory {
    /// What of `needs` this worker lacks, as `LoRA "x"`-style labels (empty: it has it all).
    pub fn lacks(&self, needs: &AssetNeeds<'_>) -> Vec<String> {
        let mut missing = Vec::new();
        for (kind, wanted, held) in [
            ("LoRA", &needs.loras, &self.loras),
            ("ControlNet", &needs.controlnets, &self.controlnets),
            ("LUT", &needs.luts, &self.luts),
        ] {
            for name in wanted {
                if !held.iter().any(|have| have == name) {
                    missing.push(format!("{kind} {name:?}"));
                }
            }
        }
        if needs.depth_model && self.depth_model.is_none() {
            missing.push("a depth model (DARKROOM_DEPTH_MODEL)".to_owned());
        }
        if needs.pose_model && self.pose_model.is_none() {
            missing.push("a pose model (DARKROOM_POSE_MODEL)".to_owned());
        }
        missing
    }
}

/// Why no running worker can serve `needs`, or `None` when one can or when no worker is
/// running (nothing can be known then).
pub fn unservable(inventories: &[WorkerInventory], needs: &AssetNeeds<'_>) -> Option<String> {
    if inventories.is_empty() {
        return None;
    }
    let mut lacks = Vec::with_capacity(inventories.len());
    for inventory in inventories {
        let missing = inventory.lacks(needs);
        if missing.is_empty() {
            return None;
        }
        lacks.push(format!("{} lacks {}", inventory.worker, missing.join(", ")));
    }
    Some(format!(
        "no running worker has what it needs ({})",
        lacks.join("; ")
    ))
}

/// The workers KV bucket.
#[derive(Clone)]
pub struct WorkerRegistry {
    kv: kv::Store,
}

impl WorkerRegistry {
    /// Opens the bucket (it must exist: see [`crate::topology::Topology::ensure`]).
    pub async fn open(js: &async_nats::jetstream::Context) -> Result<Self> {
        let kv = js
            .get_key_value(WORKERS_KV)
            .await
            .map_err(|e| RuntimeError::jetstream("open workers KV", e))?;
        Ok(WorkerRegistry { kv })
    }

    /// Writes (or refreshes) a worker's inventory.
    pub async fn put(&self, inventory: &WorkerInventory) -> Result<()> {
        let key = key_of(&inventory.worker);
        let value = serde_json::to_vec(inventory)
            .map_err(|e| RuntimeError::jetstream(format!("encode inventory {key}"), e))?;
        self.kv
            .put(&key, value.into())
            .await
            .map_err(|e| RuntimeError::jetstream(format!("write inventory {key}"), e))?;
        Ok(())
    }

    /// Removes a worker's inventory (on a clean stop).
    pub async fn remove(&self, worker: &str) -> Result<()> {
        let key = key_of(worker);
        self.kv
            .delete(&key)
            .await
            .map_err(|e| RuntimeError::jetstream(format!("remove inventory {key}"), e))
    }

    /// The inventories of workers that refreshed within [`EXPIRY`]; unreadable entries are
    /// skipped.
    pub async fn live(&self) -> Result<Vec<WorkerInventory>> {
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| RuntimeError::jetstream("list workers", e))?;
        let mut inventories = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| RuntimeError::jetstream("list workers", e))?;
            let Some(value) = self
                .kv
                .get(&key)
                .await
                .map_err(|e| RuntimeError::jetstream(format!("read inventory {key}"), e))?
            else {
                continue;
            };
            match serde_json::from_slice::<WorkerInventory>(&value) {
                Ok(inventory) => inventories.push(inventory),
                Err(error) => tracing::warn!(%key, %error, "unreadable worker inventory"),
            }
        }
        Ok(inventories)
    }
}

/// A KV key for a worker name: letters, digits, `-` and `_` kept, anything else `_`.
fn key_of(worker: &str) -> String {
    let key: String = worker
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if key.is_empty() { "_".to_owned() } else { key }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn inventory(worker: &str, loras: &[&str], controlnets: &[&str]) -> WorkerInventory {
        WorkerInventory {
            worker: worker.to_owned(),
            model: "sdxl".to_owned(),
            loras: loras.iter().map(|s| (*s).to_owned()).collect(),
            controlnets: controlnets.iter().map(|s| (*s).to_owned()).collect(),
            luts: Vec::new(),
            depth_model: None,
            pose_model: None,
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn one_worker_with_everything_is_enough() {
        let needs = AssetNeeds {
            loras: vec!["style.safetensors"],
            controlnets: vec!["canny"],
            ..AssetNeeds::default()
        };
        let a = inventory("a", &["style.safetensors"], &[]);
        let b = inventory("b", &["style.safetensors"], &["canny"]);
        assert_eq!(unservable(&[a.clone(), b], &needs), None);
        let reason = unservable(&[a], &needs).unwrap();
        assert!(reason.contains("a lacks ControlNet \"canny\""), "{reason}");
        // Nobody running: nothing can be known.
        assert_eq!(unservable(&[], &needs), None);
        assert_eq!(
            unservable(&[inventory("c", &[], &[])], &AssetNeeds::default()),
            None
        );
    }

    #[test]
    fn a_depth_controlnet_needs_a_worker_with_a_depth_model() {
        let needs = AssetNeeds {
            controlnets: vec!["depth"],
            depth_model: true,
            ..AssetNeeds::default()
        };
        let without = inventory("a", &[], &["depth"]);
        let reason = unservable(std::slice::from_ref(&without), &needs).unwrap();
        assert!(reason.contains("a lacks a depth model"), "{reason}");
        let with = WorkerInventory {
            depth_model: Some("depth-anything-v2-small".to_owned()),
            ..inventory("b", &[], &["depth"])
        };
        assert_eq!(unservable(&[without, with], &needs), None);
        // An inventory written before the field existed reads as no depth model.
        let old = r#"{"worker":"c","model":"m","updated_at":"2026-11-23T00:00:00Z"}"#;
        let parsed: WorkerInventory = serde_json::from_str(old).unwrap();
        assert_eq!(parsed.depth_model, None);
        assert_eq!(parsed.pose_model, None);
    }

    #[test]
    fn a_pose_controlnet_needs_a_worker_with_a_pose_model() {
        let needs = AssetNeeds {
            controlnets: vec!["openpose"],
            pose_model: true,
            ..AssetNeeds::default()
        };
        let with_depth_only = WorkerInventory {
            depth_model: Some("depth".to_owned()),
            ..inventory("a", &[], &["openpose"])
        };
        let reason = unservable(std::slice::from_ref(&with_depth_only), &needs).unwrap();
        assert!(
            reason.contains("a lacks a pose model (DARKROOM_POSE_MODEL)"),
            "{reason}"
        );
        let with = WorkerInventory {
            pose_model: Some("body_pose_model.safetensors".to_owned()),
            ..inventory("b", &[], &["openpose"])
        };
        assert_eq!(unservable(&[with_depth_only, with], &needs), None);
    }

    #[test]
    fn worker_names_become_kv_keys() {
        assert_eq!(key_of("gpu-0"), "gpu-0");
        assert_eq!(key_of("node.example.com:1"), "node_example_com_1");
        assert_eq!(key_of(""), "_");
    }
}
