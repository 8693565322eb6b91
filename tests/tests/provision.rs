//! `darkroom-infra` against a real nats-server and SeaweedFS: the full plan on an empty stack,
//! apply, "no changes", idempotence, updates, refusals of data-losing changes and `--force`,
//! the bucket's lifecycle rule, and agreement with the functions' `Topology::ensure`.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use darkroom_events::subjects;
use darkroom_infra::bucket::WORK_EXPIRY_RULE_ID;
use darkroom_infra::{Action, ProvisionConfig, ProvisionError, Provisioner};
use darkroom_shared::RuntimeConfig;
use darkroom_tests::{NatsServer, S3Server};

const BUCKET: &str = "provisioned";

struct Stack {
    nats: NatsServer,
    s3: S3Server,
}

impl Stack {
    async fn start() -> Stack {
        let (nats, s3) = tokio::join!(NatsServer::start(), S3Server::start(None));
        Stack {
            nats: nats.unwrap(),
            s3: s3.unwrap(),
        }
    }

    fn config(&self) -> ProvisionConfig {
        ProvisionConfig {
            runtime: RuntimeConfig {
                nats_url: self.nats.url(),
                s3_endpoint: Some(self.s3.endpoint()),
                s3_access_key_id: Some(self.s3.access_key().to_owned()),
                s3_secret_access_key: Some(self.s3.secret_key().to_owned()),
                bucket: BUCKET.to_owned(),
                ..RuntimeConfig::default()
            },
            ..ProvisionConfig::default()
        }
    }

    async fn provisioner(&self, config: ProvisionConfig) -> Provisioner {
        Provisioner::connect(config).await.unwrap()
    }

    async fn js(&self) -> jetstream::Context {
        self.nats.jetstream().await.unwrap()
    }
}

/// Every resource the topology declares, as `plan` names them.
fn all_resources() -> Vec<String> {
    let topology = RuntimeConfig::default().topology();
    let mut names: Vec<String> = topology
        .streams()
        .iter()
        .map(|s| format!("stream {}", s.name))
        .collect();
    names.extend(
        topology
            .key_values()
            .iter()
            .map(|kv| format!("kv {}", kv.bucket)),
    );
    names.extend(
        topology
            .consumers()
            .iter()
            .map(|(stream, c)| format!("consumer {stream}/{}", c.durable_name.clone().unwrap())),
    );
    names.extend([
        format!("bucket {BUCKET}"),
        format!("lifecycle {BUCKET}"),
        format!("notification {BUCKET}"),
    ]);
    names
}

#[tokio::test]
async fn plan_apply_then_no_changes_and_apply_again_changes_nothing() {
    let stack = Stack::start().await;
    let provisioner = stack.provisioner(stack.config()).await;

    // Empty stack: everything is created, the notification is reported as not managed.
    let plan = provisioner.plan().await.unwrap();
    let names: Vec<&str> = plan.items.iter().map(|i| i.resource.as_str()).collect();
    assert_eq!(names, all_resources());
    for item in &plan.items {
        if item.resource.starts_with("notification") {
            assert!(matches!(item.action, Action::NotManaged(_)), "{item:?}");
        } else {
            assert_eq!(item.action, Action::Create, "{item:?}");
        }
    }
    assert!(plan.to_string().contains("stream DARKROOM_JOBS: create\n"));
    assert!(
        plan.to_string()
            .ends_with("14 resource(s) to change, 0 change(s) refused without --force\n")
    );

    let applied = provisioner.apply(false).await.unwrap();
    assert_eq!(applied, plan);

    let plan = provisioner.plan().await.unwrap();
    assert!(!plan.has_changes(), "{plan}");
    assert!(plan.to_string().ends_with("no changes\n"), "{plan}");
    assert!(
        plan.to_string()
            .contains("stream DARKROOM_JOBS: no change\n")
    );

    // Apply again: nothing to do, and the server's configs are untouched.
    let js = stack.js().await;
    let before = js
        .get_stream(subjects::JOBS_STREAM)
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert!(!provisioner.apply(false).await.unwrap().has_changes());
    let after = js
        .get_stream(subjects::JOBS_STREAM)
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(before.config, after.config);

    // What the functions ensure at start agrees: still no changes.
    stack.config().runtime.topology().ensure(&js).await.unwrap();
    assert!(!provisioner.plan().await.unwrap().has_changes());

    // The lifecycle rule expires work/ after the default 7 days.
    let lifecycle = stack
        .s3
        .client()
        .await
        .get_bucket_lifecycle_configuration()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap();
    let rule = lifecycle
        .rules()
        .iter()
        .find(|rule| rule.id() == Some(WORK_EXPIRY_RULE_ID))
        .unwrap();
    assert_eq!(
        rule.filter().and_then(|f| f.prefix()),
        Some("work/"),
        "{rule:?}"
    );
    assert_eq!(rule.expiration().and_then(|e| e.days()), Some(7));
}

#[tokio::test]
async fn changed_settings_are_updates_and_data_losing_ones_need_force() {
    let stack = Stack::start().await;
    let provisioner = stack.provisioner(stack.config()).await;
    provisioner.apply(false).await.unwrap();
    let js = stack.js().await;

    // A shorter AckWait, more deliveries, a longer expiry: safe updates, applied without force.
    let mut config = stack.config();
    config.runtime.ack_wait_secs = 30.0;
    config.runtime.max_deliver = 7;
    config.work_expiry_days = 3;
    let changed = stack.provisioner(config).await;
    let plan = changed.plan().await.unwrap();
    let text = plan.to_string();
    assert!(
        text.contains("consumer DARKROOM_JOBS/inference: update ack_wait from 1m to 30s, max_deliver from 6 to 8\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "lifecycle {BUCKET}: update expiration from 7 days to 3 days\n"
        )),
        "{text}"
    );
    assert!(plan.refusals().is_empty(), "{text}");
    changed.apply(false).await.unwrap();
    assert!(!changed.plan().await.unwrap().has_changes());
    let info = js
        .get_stream(subjects::JOBS_STREAM)
        .await
        .unwrap()
        .consumer_info("inference")
        .await
        .unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(30));

    // An event two seconds old, then a max age of one second for the events stream.
    js.publish("darkroom.events.job.queued", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut shorter = stack.config();
    shorter.runtime.events_max_age_secs = 1;
    let shrinking = stack.provisioner(shorter.clone()).await;
    let plan = shrinking.plan().await.unwrap();
    let refusals = plan.refusals();
    // The notifier's deliveries bucket shares the events max age but is empty: only the
    // stream holding the event is refused.
    assert_eq!(refusals.len(), 1, "{plan}");
    assert_eq!(refusals[0].0, "stream DARKROOM_EVENTS");
    assert_eq!(refusals[0].1.field, "max_age");
    assert!(
        plan.to_string().contains(
            "refused without --force: max_age: lowers max_age to 1s while the oldest message is"
        ),
        "{plan}"
    );

    // Refused: nothing changes, not even the safe update of the empty bucket.
    let Err(ProvisionError::Refused(refused)) = shrinking.apply(false).await else {
        panic!("a data-losing change was applied without --force");
    };
    assert_eq!(refused.items.len(), plan.items.len());
    let again = shrinking.plan().await.unwrap();
    assert_eq!(again.refusals().len(), 1);
    let pending = "consumer DARKROOM_JOBS/inference";
    assert_eq!(again.item(pending), plan.item(pending));
    assert!(again.item(pending).unwrap().changes());
    // The functions' ensure leaves it to the operator too.
    shorter.runtime.topology().ensure(&js).await.unwrap();
    let events = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    assert_eq!(
        events.cached_info().config.max_age,
        Duration::from_secs(7 * 86_400)
    );
    assert_eq!(events.cached_info().state.messages, 1);

    // Forced: applied, and then up to date.
    shrinking.apply(true).await.unwrap();
    let events = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    assert_eq!(events.cached_info().config.max_age, Duration::from_secs(1));
    assert!(!shrinking.plan().await.unwrap().has_changes());
}

#[tokio::test]
async fn the_binary_prints_the_plan_and_refuses_with_status_2() {
    let stack = Stack::start().await;
    let binary = env!("CARGO_BIN_EXE_darkroom-infra");
    let run = |args: &[&str], extra: &[(&str, &str)]| {
        let mut command = Command::new(binary);
        command
            .args(args)
            .env_remove("DARKROOM_CONFIG")
            .env("DARKROOM_NATS_URL", stack.nats.url())
            .env("DARKROOM_BUCKET", BUCKET)
            .envs(stack.s3.function_env());
        command.envs(extra.iter().copied());
        command.output().unwrap()
    };
    let plan = run(&["plan"], &[]);
    assert!(plan.status.success(), "{plan:?}");
    let text = String::from_utf8(plan.stdout).unwrap();
    assert!(text.contains("kv darkroom_jobs: create\n"), "{text}");
    assert!(
        text.contains(&format!("notification {BUCKET}: not managed (")),
        "{text}"
    );

    assert!(run(&["apply"], &[]).status.success());
    let plan = run(&["plan"], &[]);
    assert_eq!(
        String::from_utf8(plan.stdout).unwrap().lines().last(),
        Some("no changes")
    );

    // Settings from a TOML file (with --config): safe updates, applied.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("infra.toml");
    std::fs::write(
        &file,
        "uploads_max_age_secs = 0\njobs_max_age_secs = 60\nwork_expiry_days = 2\n",
    )
    .unwrap();
    let file = file.display().to_string();
    let out = run(&["plan", "--config", &file], &[]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("stream DARKROOM_UPLOADS: update max_age from 7d to unlimited\n"),
        "{text}"
    );
    assert!(
        text.contains("kv darkroom_jobs: update max_age from 30d to 1m"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "lifecycle {BUCKET}: update expiration from 7 days to 2 days\n"
        )),
        "{text}"
    );
    let out = run(&["apply", "--config", &file], &[]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["plan", "--config", &file], &[]);
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .ends_with("no changes\n")
    );

    // An upload notification two seconds old, then a one-second max age: refused with exit
    // status 2 and the reason, applied with --force.
    let js = stack.js().await;
    js.publish(format!("darkroom.uploads.{BUCKET}"), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let shorter = [("DARKROOM_UPLOADS_MAX_AGE_SECS", "1")];
    let out = run(&["apply"], &shorter);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("stream DARKROOM_UPLOADS: update max_age from unlimited to 1s, duplicate_window from 2m to 1s\n    refused without --force: max_age: lowers max_age to 1s while the oldest message is"),
        "{text}"
    );
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("refused, nothing changed: 1 change(s) would lose data"),
    );
    let out = run(&["apply", "--force"], &shorter);
    assert!(out.status.success(), "{out:?}");
    let uploads = js.get_stream(subjects::UPLOADS_STREAM).await.unwrap();
    assert_eq!(uploads.cached_info().config.max_age, Duration::from_secs(1));
}
