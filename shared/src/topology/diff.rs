//! Field-by-field comparison of what the topology wants with what a server has.
//!
//! [`Topology::ensure`](super::Topology::ensure) (run by every function at start) and
//! `darkroom-infra plan|apply` both decide with these functions, so they want the same things
//! and refuse the same things: a change that would lose data (fewer replicas, a shorter max age
//! than the oldest message, removed subjects, another retention or storage type, …) is marked
//! with why, and only an operator's `darkroom-infra apply --force` makes it.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{consumer, kv, stream};

/// One field whose wanted value differs from the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldChange {
    /// The field's name in the NATS configuration (`max_age`, `num_replicas`, …).
    pub field: &'static str,
    /// The server's value, for people.
    pub from: String,
    /// The wanted value, for people.
    pub to: String,
    /// Why applying the change would lose data; `None` when it is safe.
    pub data_loss: Option<String>,
    /// The server cannot change this field in place: the resource must be deleted and created
    /// again (always with [`Self::data_loss`] set).
    pub recreate: bool,
}

impl FieldChange {
    fn safe(field: &'static str, from: impl Into<String>, to: impl Into<String>) -> Self {
        FieldChange {
            field,
            from: from.into(),
            to: to.into(),
            data_loss: None,
            recreate: false,
        }
    }

    fn losing(mut self, why: Option<String>) -> Self {
        self.data_loss = why;
        self
    }

    fn recreating(mut self, why: String) -> Self {
        self.data_loss = Some(why);
        self.recreate = true;
        self
    }
}

impl fmt::Display for FieldChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} from {} to {}", self.field, self.from, self.to)
    }
}

/// Whether any change would lose data.
pub fn loses_data(changes: &[FieldChange]) -> bool {
    changes.iter().any(|change| change.data_loss.is_some())
}

/// Whether any change needs the resource deleted and created again.
pub fn needs_recreate(changes: &[FieldChange]) -> bool {
    changes.iter().any(|change| change.recreate)
}

/// The stream the server keeps a KV bucket in (`KV_<bucket>`), configured the way
/// `async-nats` creates it, so a bucket is compared like any stream.
pub fn kv_stream_config(wanted: &kv::Config) -> stream::Config {
    stream::Config {
        name: format!("KV_{}", wanted.bucket),
        description: Some(wanted.description.clone()),
        subjects: vec![format!("$KV.{}.>", wanted.bucket)],
        max_messages_per_subject: wanted.history.max(1),
        max_bytes: wanted.max_bytes,
        max_age: wanted.max_age,
        max_message_size: wanted.max_value_size,
        storage: wanted.storage,
        republish: wanted.republish.clone(),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: wanted.num_replicas.max(1),
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// The fields of `current` (a stream's config and state on the server) that differ from
/// `wanted`, each marked with the data it would lose. Fields `wanted` leaves at the server's
/// default (a zero duplicate window, no description) are not compared.
pub fn stream_changes(wanted: &stream::Config, current: &stream::Info) -> Vec<FieldChange> {
    let have = &current.config;
    let state = &current.state;
    let mut changes = Vec::new();

    if let Some(description) = &wanted.description
        && have.description.as_ref() != Some(description)
    {
        changes.push(FieldChange::safe(
            "description",
            quoted(have.description.as_deref().unwrap_or("")),
            quoted(description),
        ));
    }

    let wanted_subjects: BTreeSet<&str> = wanted.subjects.iter().map(String::as_str).collect();
    let have_subjects: BTreeSet<&str> = have.subjects.iter().map(String::as_str).collect();
    if wanted_subjects != have_subjects {
        let removed: Vec<&str> = have_subjects
            .difference(&wanted_subjects)
            .copied()
            .collect();
        let why = (!removed.is_empty()).then(|| {
            format!(
                "removes subject(s) {}: messages published there would no longer be stored",
                removed.join(", ")
            )
        });
        changes.push(
            FieldChange::safe("subjects", list(&have.subjects), list(&wanted.subjects)).losing(why),
        );
    }

    if wanted.retention != have.retention {
        changes.push(
            FieldChange::safe(
                "retention",
                format!("{:?}", have.retention),
                format!("{:?}", wanted.retention),
            )
            .recreating(format!(
                "the retention policy cannot be changed in place: the stream would be deleted \
                 and created again, losing its {} message(s) and its consumers",
                state.messages
            )),
        );
    }

    if wanted.storage != have.storage {
        changes.push(
            FieldChange::safe(
                "storage",
                format!("{:?}", have.storage),
                format!("{:?}", wanted.storage),
            )
            .recreating(format!(
                "the storage type cannot be changed in place: the stream would be deleted and \
                 created again, losing its {} message(s) and its consumers",
                state.messages
            )),
        );
    }

    let (wanted_replicas, have_replicas) = (wanted.num_replicas.max(1), have.num_replicas.max(1));
    if wanted_replicas != have_replicas {
        let why = (wanted_replicas < have_replicas).then(|| {
            format!(
                "lowers replicas from {have_replicas} to {wanted_replicas}: the copies on the \
                 dropped servers are removed, and losing a server may then lose messages"
            )
        });
        changes.push(
            FieldChange::safe(
                "num_replicas",
                have_replicas.to_string(),
                wanted_replicas.to_string(),
            )
            .losing(why),
        );
    }

    if wanted.max_age != have.max_age {
        let lowered =
            !wanted.max_age.is_zero() && (have.max_age.is_zero() || wanted.max_age < have.max_age);
        let why = match oldest_message_age(state) {
            Some(oldest) if lowered && oldest > wanted.max_age => Some(format!(
                "lowers max_age to {} while the oldest message is {} old: older messages \
                 would be deleted",
                age(wanted.max_age),
                age(oldest)
            )),
            _ => None,
        };
        changes
            .push(FieldChange::safe("max_age", age(have.max_age), age(wanted.max_age)).losing(why));
    }

    limit_change(
        &mut changes,
        "max_msgs",
        wanted.max_messages,
        have.max_messages,
        |wanted| {
            (state.messages > wanted).then(|| {
                format!(
                    "lowers max_msgs to {wanted} while the stream holds {} messages: the \
                     oldest would be deleted",
                    state.messages
                )
            })
        },
    );
    limit_change(
        &mut changes,
        "max_bytes",
        wanted.max_bytes,
        have.max_bytes,
        |wanted| {
            (state.bytes > wanted).then(|| {
                format!(
                    "lowers max_bytes to {wanted} while the stream holds {} bytes: the oldest \
                     messages would be deleted",
                    state.bytes
                )
            })
        },
    );
    limit_change(
        &mut changes,
        "max_msgs_per_subject",
        wanted.max_messages_per_subject,
        have.max_messages_per_subject,
        |wanted| {
            // Some subject holds more than `wanted` when the messages outnumber
            // subjects × wanted (a KV bucket's history, for example).
            (state.messages > state.subjects_count.saturating_mul(wanted)).then(|| {
                format!(
                    "lowers max_msgs_per_subject to {wanted} while {} messages are spread over \
                     {} subjects: older messages of some subjects would be deleted",
                    state.messages, state.subjects_count
                )
            })
        },
    );
    limit_change(
        &mut changes,
        "max_msg_size",
        i64::from(wanted.max_message_size),
        i64::from(have.max_message_size),
        |_| None,
    );

    if wanted.discard != have.discard {
        changes.push(FieldChange::safe(
            "discard",
            format!("{:?}", have.discard),
            format!("{:?}", wanted.discard),
        ));
    }
    if !wanted.duplicate_window.is_zero() && wanted.duplicate_window != have.duplicate_window {
        changes.push(FieldChange::safe(
            "duplicate_window",
            age(have.duplicate_window),
            age(wanted.duplicate_window),
        ));
    }
    if wanted.republish != have.republish {
        changes.push(FieldChange::safe(
            "republish",
            republish(have.republish.as_ref()),
            republish(wanted.republish.as_ref()),
        ));
    }
    for (field, wanted_flag, have_flag) in [
        ("allow_rollup_hdrs", wanted.allow_rollup, have.allow_rollup),
        ("deny_delete", wanted.deny_delete, have.deny_delete),
        ("deny_purge", wanted.deny_purge, have.deny_purge),
        ("allow_direct", wanted.allow_direct, have.allow_direct),
    ] {
        if wanted_flag != have_flag {
            changes.push(FieldChange::safe(
                field,
                have_flag.to_string(),
                wanted_flag.to_string(),
            ));
        }
    }
    changes
}

/// The fields of a durable pull consumer's server config that differ from `wanted`. Fields
/// the server cannot update (ack, deliver and replay policies) need the consumer deleted and
/// created again, which loses its position and pending acks, so they count as data loss.
pub fn consumer_changes(
    wanted: &consumer::pull::Config,
    have: &consumer::Config,
) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    let recreate_why = |field: &str| {
        format!(
            "{field} cannot be changed in place: the consumer would be deleted and created \
             again, losing its position and pending acks (messages redelivered or skipped)"
        )
    };
    if wanted.ack_policy != have.ack_policy {
        changes.push(
            FieldChange::safe(
                "ack_policy",
                format!("{:?}", have.ack_policy),
                format!("{:?}", wanted.ack_policy),
            )
            .recreating(recreate_why("ack_policy")),
        );
    }
    if wanted.deliver_policy != have.deliver_policy {
        changes.push(
            FieldChange::safe(
                "deliver_policy",
                format!("{:?}", have.deliver_policy),
                format!("{:?}", wanted.deliver_policy),
            )
            .recreating(recreate_why("deliver_policy")),
        );
    }
    if wanted.replay_policy != have.replay_policy {
        changes.push(
            FieldChange::safe(
                "replay_policy",
                format!("{:?}", have.replay_policy),
                format!("{:?}", wanted.replay_policy),
            )
            .recreating(recreate_why("replay_policy")),
        );
    }
    if let Some(description) = &wanted.description
        && have.description.as_ref() != Some(description)
    {
        changes.push(FieldChange::safe(
            "description",
            quoted(have.description.as_deref().unwrap_or("")),
            quoted(description),
        ));
    }
    if wanted.filter_subject != have.filter_subject {
        changes.push(FieldChange::safe(
            "filter_subject",
            quoted(&have.filter_subject),
            quoted(&wanted.filter_subject),
        ));
    }
    if wanted.ack_wait != have.ack_wait {
        changes.push(FieldChange::safe(
            "ack_wait",
            age(have.ack_wait),
            age(wanted.ack_wait),
        ));
    }
    limit_change(
        &mut changes,
        "max_deliver",
        wanted.max_deliver,
        have.max_deliver,
        |_| None,
    );
    // Zero asks for the server's default, which the server then reports: nothing to compare.
    for (field, wanted_value, have_value) in [
        (
            "max_ack_pending",
            wanted.max_ack_pending,
            have.max_ack_pending,
        ),
        ("max_batch", wanted.max_batch, have.max_batch),
    ] {
        if wanted_value != 0 && wanted_value != have_value {
            changes.push(FieldChange::safe(
                field,
                have_value.to_string(),
                wanted_value.to_string(),
            ));
        }
    }
    if wanted.backoff != have.backoff {
        changes.push(FieldChange::safe(
            "backoff",
            durations(&have.backoff),
            durations(&wanted.backoff),
        ));
    }
    if wanted.num_replicas != 0 && wanted.num_replicas != have.num_replicas {
        changes.push(FieldChange::safe(
            "num_replicas",
            have.num_replicas.to_string(),
            wanted.num_replicas.to_string(),
        ));
    }
    changes
}

/// A limit where zero or less means unlimited (the server reports unlimited as -1).
fn limit_change(
    changes: &mut Vec<FieldChange>,
    field: &'static str,
    wanted: i64,
    have: i64,
    lowered_loses: impl Fn(u64) -> Option<String>,
) {
    let (wanted, have) = (
        u64::try_from(wanted).ok().filter(|v| *v > 0),
        u64::try_from(have).ok().filter(|v| *v > 0),
    );
    if wanted == have {
        return;
    }
    let why = match (wanted, have) {
        (Some(wanted), None) => lowered_loses(wanted),
        (Some(wanted), Some(have)) if wanted < have => lowered_loses(wanted),
        _ => None,
    };
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |v| v.to_string());
    changes.push(FieldChange::safe(field, show(have), show(wanted)).losing(why));
}

/// How long ago the stream's oldest message was stored; `None` for an empty stream.
fn oldest_message_age(state: &stream::State) -> Option<Duration> {
    if state.messages == 0 {
        return None;
    }
    let stored = state.first_timestamp.unix_timestamp();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        });
    Some(Duration::from_secs(
        u64::try_from(now.saturating_sub(stored)).unwrap_or(0),
    ))
}

/// A duration for people: `unlimited` for zero, else the largest whole unit (`7d`, `90s`).
pub fn age(duration: Duration) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    if duration.is_zero() {
        return "unlimited".to_owned();
    }
    if duration.subsec_nanos() != 0 {
        return format!("{}ms", duration.as_millis());
    }
    let secs = duration.as_secs();
    UNITS
        .iter()
        .find(|(unit, _)| secs.is_multiple_of(*unit))
        .map_or_else(
            || format!("{secs}s"),
            |(unit, name)| format!("{}{name}", secs / unit),
        )
}

fn durations(values: &[Duration]) -> String {
    let shown: Vec<String> = values.iter().map(|d| age(*d)).collect();
    format!("[{}]", shown.join(", "))
}

fn list(values: &[String]) -> String {
    format!("[{}]", values.join(", "))
}

fn quoted(value: &str) -> String {
    format!("{value:?}")
}

fn republish(value: Option<&stream::Republish>) -> String {
    value.map_or_else(
        || "none".to_owned(),
        |r| format!("{} -> {}", r.source, r.destination),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::topology::Topology;

    fn info(config: stream::Config, messages: u64, bytes: u64, subjects: u64) -> stream::Info {
        let mut value = serde_json::json!({
            "config": config,
            "created": "2026-01-01T00:00:00Z",
            "state": {
                "messages": messages, "bytes": bytes, "first_seq": 1,
                "first_ts": "2000-01-01T00:00:00Z", "last_seq": messages,
                "last_ts": "2026-01-01T00:00:00Z", "consumer_count": 0,
                "num_subjects": subjects
            }
        });
        value["config"]["max_msgs"] = serde_json::json!(-1);
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn the_same_config_has_no_changes() {
        let wanted = Topology::default().events_stream();
        assert_eq!(stream_changes(&wanted, &info(wanted.clone(), 5, 10, 5)), []);
    }

    #[test]
    fn raising_a_limit_is_safe_and_lowering_under_the_data_is_not() {
        let topology = Topology::default();
        let wanted = topology.events_stream();
        let longer = stream::Config {
            max_age: wanted.max_age * 2,
            ..wanted.clone()
        };
        // The stream holds a message from the year 2000: a shorter max age would delete it.
        let changes = stream_changes(&wanted, &info(longer.clone(), 1, 10, 1));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].field, "max_age");
        assert_eq!(
            (changes[0].from.as_str(), changes[0].to.as_str()),
            ("14d", "7d")
        );
        assert!(changes[0].data_loss.as_deref().unwrap().contains("oldest"));
        // Empty, the same change loses nothing.
        assert!(!loses_data(&stream_changes(
            &wanted,
            &info(longer.clone(), 0, 0, 0)
        )));
        // Raising it never does.
        assert!(!loses_data(&stream_changes(
            &longer,
            &info(wanted, 1, 10, 1)
        )));
    }

    #[test]
    fn fewer_replicas_other_retention_and_removed_subjects_lose_data() {
        let wanted = Topology::default().uploads_stream();
        let have = stream::Config {
            num_replicas: 3,
            retention: stream::RetentionPolicy::Interest,
            subjects: vec!["darkroom.uploads.>".into(), "legacy.>".into()],
            ..wanted.clone()
        };
        let changes = stream_changes(&wanted, &info(have, 0, 0, 0));
        let fields: Vec<_> = changes.iter().map(|c| c.field).collect();
        assert_eq!(fields, ["subjects", "retention", "num_replicas"]);
        assert!(changes.iter().all(|c| c.data_loss.is_some()), "{changes:?}");
        assert!(needs_recreate(&changes));
        // More replicas and an added subject are safe.
        let fewer = stream::Config {
            subjects: vec![],
            ..wanted.clone()
        };
        let more = stream::Config {
            num_replicas: 3,
            subjects: vec!["darkroom.uploads.>".into(), "extra.>".into()],
            ..wanted
        };
        let changes = stream_changes(&more, &info(fewer, 0, 0, 0));
        assert_eq!(changes.len(), 2);
        assert!(!loses_data(&changes));
    }

    #[test]
    fn lowering_kv_history_under_the_data_loses_it() {
        let wanted = kv_stream_config(&Topology::default().jobs_kv());
        let have = stream::Config {
            max_messages_per_subject: 5,
            ..wanted.clone()
        };
        // 10 messages over 2 keys: some key keeps more than 1 revision.
        let changes = stream_changes(&wanted, &info(have.clone(), 10, 100, 2));
        assert!(loses_data(&changes));
        // One revision per key: nothing to lose.
        assert!(!loses_data(&stream_changes(
            &wanted,
            &info(have, 2, 100, 2)
        )));
    }

    #[test]
    fn consumer_limits_are_updates_and_policies_need_a_recreate() {
        let topology = Topology::default();
        let (_, wanted) = topology.consumers().remove(0);
        let same = consumer::IntoConsumerConfig::into_consumer_config(wanted.clone());
        assert_eq!(consumer_changes(&wanted, &same), []);
        let have = consumer::Config {
            ack_wait: Duration::from_secs(30),
            max_deliver: 3,
            ..same.clone()
        };
        let changes = consumer_changes(&wanted, &have);
        let shown: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            // 5 attempts: the server delivers 6 times (the last settles an unsettled message).
            ["ack_wait from 30s to 1m", "max_deliver from 3 to 6"]
        );
        assert!(!loses_data(&changes));
        let have = consumer::Config {
            ack_policy: consumer::AckPolicy::All,
            ..same
        };
        assert!(needs_recreate(&consumer_changes(&wanted, &have)));
    }

    #[test]
    fn ages_are_shown_in_their_largest_whole_unit() {
        assert_eq!(age(Duration::ZERO), "unlimited");
        assert_eq!(age(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(age(Duration::from_secs(90)), "90s");
        assert_eq!(age(Duration::from_secs(120)), "2m");
        assert_eq!(age(Duration::from_millis(1500)), "1500ms");
    }
}
