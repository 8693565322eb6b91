//! Darkroom's NATS authorisation (infra/nats) against a real nats-server: NKey users only, so
//! anonymous connections, passwords, unknown seeds and a user's public key signed with
//! another user's seed are refused; the config the server runs with holds no secret; each
//! function's user is refused what belongs to another (the server agrees with the permission
//! table, probe by probe); and the real functions and the CLI run with nothing but their own
//! seed files.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, Write as _};
use std::time::Duration;

use async_nats::jetstream;
use darkroom_events::subjects::{self, consumers};
use darkroom_events::{FailureReason, Stage};
use darkroom_events::{JobId, lifecycle::LifecycleKind};
use darkroom_nats_auth::Role;
use darkroom_shared::jobs::JobStore;
use darkroom_shared::publish::{DeadLetter, Publisher};
use darkroom_shared::topology::Topology;
use darkroom_tests::{NatsServer, S3Server, UserKey};
use futures::StreamExt;
use tokio::sync::mpsc;

const BUCKET: &str = "photos";
const WAIT: Duration = Duration::from_secs(30);
/// Denied to every user: its violation marks the end of a probe's errors.
const SENTINEL: &str = "sentinel.end";

/// A server with the topology provisioned by the provisioner user.
async fn secured_server() -> NatsServer {
    let nats = NatsServer::start_secured().await.unwrap();
    let provisioner = jetstream::new(nats.client_as(Role::Provisioner).await.unwrap());
    Topology::default().ensure(&provisioner).await.unwrap();
    nats
}

/// A client as `role` and the server errors it receives, in order.
async fn client_with_errors(
    nats: &NatsServer,
    role: Role,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let seed = nats.user_key(role).seed().to_owned();
    let (errors_tx, errors) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_nkey(seed)
        .event_callback(move |event| {
            let errors_tx = errors_tx.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    let _ = errors_tx.send(error.to_string());
                }
            }
        })
        .connect(nats.url())
        .await
        .unwrap();
    (client, errors)
}

#[derive(Debug, Clone, Copy)]
enum Probe<'a> {
    Publish(&'a str),
    Subscribe(&'a str),
}

/// Whether the server refuses `probe` on `client`: the probe, then a publish every user is
/// denied; the server answers in order, so the probe's violation (if any) arrives before the
/// sentinel's.
async fn refused(
    client: &async_nats::Client,
    errors: &mut mpsc::UnboundedReceiver<String>,
    probe: Probe<'_>,
) -> bool {
    let mut _subscription = None;
    let expected = match probe {
        Probe::Publish(subject) => {
            client
                .publish(subject.to_owned(), Vec::new().into())
                .await
                .unwrap();
            format!("Permissions Violation for Publish to \"{subject}\"")
        }
        Probe::Subscribe(subject) => {
            _subscription = Some(client.subscribe(subject.to_owned()).await.unwrap());
            format!("Permissions Violation for Subscription to \"{subject}\"")
        }
    };
    client
        .publish(SENTINEL.to_owned(), Vec::new().into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let sentinel = format!("Permissions Violation for Publish to \"{SENTINEL}\"");
    let mut refused = false;
    loop {
        let error = tokio::time::timeout(Duration::from_secs(10), errors.recv())
            .await
            .expect("the sentinel's violation never came")
            .unwrap();
        if error.contains(&sentinel) {
            return refused;
        }
        refused |= error.contains(&expected);
    }
}

/// What the server answers a hand-written `CONNECT` that claims `public_key` and signs the
/// server's nonce with `signer`'s seed, followed by a `PING`: its first line after `INFO`
/// (`PONG` when accepted, `-ERR 'Authorization Violation'` when refused).
async fn raw_nkey_connect(nats: &NatsServer, public_key: &str, signer: &UserKey) -> String {
    let port = nats.port();
    let public_key = public_key.to_owned();
    let signer = nkeys::KeyPair::from_seed(signer.seed()).unwrap();
    tokio::task::spawn_blocking(move || {
        let (mut reader, stream, info) = darkroom_tests::raw_nats_connection(port);
        let nonce = info["nonce"].as_str().unwrap();
        use base64::Engine as _;
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(signer.sign(nonce.as_bytes()).unwrap());
        let connect = serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "protocol": 1,
            "nkey": public_key,
            "sig": signature,
        });
        let mut writer = stream;
        write!(writer, "CONNECT {connect}\r\nPING\r\n").unwrap();
        writer.flush().unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        answer.trim().to_owned()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn only_the_users_own_seeds_are_accepted() {
    let nats = secured_server().await;
    let anonymous = async_nats::ConnectOptions::new()
        .connect(nats.url())
        .await
        .expect_err("an anonymous connection was accepted");
    assert!(
        anonymous.to_string().to_lowercase().contains("authoriz"),
        "{anonymous}"
    );
    let password = async_nats::ConnectOptions::with_user_and_password(
        "ingest".to_owned(),
        "not-the-password".to_owned(),
    )
    .connect(nats.url())
    .await;
    assert!(password.is_err(), "a user and password were accepted");
    let stranger = async_nats::ConnectOptions::with_nkey(UserKey::generate().seed().to_owned())
        .connect(nats.url())
        .await;
    assert!(
        stranger.is_err(),
        "a seed the config does not know was accepted"
    );
    for role in Role::ALL {
        nats.client_as(role).await.unwrap();
    }

    // The challenge by hand: ingest's public key with ingest's own signature is accepted (the
    // hand-written client is right), with preprocess's signature refused.
    let ingest = nats.user_key(Role::Ingest);
    let preprocess = nats.user_key(Role::Preprocess);
    assert_eq!(
        raw_nkey_connect(&nats, ingest.public_key(), ingest).await,
        "PONG"
    );
    let borrowed = raw_nkey_connect(&nats, ingest.public_key(), preprocess).await;
    assert!(
        borrowed.starts_with("-ERR") && borrowed.contains("Authorization Violation"),
        "ingest's key signed by preprocess: {borrowed}"
    );

    // Monitoring answers on the loopback address it was given.
    let health = reqwest::get(format!("{}/healthz", nats.monitor_url()))
        .await
        .unwrap();
    assert!(health.status().is_success());
}

#[tokio::test]
async fn the_server_config_holds_no_secret() {
    let nats = secured_server().await;
    let config = std::fs::read_to_string(nats.config_path().unwrap()).unwrap();
    for role in Role::ALL {
        let key = nats.user_key(role);
        assert!(config.contains(&format!("nkey: \"{}\"", key.public_key())));
        assert!(
            !config.contains(key.seed()),
            "{role:?}'s seed is in the config"
        );
    }
    let seeds: Vec<&str> = config
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| word.starts_with("SU") && nkeys::decode_seed(word).is_ok())
        .collect();
    assert!(seeds.is_empty(), "seeds in the config: {seeds:?}");
    assert!(!config.contains("password"), "{config}");
    // The seed files the functions read are private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for role in Role::ALL {
            let mode = std::fs::metadata(nats.seed_file(role))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{role:?}: {mode:o}");
        }
    }
}

#[tokio::test]
async fn each_user_is_refused_what_belongs_to_another() {
    let nats = secured_server().await;
    let job = JobId::for_object(BUCKET, "inbox/desk-setup/a.jpg", "e");
    let event = subjects::lifecycle_subject(job, LifecycleKind::Completed);
    let queued = subjects::lifecycle_subject(job, LifecycleKind::Queued);
    let upload = subjects::uploads_subject(BUCKET);
    let cancel = subjects::cancel_subject(job);
    let notify = subjects::notify_job_subject(job, LifecycleKind::Completed);
    let fanout = subjects::notify_stored_subject(&notify).unwrap();
    let pull_jobs = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        subjects::JOBS_STREAM,
        consumers::INFERENCE
    );
    let pull_uploads = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        subjects::UPLOADS_STREAM,
        consumers::PREPROCESS
    );
    let pull_events = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        subjects::EVENTS_STREAM,
        consumers::NOTIFIER
    );
    let ack_jobs = format!(
        "$JS.ACK.{}.{}.1.1.1.1.0",
        subjects::JOBS_STREAM,
        consumers::INFERENCE
    );
    let advisory_jobs = format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
        subjects::JOBS_STREAM,
        consumers::INFERENCE
    );
    let job_record = format!("$KV.{}.{job}", subjects::JOBS_KV);
    let worker_record = format!("$KV.{}.worker-1", subjects::WORKERS_KV);
    let delivery_record = format!("$KV.{}.fanout.x", subjects::NOTIFIER_DELIVERIES_KV);
    let update_stream = format!("$JS.API.STREAM.UPDATE.{}", subjects::JOBS_STREAM);
    let dlq_inference = subjects::dlq_subject(darkroom_events::Stage::Inference);
    let publishes = [
        upload.as_str(),
        subjects::INFERENCE_JOBS_SUBJECT,
        &event,
        &queued,
        &fanout,
        &cancel,
        &dlq_inference,
        &pull_jobs,
        &pull_uploads,
        &pull_events,
        &ack_jobs,
        &job_record,
        &worker_record,
        &delivery_record,
        &update_stream,
    ];
    let subscriptions = [
        notify.as_str(),
        subjects::INFERENCE_JOBS_SUBJECT,
        &event,
        &cancel,
        &advisory_jobs,
        "_INBOX.probe",
    ];

    // What the brief names outright, then every probe against the table.
    let must_refuse = [
        (Role::Preprocess, Probe::Publish(&event)),
        (Role::Inference, Probe::Publish(&queued)),
        (
            Role::Notifier,
            Probe::Publish(subjects::INFERENCE_JOBS_SUBJECT),
        ),
        (Role::Notifier, Probe::Publish(&event)),
        (Role::Preprocess, Probe::Publish(&pull_jobs)),
        (Role::Preprocess, Probe::Publish(&upload)),
        (Role::Inference, Probe::Publish(&upload)),
        (
            Role::Inference,
            Probe::Publish(subjects::INFERENCE_JOBS_SUBJECT),
        ),
        (Role::Ingest, Probe::Publish(&event)),
        (Role::Operator, Probe::Publish(&update_stream)),
        (Role::Operator, Probe::Publish(&pull_jobs)),
        (
            Role::Preprocess,
            Probe::Subscribe(subjects::INFERENCE_JOBS_SUBJECT),
        ),
        (Role::Notifier, Probe::Subscribe(&cancel)),
    ];
    let must_allow = [
        (
            Role::Preprocess,
            Probe::Publish(subjects::INFERENCE_JOBS_SUBJECT),
        ),
        (Role::Inference, Probe::Publish(&pull_jobs)),
        (Role::Inference, Probe::Publish(&event)),
        (Role::Inference, Probe::Subscribe(&cancel)),
        (Role::Notifier, Probe::Publish(&fanout)),
        (Role::Ingest, Probe::Publish(&upload)),
        (Role::Operator, Probe::Subscribe(&notify)),
        (Role::Provisioner, Probe::Publish(&update_stream)),
    ];
    let mut checked = 0;
    for role in Role::ALL {
        let (client, mut errors) = client_with_errors(&nats, role).await;
        for (named_role, probe) in must_refuse {
            if named_role == role {
                assert!(
                    refused(&client, &mut errors, probe).await,
                    "{role:?} {probe:?}"
                );
            }
        }
        for (named_role, probe) in must_allow {
            if named_role == role {
                assert!(
                    !refused(&client, &mut errors, probe).await,
                    "{role:?} {probe:?}"
                );
            }
        }
        let permissions = role.permissions();
        for subject in publishes {
            let expected = !permissions.may_publish(subject);
            let got = refused(&client, &mut errors, Probe::Publish(subject)).await;
            assert_eq!(got, expected, "{role:?} publish {subject}: refused {got}");
            checked += 1;
        }
        for subject in subscriptions {
            let expected = !permissions.may_subscribe(subject);
            let got = refused(&client, &mut errors, Probe::Subscribe(subject)).await;
            assert_eq!(got, expected, "{role:?} subscribe {subject}: refused {got}");
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        Role::ALL.len() * (publishes.len() + subscriptions.len())
    );
    // The server logs each refusal: what the_functions_work_with_their_own_seeds
    // relies on to show that the functions were refused nothing.
    let log = std::fs::read_to_string(nats.log_path()).unwrap();
    assert!(log.contains("Publish Violation") || log.contains("Permissions Violation"));
}

/// Messages `stream` holds.
async fn stream_len(js: &jetstream::Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Runs the `darkroom` CLI as the operator, configured only through its environment:
/// (exit code, stdout, stderr).
async fn operator_cli(nats: &NatsServer, s3: &S3Server, args: &[&str]) -> (i32, String, String) {
    cli_with_seed_file(nats, s3, &nats.seed_file(Role::Operator), args).await
}

/// Runs the `darkroom` CLI with `DARKROOM_NATS_NKEY_FILE=seed_file`: (exit code, stdout,
/// stderr).
async fn cli_with_seed_file(
    nats: &NatsServer,
    s3: &S3Server,
    seed_file: &std::path::Path,
    args: &[&str],
) -> (i32, String, String) {
    let mut command = darkroom_tests::clean_command(env!("CARGO_BIN_EXE_darkroom-cli"));
    command
        .args(args)
        .envs(nats.client_env(s3, BUCKET, seed_file));
    darkroom_tests::output_of(&mut command, WAIT).await
}

/// Preprocess runs in-process as its own user (its seed file in `DARKROOM_NATS_NKEY_FILE`'s
/// setting), checking (not changing) the topology; an upload announced by the ingest user
/// becomes a queued job, which the inference user pulls and acks, the notifier user reads the
/// events, and the operator reads the job record and, with the CLI, its status and replays a
/// dead letter. A seed file others may read stops the CLI at start with an error naming the
/// file. The server logs no permission violation along the way.
#[tokio::test]
async fn the_functions_work_with_their_own_seeds() {
    let nats = secured_server().await;
    let s3 = S3Server::start(None).await.unwrap();
    let s3_client = s3.client().await;
    darkroom_shared::s3::ensure_bucket(&s3_client, BUCKET)
        .await
        .unwrap();

    let (shutdown, preprocess) = nats.spawn_preprocess_as_its_user(&s3, BUCKET);
    let object = darkroom_tests::put_object(
        &s3_client,
        BUCKET,
        "inbox/desk-setup/secured.jpg",
        darkroom_tests::checkerboard_jpeg(0),
    )
    .await;
    let job = object.job_id().unwrap();
    let jobs = nats.announce_and_wait_for_a_job(&object, WAIT).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].subject.as_str(), subjects::INFERENCE_JOBS_SUBJECT);
    shutdown.cancel();
    preprocess.await.unwrap().unwrap();

    // The inference user pulls the job from its consumer and acks it.
    let inference = jetstream::new(nats.client_as(Role::Inference).await.unwrap());
    let consumer: jetstream::consumer::PullConsumer = inference
        .get_consumer_from_stream(consumers::INFERENCE, subjects::JOBS_STREAM)
        .await
        .unwrap();
    let mut pulled = consumer.fetch().max_messages(1).messages().await.unwrap();
    let message = pulled.next().await.unwrap().unwrap();
    assert_eq!(message.subject.as_str(), subjects::INFERENCE_JOBS_SUBJECT);
    message.double_ack().await.unwrap();

    // The notifier user reads the job's `queued` event from its consumer.
    let notifier = jetstream::new(nats.client_as(Role::Notifier).await.unwrap());
    let consumer: jetstream::consumer::PullConsumer = notifier
        .get_consumer_from_stream(consumers::NOTIFIER, subjects::EVENTS_STREAM)
        .await
        .unwrap();
    let mut pulled = consumer.fetch().max_messages(1).messages().await.unwrap();
    let message = pulled.next().await.unwrap().unwrap();
    assert_eq!(
        message.subject.as_str(),
        subjects::lifecycle_subject(job, LifecycleKind::Queued)
    );
    message.double_ack().await.unwrap();

    // The operator reads the job record.
    let operator = jetstream::new(nats.client_as(Role::Operator).await.unwrap());
    let record = JobStore::open(&operator)
        .await
        .unwrap()
        .get(job)
        .await
        .unwrap();
    assert!(record.is_some());

    // The operator's CLI: a job's status, and a dead letter (left by preprocess, as its own
    // user) replayed onto the uploads subject through an ordered consumer on the DLQ.
    let (code, stdout, stderr) =
        operator_cli(&nats, &s3, &["status", &job.to_string(), "--json"]).await;
    assert_eq!(code, 0, "status: {stdout}{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["status"], "queued");
    let preprocess_js = jetstream::new(nats.client_as(Role::Preprocess).await.unwrap());
    let provisioner = jetstream::new(nats.client_as(Role::Provisioner).await.unwrap());
    let uploads_before = stream_len(&provisioner, subjects::UPLOADS_STREAM).await;
    Publisher::new(preprocess_js, "/darkroom/tests/preprocess")
        .dead_letter(&DeadLetter {
            stage: Stage::Preprocess,
            subject: subjects::uploads_subject(BUCKET),
            stream: Some(subjects::UPLOADS_STREAM.to_owned()),
            sequence: Some(1),
            deliveries: 5,
            reason: FailureReason::Internal,
            message: "a test dead letter".to_owned(),
            payload: bytes::Bytes::from_static(b"{\"Records\":[]}"),
        })
        .await
        .unwrap();
    let (code, stdout, stderr) = operator_cli(&nats, &s3, &["replay-dlq"]).await;
    assert_eq!(code, 0, "replay-dlq: {stdout}{stderr}");
    assert_eq!(stream_len(&provisioner, subjects::DLQ_STREAM).await, 0);
    assert_eq!(
        stream_len(&provisioner, subjects::UPLOADS_STREAM).await,
        uploads_before + 1
    );

    // A seed file others may read: the CLI refuses it before connecting, naming the file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("operator.nk");
        std::fs::copy(nats.seed_file(Role::Operator), &open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (code, stdout, stderr) =
            cli_with_seed_file(&nats, &s3, &open, &["status", &job.to_string()]).await;
        assert_ne!(code, 0, "an open seed file was used: {stdout}{stderr}");
        assert!(
            stderr.contains(&open.display().to_string()) && stderr.contains("chmod 600"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    let log = std::fs::read_to_string(nats.log_path()).unwrap();
    assert!(
        !log.contains("Violation"),
        "the server refused something a function needed:\n{}",
        log.lines()
            .filter(|l| l.contains("Violation"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
