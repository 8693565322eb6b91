//! The operator's view against a live run: ingest, preprocess, the notifier and a worker as
//! child processes, each serving `/metrics`; one upload goes from SeaweedFS's event to a
//! webhook, then every function is scraped and every metric that `infra/grafana/darkroom.json`
//! and `infra/grafana/alerts.yaml` query must be among what they export.

use std::collections::BTreeSet;
use std::path::Path;

use super::*;

/// The metric names a Prometheus text exposition holds (a histogram also by its base name).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name: String = line
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                names.insert(base.to_owned());
            }
        }
        names.insert(name);
    }
    names
}

/// `darkroom_…` names in a query, a histogram's series counted as the histogram.
fn queried_names(expr: &str, into: &mut BTreeSet<String>) {
    let mut rest = expr;
    while let Some(start) = rest.find("darkroom_") {
        let tail = &rest[start..];
        let name: String = tail
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        rest = &tail[name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        into.insert(base.to_owned());
    }
}

/// What the dashboard's panels and the alert rules query.
fn queried_by_dashboard_and_rules() -> BTreeSet<String> {
    let grafana = darkroom_tests::repo_root().join("infra/grafana");
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(grafana.join("darkroom.json")).unwrap()).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queried_names(target["expr"].as_str().unwrap(), &mut queried);
        }
    }
    let rules = std::fs::read_to_string(grafana.join("alerts.yaml")).unwrap();
    for line in rules.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr:") {
            queried_names(expr, &mut queried);
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    queried
}

/// A function as a child process with its metrics on `metrics_port`.
fn spawn(
    program: &str,
    env: &[(&str, String)],
    metrics_port: u16,
    log: &Path,
) -> tokio::process::Child {
    darkroom_tests::clean_command(program)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("DARKROOM_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("RUST_LOG", "info,async_nats=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn scrape(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported_by_a_running_function() {
    let queried = queried_by_dashboard_and_rules();
    let (nats, s3, s3_client, ingest_port) = darkroom_tests::servers_for_ingest(BUCKET).await;
    let js = nats.jetstream().await.unwrap();
    Topology::default().ensure(&js).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let presets = dir.path().join("presets");
    std::fs::create_dir(&presets).unwrap();
    for (name, text) in PRESETS {
        std::fs::write(presets.join(format!("{name}.toml")), text).unwrap();
    }
    let receiver = Receiver::start(Vec::new()).await;
    let endpoints = dir.path().join("endpoints.toml");
    std::fs::write(
        &endpoints,
        format!(
            "[[endpoints]]\nid = \"studio\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\nallow_networks = [\"loopback\"]\n",
            receiver.url()
        ),
    )
    .unwrap();
    let studio = darkroom_test_support::tiny_studio();
    let mut common: Vec<(&str, String)> = nats.function_env();
    common.extend(s3.function_env());
    common.push(("DARKROOM_BUCKET", BUCKET.to_owned()));

    let ports: Vec<u16> = (0..4)
        .map(|_| darkroom_tests::reserve_port().unwrap())
        .collect();
    let mut ingest_env = common.clone();
    ingest_env.push(("DARKROOM_INGEST_LISTEN", format!("127.0.0.1:{ingest_port}")));
    let mut preprocess_env = common.clone();
    preprocess_env.push((
        "DARKROOM_PREPROCESS_PRESET_DIR",
        presets.display().to_string(),
    ));
    let mut notifier_env = common.clone();
    notifier_env.push((
        "DARKROOM_NOTIFIER_ENDPOINTS_FILE",
        endpoints.display().to_string(),
    ));
    let mut worker_env = common.clone();
    worker_env.extend([
        ("DARKROOM_MODEL", studio.join("model").display().to_string()),
        (
            "DARKROOM_CONTROLNET_DIR",
            studio.join("controlnets").display().to_string(),
        ),
        ("DARKROOM_DEVICE", "cpu".to_owned()),
        ("DARKROOM_WORKER_NAME", "gpu-metrics".to_owned()),
    ]);
    let _children = [
        spawn(
            env!("CARGO_BIN_EXE_tested-darkroom-ingest"),
            &ingest_env,
            ports[0],
            &dir.path().join("ingest.log"),
        ),
        spawn(
            env!("CARGO_BIN_EXE_tested-darkroom-preprocess"),
            &preprocess_env,
            ports[1],
            &dir.path().join("preprocess.log"),
        ),
        spawn(
            env!("CARGO_BIN_EXE_tested-darkroom-notifier"),
            &notifier_env,
            ports[2],
            &dir.path().join("notifier.log"),
        ),
        spawn(
            env!("CARGO_BIN_EXE_darkroom-inference-worker"),
            &worker_env,
            ports[3],
            &dir.path().join("worker.log"),
        ),
    ];
    // The worker consumes once its model is loaded: it says so on /metrics.
    darkroom_tests::wait_for(
        WAIT,
        || async {
            match reqwest::get(format!("http://127.0.0.1:{}/metrics", ports[3])).await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            }
        },
        |text| text.contains("darkroom_worker_ready 1"),
    )
    .await;

    // One upload, announced by SeaweedFS's own event, through to its webhook.
    stack_upload(&s3_client, "tiny-desk", "metrics.jpg").await;
    darkroom_tests::wait_for(WAIT, || async { receiver.received().len() }, |n| *n >= 1).await;

    let mut exported = BTreeSet::new();
    for port in &ports {
        exported.extend(exported_names(&scrape(*port).await));
    }
    let missing: Vec<&String> = queried.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queried by infra/grafana but exported by no function: {missing:?}\nexported: {exported:?}"
    );
}

async fn stack_upload(s3: &aws_sdk_s3::Client, preset: &str, name: &str) {
    darkroom_tests::put_object(s3, BUCKET, &format!("inbox/{preset}/{name}"), photo_jpeg(7)).await;
}
