//! NATS over TLS against a real nats-server that serves TLS only, with Darkroom's NKey users
//! (infra/nats), its config rendered by `darkroom-nats-config` with a test CA (rcgen): the
//! functions (preprocess in this process, the CLI as a child process) work with the CA in
//! `DARKROOM_NATS_TLS_CA_FILE` and refuse the server without it (unknown issuer); a plaintext
//! client is refused by the server, and a client that requires TLS refuses a plaintext server;
//! a server that verifies clients (`--tls-verify`) refuses a client without a certificate, or
//! with one another CA signed, and takes one its CA signed. The rendered configs, a cluster's
//! routes included, pass `nats-server -t`, and a rendered TLS cluster routes only between
//! servers whose certificates its CA signed.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use darkroom_nats_auth::Role;
use darkroom_nats_auth::tls::CertificateAuthority;
use darkroom_preprocess::config::PreprocessConfig;
use darkroom_shared::RuntimeConfig;
use darkroom_shared::topology::Topology;
use darkroom_tests::{ClientCertificates, NatsServer, S3Server};
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "photos";
const WAIT: Duration = Duration::from_secs(30);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// A job id no job has: the CLI must connect to learn that.
const NIL_JOB: &str = "00000000-0000-0000-0000-000000000000";

/// A TLS server with the topology provisioned by the provisioner user.
async fn tls_server(client_certificates: ClientCertificates) -> NatsServer {
    let nats = NatsServer::start_tls(client_certificates).await.unwrap();
    let provisioner = jetstream::new(nats.client_as(Role::Provisioner).await.unwrap());
    Topology::default().ensure(&provisioner).await.unwrap();
    nats
}

/// The connection error of `darkroom_shared::nats::connect` with `config`, as text.
async fn connect_error(config: &RuntimeConfig) -> String {
    let result = tokio::time::timeout(
        WAIT,
        darkroom_shared::nats::connect(config, "darkroom-tests"),
    )
    .await
    .expect("connect neither succeeded nor failed in time");
    match result {
        Ok(_) => panic!("connected to {} with {config:?}", config.nats_url),
        Err(error) => error.to_string(),
    }
}

/// The `darkroom` CLI as the operator, with `env` on top of a clean environment (no
/// `DARKROOM_*` or `AWS_*` variable of the caller's).
async fn operator_cli(
    nats: &NatsServer,
    s3: &S3Server,
    env: &[(&str, String)],
    args: &[&str],
) -> (i32, String, String) {
    let mut command = darkroom_tests::clean_command(env!("CARGO_BIN_EXE_darkroom-cli"));
    command
        .args(args)
        .envs(nats.client_env(s3, BUCKET, &nats.seed_file(Role::Operator)))
        .envs(env.iter().map(|(name, value)| (name, value)));
    darkroom_tests::output_of(&mut command, WAIT).await
}

/// The TLS version the server reports for its client connection named `name` (`/connz`).
async fn tls_version_of(nats: &NatsServer, name: &str) -> Option<String> {
    let connz: serde_json::Value = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/connz?limit=1000", nats.monitor_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|connection| connection["name"] == name)
        .and_then(|connection| connection["tls_version"].as_str().map(str::to_owned))
}

/// Preprocess runs in-process as its own user over TLS (the test CA in its
/// `nats_tls_ca_file`): an announced upload becomes a queued job, and the server reports
/// preprocess's connection as TLS. The CLI, a child process with `DARKROOM_NATS_TLS_CA_FILE`,
/// reads the job's status.
#[tokio::test]
async fn the_functions_work_over_tls_with_the_ca() {
    let nats = tls_server(ClientCertificates::NotAsked).await;
    assert!(nats.url().starts_with("tls://"), "{}", nats.url());
    let s3 = S3Server::start(None).await.unwrap();
    let s3_client = s3.client().await;
    darkroom_shared::s3::ensure_bucket(&s3_client, BUCKET)
        .await
        .unwrap();

    assert!(nats.runtime_as(Role::Preprocess).nats_tls_ca_file.is_some());
    let (shutdown, preprocess) = nats.spawn_preprocess_as_its_user(&s3, BUCKET);
    let object = darkroom_tests::put_object(
        &s3_client,
        BUCKET,
        "inbox/desk-setup/over-tls.jpg",
        darkroom_tests::checkerboard_jpeg(0),
    )
    .await;
    let job = object.job_id().unwrap();
    let jobs = nats.announce_and_wait_for_a_job(&object, WAIT).await;
    assert_eq!(jobs.len(), 1);
    let version = tls_version_of(&nats, "darkroom-preprocess").await;
    assert!(
        version.as_deref().is_some_and(|v| v.starts_with("1.")),
        "preprocess's connection: TLS version {version:?}"
    );
    shutdown.cancel();
    preprocess.await.unwrap().unwrap();

    let (code, stdout, stderr) = operator_cli(
        &nats,
        &s3,
        &nats.function_env(),
        &["status", &job.to_string(), "--json"],
    )
    .await;
    assert_eq!(code, 0, "status over TLS: {stdout}{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["status"], "queued");
}

/// Without the CA (the system's roots only) preprocess and the CLI refuse the server's
/// certificate, and say so: unknown issuer; so does a CLI with a `nats://` URL and no TLS
/// setting, which the server upgrades to TLS (an error, where rustls used to panic for want of
/// a crypto provider). A CA that is not a certificate stops them before they connect, naming
/// the file and the setting.
#[tokio::test]
async fn without_the_ca_the_server_is_not_trusted() {
    let nats = tls_server(ClientCertificates::NotAsked).await;
    let s3 = S3Server::start(None).await.unwrap();

    let config = PreprocessConfig {
        runtime: RuntimeConfig {
            nats_tls_ca_file: None,
            s3_endpoint: Some(s3.endpoint()),
            ..nats.runtime_as(Role::Preprocess)
        },
        ..PreprocessConfig::default()
    };
    let error = tokio::time::timeout(
        WAIT,
        darkroom_preprocess::service::serve(config, CancellationToken::new()),
    )
    .await
    .expect("preprocess neither started nor failed in time")
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("UnknownIssuer") && error.contains(&nats.url()),
        "{error}"
    );

    // The CLI: `tls://` in the URL, no CA.
    let (code, stdout, stderr) =
        operator_cli(&nats, &s3, &[], &["status", "--json", NIL_JOB]).await;
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A `nats://` URL and no TLS setting at all: the server asks for TLS, the client follows,
    // and the certificate is refused just the same (an error, not a panic, in a fresh process).
    let plain_url = format!("nats://127.0.0.1:{}", nats.port());
    let (code, stdout, stderr) = operator_cli(
        &nats,
        &s3,
        &[("DARKROOM_NATS_URL", plain_url)],
        &["status", "--json", NIL_JOB],
    )
    .await;
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Another CA's certificate is no better than the system's roots.
    let other = tempfile::tempdir().unwrap();
    let stranger = CertificateAuthority::generate("another CA", DAY).unwrap();
    let stranger_ca = other.path().join("ca.crt");
    std::fs::write(&stranger_ca, stranger.certificate_pem()).unwrap();
    let error = connect_error(&RuntimeConfig {
        nats_tls_ca_file: Some(stranger_ca),
        ..nats.runtime_as(Role::Operator)
    })
    .await;
    assert!(error.contains("UnknownIssuer"), "{error}");

    // The server's key where the CA should be: refused at start, before any connection.
    let key = nats.tls_ca_file().unwrap().with_file_name("tls.key");
    let (code, stdout, stderr) = operator_cli(
        &nats,
        &s3,
        &[("DARKROOM_NATS_TLS_CA_FILE", key.display().to_string())],
        &["status", "--json", NIL_JOB],
    )
    .await;
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("DARKROOM_NATS_TLS_CA_FILE")
            && stderr.contains(&key.display().to_string())
            && stderr.contains("no PEM CERTIFICATE"),
        "{stderr}"
    );
}

/// What a TLS-only server answers a client that speaks plaintext: it reads the `INFO` line
/// (which says TLS is required), sends `CONNECT` and `PING` unencrypted, and returns the
/// `INFO` and what follows until the server closes the connection.
async fn plaintext_exchange(nats: &NatsServer) -> (serde_json::Value, String) {
    let port = nats.port();
    tokio::task::spawn_blocking(move || {
        let (mut reader, stream, info) = darkroom_tests::raw_nats_connection(port);
        let mut writer = stream;
        write!(
            writer,
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\nPING\r\n"
        )
        .unwrap();
        writer.flush().unwrap();
        let mut rest = Vec::new();
        // The server answers (or not) and closes; a reset ends the read as well.
        let _ = std::io::Read::read_to_end(&mut reader, &mut rest);
        (info, String::from_utf8_lossy(&rest).into_owned())
    })
    .await
    .unwrap()
}

/// The TLS-only server refuses a client that speaks plaintext (no `PONG`); a client that
/// requires TLS (`DARKROOM_NATS_TLS_REQUIRED`) refuses a server that does not speak it,
/// instead of sending its traffic in the clear.
#[tokio::test]
async fn plaintext_is_refused_both_ways() {
    let nats = tls_server(ClientCertificates::NotAsked).await;
    let (info, answer) = plaintext_exchange(&nats).await;
    assert_eq!(info["tls_required"], true, "{info}");
    assert!(
        !answer.contains("PONG"),
        "a plaintext client was served: {answer}"
    );

    let plain = NatsServer::start().await.unwrap();
    let insisting = RuntimeConfig {
        nats_url: plain.url(),
        nats_tls_required: true,
        ..RuntimeConfig::default()
    };
    let error = connect_error(&insisting).await;
    assert!(error.contains(&plain.url()), "{error}");
    // The same client without the setting connects: the refusal above is the setting's.
    darkroom_shared::nats::connect(
        &RuntimeConfig {
            nats_tls_required: false,
            ..insisting
        },
        "darkroom-tests",
    )
    .await
    .unwrap();
}

/// A server that verifies clients (`--tls-verify`) refuses a client without a certificate
/// and one with a certificate another CA signed (and its NKey does not help), and takes a
/// client whose certificate its CA signed. The CLI, as a child process, works with the
/// certificate's files in `DARKROOM_NATS_TLS_CERT_FILE` / `_KEY_FILE`.
#[tokio::test]
async fn a_verifying_server_takes_only_certificates_of_its_ca() {
    let nats = tls_server(ClientCertificates::Required).await;
    let with_certificate = nats.runtime_as(Role::Operator);
    assert!(with_certificate.nats_tls_cert_file.is_some());
    darkroom_shared::nats::connect(&with_certificate, "darkroom-tests")
        .await
        .unwrap();

    let (cert, key) = nats.issue_client_certificate("operator").unwrap();
    let client = darkroom_shared::nats::connect(
        &RuntimeConfig {
            nats_tls_cert_file: Some(cert),
            nats_tls_key_file: Some(key),
            ..with_certificate.clone()
        },
        "darkroom-tests",
    )
    .await
    .unwrap();
    // The connection serves requests: JetStream answers over it.
    jetstream::new(client).query_account().await.unwrap();

    let without = RuntimeConfig {
        nats_tls_cert_file: None,
        nats_tls_key_file: None,
        ..with_certificate.clone()
    };
    let error = connect_error(&without).await;
    assert!(error.contains("CertificateRequired"), "{error}");

    let other = tempfile::tempdir().unwrap();
    let stranger = CertificateAuthority::generate("another CA", DAY).unwrap();
    let issued = stranger.issue_client("operator").unwrap();
    let (cert, key) = (other.path().join("c.crt"), other.path().join("c.key"));
    std::fs::write(&cert, &issued.certificate_pem).unwrap();
    std::fs::write(&key, &issued.private_key_pem).unwrap();
    connect_error(&RuntimeConfig {
        nats_tls_cert_file: Some(cert),
        nats_tls_key_file: Some(key),
        ..with_certificate
    })
    .await;
    let log = std::fs::read_to_string(nats.log_path()).unwrap();
    assert!(
        log.contains("TLS handshake error"),
        "the server logged no refused handshake:\n{log}"
    );

    let s3 = S3Server::start(None).await.unwrap();
    let (code, stdout, stderr) = operator_cli(
        &nats,
        &s3,
        &nats.function_env(),
        &["status", "--json", NIL_JOB],
    )
    .await;
    // An unknown job, but answered from the jobs bucket: the CLI got through.
    assert!(
        code != 0 && stderr.contains("is unknown") && !stderr.contains("cannot connect"),
        "{code}: {stdout}{stderr}"
    );
}

/// `nats-server -t` on a config: its exit status and what it printed.
fn nats_server_test(config: &Path) -> (bool, String) {
    let binary =
        darkroom_tests::find_binary(darkroom_tests::NATS_SERVER_BIN_ENV, "nats-server").unwrap();
    let output = std::process::Command::new(binary)
        .args(["-c", &config.display().to_string(), "-t"])
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// The configs `darkroom-nats-config render` writes with TLS (alone, verifying clients, and a
/// cluster member whose routes use it too) are accepted by `nats-server -t`, which loads the
/// certificates; one naming a missing key file is not (so the check reads the files).
#[test]
fn nats_server_accepts_the_rendered_tls_configs() {
    use darkroom_nats_auth::{ClusterSettings, ServerSettings, ServerTls, render};
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("Darkroom test CA", DAY).unwrap();
    let server = ca
        .issue_server(&["nats.example".to_owned(), "127.0.0.1".to_owned()])
        .unwrap();
    ca.write_server_files(dir.path(), &server).unwrap();
    let keys = darkroom_nats_auth::secrets::load_or_create(&dir.path().join("secrets")).unwrap();
    let public_keys = darkroom_nats_auth::secrets::public_keys(&keys);
    let tls = ServerTls {
        cert_file: dir.path().join("tls.crt"),
        key_file: dir.path().join("tls.key"),
        ca_file: Some(dir.path().join("ca.crt")),
        verify_clients: false,
    };
    let cluster = ClusterSettings {
        name: "darkroom".to_owned(),
        listen: "127.0.0.1:6222".to_owned(),
        routes: vec!["nats-route://nats.example:6222".to_owned()],
    };
    let variants = [
        (
            "clients",
            ServerSettings {
                tls: Some(tls.clone()),
                ..ServerSettings::default()
            },
        ),
        (
            "verify",
            ServerSettings {
                tls: Some(ServerTls {
                    verify_clients: true,
                    ..tls.clone()
                }),
                ..ServerSettings::default()
            },
        ),
        (
            "cluster",
            ServerSettings {
                server_name: Some("n1".to_owned()),
                cluster: Some(cluster),
                tls: Some(tls.clone()),
                ..ServerSettings::default()
            },
        ),
    ];
    for (name, settings) in &variants {
        let path = dir.path().join(format!("{name}.conf"));
        let text = render(settings, &public_keys);
        assert!(text.contains("tls {"), "{text}");
        std::fs::write(&path, text).unwrap();
        let (ok, output) = nats_server_test(&path);
        assert!(ok, "{name}: nats-server -t refused it: {output}");
    }

    let broken = dir.path().join("broken.conf");
    let settings = ServerSettings {
        tls: Some(ServerTls {
            key_file: dir.path().join("nope.key"),
            ..tls
        }),
        ..ServerSettings::default()
    };
    std::fs::write(&broken, render(&settings, &public_keys)).unwrap();
    let (ok, output) = nats_server_test(&broken);
    assert!(!ok, "a missing key file passed: {output}");
}

/// A `nats-server` child process, killed when dropped.
struct ServerProcess(std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The servers `/routez` on `monitor_port` reports routes to (by name: nats-server pools
/// several route connections per peer), once it answers.
async fn routed_peers(monitor_port: u16) -> Option<std::collections::BTreeSet<String>> {
    let response = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{monitor_port}/routez"))
        .send()
        .await
        .ok()?;
    let routez: serde_json::Value = response.json().await.ok()?;
    Some(
        routez["routes"]
            .as_array()?
            .iter()
            .filter_map(|route| route["remote_name"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// Two servers rendered as a TLS cluster (`render` with `--cluster-*` and `--tls-*`) form their
/// route over TLS, each verifying the other against the CA; a third whose certificate another
/// CA signed is refused on the routes (the servers log the failed handshakes) and stays alone.
#[tokio::test]
async fn cluster_routes_are_tls_and_verified() {
    use darkroom_nats_auth::{ClusterSettings, ServerSettings, ServerTls, render};
    let binary =
        darkroom_tests::find_binary(darkroom_tests::NATS_SERVER_BIN_ENV, "nats-server").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = darkroom_nats_auth::secrets::load_or_create(&dir.path().join("secrets")).unwrap();
    let public_keys = darkroom_nats_auth::secrets::public_keys(&keys);
    let names = ["127.0.0.1".to_owned(), "localhost".to_owned()];
    let ca = CertificateAuthority::generate("Darkroom test CA", DAY).unwrap();
    ca.write_server_files(&dir.path().join("ours"), &ca.issue_server(&names).unwrap())
        .unwrap();
    let stranger = CertificateAuthority::generate("another CA", DAY).unwrap();
    stranger
        .write_server_files(
            &dir.path().join("theirs"),
            &stranger.issue_server(&names).unwrap(),
        )
        .unwrap();

    // Client, monitoring and route port of each node.
    let ports: Vec<[u16; 3]> = (0..3)
        .map(|_| [(); 3].map(|()| darkroom_tests::reserve_port().unwrap()))
        .collect();
    let start = |index: usize, certificates: &str| {
        let tls_dir = dir.path().join(certificates);
        let settings = ServerSettings {
            listen: format!("127.0.0.1:{}", ports[index][0]),
            monitor: Some(format!("127.0.0.1:{}", ports[index][1])),
            store_dir: Some(dir.path().join(format!("store-{index}"))),
            server_name: Some(format!("n{index}")),
            cluster: Some(ClusterSettings {
                name: "darkroom-tls".to_owned(),
                listen: format!("127.0.0.1:{}", ports[index][2]),
                routes: (0..3)
                    .filter(|other| *other != index)
                    .map(|other| format!("nats-route://127.0.0.1:{}", ports[other][2]))
                    .collect(),
            }),
            tls: Some(ServerTls {
                cert_file: tls_dir.join("tls.crt"),
                key_file: tls_dir.join("tls.key"),
                ca_file: Some(tls_dir.join("ca.crt")),
                verify_clients: false,
            }),
        };
        let config = dir.path().join(format!("n{index}.conf"));
        std::fs::write(&config, render(&settings, &public_keys)).unwrap();
        let log = std::fs::File::create(dir.path().join(format!("n{index}.log"))).unwrap();
        ServerProcess(
            std::process::Command::new(&binary)
                .args(["-c", &config.display().to_string()])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let _servers = [start(0, "ours"), start(1, "ours"), start(2, "theirs")];

    let peers = darkroom_tests::wait_for(
        WAIT,
        || async {
            [
                routed_peers(ports[0][1]).await,
                routed_peers(ports[1][1]).await,
            ]
        },
        |peers| {
            peers
                .iter()
                .all(|peers| peers.as_ref().is_some_and(|p| !p.is_empty()))
        },
    )
    .await;
    let names = |list: &[&str]| Some(list.iter().map(|n| (*n).to_owned()).collect());
    assert_eq!(
        peers,
        [names(&["n1"]), names(&["n0"])],
        "n0 and n1 route to each other only"
    );
    let log = |index: usize| {
        std::fs::read_to_string(dir.path().join(format!("n{index}.log"))).unwrap_or_default()
    };
    darkroom_tests::wait_for(
        WAIT,
        || async { log(0) + &log(1) },
        |logs| logs.contains("TLS route handshake error"),
    )
    .await;
    assert_eq!(
        routed_peers(ports[2][1]).await,
        Some(std::collections::BTreeSet::new()),
        "the node with another CA's certificate joined: {}",
        log(2)
    );
}
