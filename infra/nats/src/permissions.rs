//! Who may publish and subscribe to what: one NATS user per Darkroom function, each allowed
//! exactly the subjects it uses, derived from [`darkroom_events::subjects`].
//!
//! Besides Darkroom's own subjects a function needs JetStream API subjects (`$JS.API.…`, requests
//! a client publishes), acknowledgement subjects (`$JS.ACK.<stream>.<consumer>.…`, the reply
//! subjects of pulled messages), KV subjects (`$KV.<bucket>.<key>`) and `_INBOX.>`, where the
//! replies to its requests and the messages it pulls arrive.

use darkroom_events::Stage;
use darkroom_events::lifecycle::LifecycleKind;
use darkroom_events::subjects::{self, consumers};

/// A Darkroom NATS user: one per function, plus the people and tools around them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// `darkroom-ingest`: turns storage notifications into upload messages.
    Ingest,
    /// `darkroom-preprocess`: consumes uploads, queues inference jobs.
    Preprocess,
    /// `darkroom-notifier`: reads lifecycle events, fans them out.
    Notifier,
    /// `darkroom-inference`: pulls jobs, publishes lifecycle events.
    Inference,
    /// The `darkroom` CLI in an operator's hands: watches, inspects, replays dead letters,
    /// cancels jobs.
    Operator,
    /// `darkroom-infra` / `darkroom-dev provision`: creates and updates streams, consumers and
    /// KV buckets (the JetStream API, nothing else).
    Provisioner,
}

impl Role {
    /// Every role, in a stable order.
    pub const ALL: [Role; 6] = [
        Role::Ingest,
        Role::Preprocess,
        Role::Notifier,
        Role::Inference,
        Role::Operator,
        Role::Provisioner,
    ];

    /// The NATS user name of this role.
    pub fn user(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Preprocess => "preprocess",
            Role::Notifier => "notifier",
            Role::Inference => "inference",
            Role::Operator => "operator",
            Role::Provisioner => "provisioner",
        }
    }

    /// The role whose user is `user`.
    pub fn from_user(user: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.user() == user)
    }

    /// What this role's user may publish and subscribe to.
    pub fn permissions(self) -> Permissions {
        let mut p = Permissions::default();
        // Replies to requests (JetStream API, publish acks) and pulled messages arrive here.
        p.subscribe(INBOX);
        match self {
            Role::Ingest => {
                p.publish(subjects::UPLOADS_SUBJECTS);
                p.kv_write(subjects::JOBS_KV);
                p.check_topology();
            }
            Role::Preprocess => {
                p.consume(
                    subjects::UPLOADS_STREAM,
                    consumers::PREPROCESS,
                    Stage::Preprocess,
                );
                p.publish(subjects::INFERENCE_JOBS_SUBJECT);
                p.events(&[LifecycleKind::Queued, LifecycleKind::Failed]);
                p.kv_write(subjects::JOBS_KV);
                p.kv_list(subjects::WORKERS_KV);
                p.check_topology();
            }
            Role::Notifier => {
                p.consume(
                    subjects::EVENTS_STREAM,
                    consumers::NOTIFIER,
                    Stage::Notifier,
                );
                p.publish(subjects::NOTIFY_STREAM_SUBJECTS);
                p.kv_write(subjects::NOTIFIER_DELIVERIES_KV);
                p.kv_write(subjects::WEBHOOK_ENDPOINTS_KV);
                p.kv_read(subjects::JOBS_KV);
                p.check_topology();
            }
            Role::Inference => {
                p.consume(
                    subjects::JOBS_STREAM,
                    consumers::INFERENCE,
                    Stage::Inference,
                );
                // A dead-lettered job is removed from the work queue by hand.
                p.publish(&format!(
                    "$JS.API.STREAM.MSG.DELETE.{}",
                    subjects::JOBS_STREAM
                ));
                p.events(&[
                    LifecycleKind::Started,
                    LifecycleKind::Progress,
                    LifecycleKind::Completed,
                    LifecycleKind::Failed,
                ]);
                p.subscribe(&subjects::cancel_subject_filter());
                p.kv_write(subjects::JOBS_KV);
                p.kv_write(subjects::WORKERS_KV);
                p.check_topology();
            }
            Role::Operator => {
                // Watching: anything on the bus, live.
                p.subscribe(DARKROOM_ALL);
                // Inspecting streams, reading messages and KV entries, ordered consumers.
                p.publish("$JS.API.INFO");
                p.publish("$JS.API.STREAM.NAMES");
                p.publish("$JS.API.STREAM.LIST");
                p.publish("$JS.API.STREAM.INFO.*");
                p.publish("$JS.API.STREAM.MSG.GET.*");
                p.publish("$JS.API.DIRECT.GET.>");
                p.publish("$JS.API.CONSUMER.INFO.*.*");
                p.publish("$JS.API.CONSUMER.CREATE.*");
                p.publish("$JS.API.CONSUMER.CREATE.*.>");
                p.publish("$JS.API.CONSUMER.DELETE.*.*");
                // Ordered consumers (random names) are pulled from; the functions' durable
                // consumers are not the operator's to pull from or delete.
                p.publish("$JS.API.CONSUMER.MSG.NEXT.*.*");
                for (stream, consumer) in DURABLE_CONSUMERS {
                    for api in ["MSG.NEXT", "DELETE", "CREATE", "DURABLE.CREATE"] {
                        p.publish_deny
                            .push(format!("$JS.API.CONSUMER.{api}.{stream}.{consumer}"));
                    }
                    p.publish_deny
                        .push(format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>"));
                }
                p.publish("$JS.FC.>");
                // Replaying dead letters onto the subjects they came from, then removing them.
                p.publish(subjects::UPLOADS_SUBJECTS);
                p.publish(subjects::JOBS_SUBJECTS);
                p.publish(subjects::EVENTS_SUBJECTS);
                p.publish(&format!(
                    "$JS.API.STREAM.MSG.DELETE.{}",
                    subjects::DLQ_STREAM
                ));
                // Cancelling jobs.
                p.publish(&subjects::cancel_subject_filter());
            }
            Role::Provisioner => {
                p.publish("$JS.API.>");
            }
        }
        p.dedup();
        p
    }
}

/// The functions' durable consumers: `(stream, consumer)`.
const DURABLE_CONSUMERS: [(&str, &str); 3] = [
    (subjects::UPLOADS_STREAM, consumers::PREPROCESS),
    (subjects::JOBS_STREAM, consumers::INFERENCE),
    (subjects::EVENTS_STREAM, consumers::NOTIFIER),
];

/// The reply inbox prefix of the Rust client (`async-nats`' default).
pub const INBOX: &str = "_INBOX.>";
/// Every Darkroom subject.
pub const DARKROOM_ALL: &str = "darkroom.>";

/// A user's allowed subjects (wildcards allowed); everything else is denied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish on (including JetStream API requests).
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
    /// Exceptions to [`Self::publish`]: subjects it may not publish on even where an allowed
    /// wildcard covers them.
    pub publish_deny: Vec<String>,
}

impl Permissions {
    fn publish(&mut self, subject: &str) {
        self.publish.push(subject.to_owned());
    }

    fn subscribe(&mut self, subject: &str) {
        self.subscribe.push(subject.to_owned());
    }

    /// Publishes lifecycle events of these kinds, for any job.
    fn events(&mut self, kinds: &[LifecycleKind]) {
        for kind in kinds {
            self.publish(&subjects::lifecycle_kind_filter(*kind));
        }
    }

    /// Read-only look at the topology: what a function with `jetstream_provision = false`
    /// needs to check that its streams, buckets and consumers exist.
    fn check_topology(&mut self) {
        self.publish("$JS.API.INFO");
        self.publish("$JS.API.STREAM.INFO.*");
        self.publish("$JS.API.CONSUMER.INFO.*.*");
    }

    /// Pulls from `consumer` on `stream` and acks, dead-letters for `stage`, and handles the
    /// consumer's max-deliveries advisories (reading the abandoned message from the stream).
    fn consume(&mut self, stream: &str, consumer: &str, stage: Stage) {
        self.publish(&format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"));
        self.publish(&format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"));
        self.publish(&format!("$JS.ACK.{stream}.{consumer}.>"));
        self.publish(&format!("$JS.API.STREAM.INFO.{stream}"));
        self.publish(&format!("$JS.API.STREAM.MSG.GET.{stream}"));
        self.publish(&format!("$JS.API.DIRECT.GET.{stream}"));
        self.subscribe(&format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"
        ));
        self.publish(&subjects::dlq_subject(stage));
    }

    /// Reads single entries of a KV bucket.
    fn kv_read(&mut self, bucket: &str) {
        self.publish(&format!("$JS.API.STREAM.INFO.KV_{bucket}"));
        self.publish(&format!("$JS.API.STREAM.MSG.GET.KV_{bucket}"));
        self.publish(&format!("$JS.API.DIRECT.GET.KV_{bucket}"));
        self.publish(&format!("$JS.API.DIRECT.GET.KV_{bucket}.>"));
    }

    /// Reads and writes entries of a KV bucket.
    fn kv_write(&mut self, bucket: &str) {
        self.kv_read(bucket);
        self.publish(&format!("$KV.{bucket}.>"));
    }

    /// Reads entries and lists the keys of a KV bucket (an ordered consumer on its stream).
    fn kv_list(&mut self, bucket: &str) {
        self.kv_read(bucket);
        self.publish(&format!("$JS.API.CONSUMER.CREATE.KV_{bucket}"));
        self.publish(&format!("$JS.API.CONSUMER.CREATE.KV_{bucket}.>"));
        self.publish(&format!("$JS.API.CONSUMER.DELETE.KV_{bucket}.*"));
        self.publish(&format!("$JS.FC.KV_{bucket}.>"));
    }

    fn dedup(&mut self) {
        for list in [
            &mut self.publish,
            &mut self.subscribe,
            &mut self.publish_deny,
        ] {
            let mut seen = std::collections::BTreeSet::new();
            list.retain(|subject| seen.insert(subject.clone()));
        }
    }

    /// Whether `subject` (a literal subject, no wildcards) is allowed for publishing.
    pub fn may_publish(&self, subject: &str) -> bool {
        self.publish
            .iter()
            .any(|pattern| subject_matches(pattern, subject))
            && !self
                .publish_deny
                .iter()
                .any(|pattern| subject_matches(pattern, subject))
    }

    /// Whether a subscription to `subject` (a literal subject) is allowed.
    pub fn may_subscribe(&self, subject: &str) -> bool {
        self.subscribe
            .iter()
            .any(|pattern| subject_matches(pattern, subject))
    }
}

/// Whether the literal `subject` matches `pattern` (`*` one token, `>` one or more at the end).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for expected in pattern.split('.') {
        match (expected, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (literal, Some(token)) if literal == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use darkroom_events::JobId;

    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(subject_matches("darkroom.>", "darkroom.jobs.inference"));
        assert!(!subject_matches("darkroom.>", "darkroom"));
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*.c", "a.b.c.d"));
        assert!(!subject_matches("a.*", "a"));
        assert!(subject_matches("$JS.API.INFO", "$JS.API.INFO"));
        assert!(!subject_matches("$JS.API.INFO", "$JS.API.INFO.x"));
    }

    #[test]
    fn each_function_publishes_only_its_own_outputs() {
        let job = JobId::for_object("b", "k", "e");
        let event = subjects::lifecycle_subject(job, LifecycleKind::Completed);
        let preprocess = Role::Preprocess.permissions();
        assert!(preprocess.may_publish(subjects::INFERENCE_JOBS_SUBJECT));
        assert!(!preprocess.may_publish(&event));
        assert!(preprocess.may_publish(&subjects::lifecycle_subject(job, LifecycleKind::Queued)));
        assert!(!preprocess.may_publish(&subjects::uploads_subject("b")));
        assert!(!preprocess.may_publish("$JS.API.CONSUMER.MSG.NEXT.DARKROOM_JOBS.inference"));
        assert!(!preprocess.may_publish("$JS.API.STREAM.CREATE.DARKROOM_JOBS"));

        let notifier = Role::Notifier.permissions();
        assert!(!notifier.may_publish(subjects::INFERENCE_JOBS_SUBJECT));
        assert!(!notifier.may_publish(&event));
        assert!(notifier.may_publish("darkroom.fanout.job.x.completed"));
        assert!(notifier.may_publish("$JS.API.CONSUMER.MSG.NEXT.DARKROOM_EVENTS.notifier"));
        assert!(!notifier.may_publish("$KV.darkroom_jobs.x"));

        let inference = Role::Inference.permissions();
        assert!(inference.may_publish("$JS.API.CONSUMER.MSG.NEXT.DARKROOM_JOBS.inference"));
        assert!(inference.may_publish(&event));
        assert!(!inference.may_publish(subjects::INFERENCE_JOBS_SUBJECT));
        assert!(!inference.may_publish(&subjects::uploads_subject("x")));
        assert!(inference.may_subscribe(&subjects::cancel_subject(job)));

        let ingest = Role::Ingest.permissions();
        assert!(ingest.may_publish(&subjects::uploads_subject("photos")));
        assert!(!ingest.may_publish(&event));
    }

    #[test]
    fn the_operator_pulls_from_its_own_consumers_only() {
        let operator = Role::Operator.permissions();
        assert!(operator.may_publish("$JS.API.CONSUMER.MSG.NEXT.DARKROOM_DLQ.ordered123"));
        assert!(!operator.may_publish("$JS.API.CONSUMER.MSG.NEXT.DARKROOM_JOBS.inference"));
        assert!(!operator.may_publish("$JS.API.CONSUMER.DELETE.DARKROOM_EVENTS.notifier"));
        assert!(operator.may_publish("$JS.API.CONSUMER.DELETE.DARKROOM_EVENTS.ordered123"));
    }

    #[test]
    fn only_the_provisioner_changes_the_topology() {
        for role in Role::ALL {
            let may = role
                .permissions()
                .may_publish("$JS.API.STREAM.UPDATE.DARKROOM_JOBS");
            assert_eq!(may, role == Role::Provisioner, "{role:?}");
            let may = role
                .permissions()
                .may_publish("$JS.API.CONSUMER.DURABLE.CREATE.DARKROOM_JOBS.inference");
            assert_eq!(may, role == Role::Provisioner, "{role:?}");
        }
    }

    #[test]
    fn every_role_has_a_user_name_that_maps_back() {
        for role in Role::ALL {
            assert_eq!(Role::from_user(role.user()), Some(role));
            assert!(role.permissions().may_subscribe("_INBOX.abc.def"));
        }
        assert_eq!(Role::from_user("root"), None);
    }
}
