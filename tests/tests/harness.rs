//! Tests of the harness itself: the servers start, answer, restart and run
//! side by side.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use aws_sdk_s3::primitives::ByteStream;
use darkroom_tests::{NatsServer, S3Server};
use tokio::sync::mpsc;

async fn jetstream_context(nats: &NatsServer) -> jetstream::Context {
    nats.jetstream().await.unwrap()
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    let mut stream = js.get_stream(name).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
async fn nats_starts_with_jetstream() {
    let nats = NatsServer::start().await.unwrap();
    assert!(nats.url().starts_with("nats://127.0.0.1:"));
    let js = jetstream_context(&nats).await;
    let account = js.query_account().await.unwrap();
    assert_eq!(account.streams, 0);

    let client = nats.client().await.unwrap();
    let mut sub = client.subscribe("harness.core").await.unwrap();
    client.publish("harness.core", "hi".into()).await.unwrap();
    let message = futures::StreamExt::next(&mut sub).await.unwrap();
    assert_eq!(&message.payload[..], b"hi");
    assert_eq!(nats.function_env(), [("DARKROOM_NATS_URL", nats.url())]);

    let health = reqwest::get(format!(
        "{}/healthz?js-enabled-only=true",
        nats.monitor_url()
    ))
    .await
    .unwrap();
    assert!(health.status().is_success());
}

#[tokio::test]
async fn nats_restart_keeps_streams_and_messages() {
    let mut nats = NatsServer::start().await.unwrap();
    let url = nats.url();
    {
        let js = jetstream_context(&nats).await;
        js.create_stream(stream::Config {
            name: "HARNESS".into(),
            subjects: vec!["harness.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        js.publish("harness.one", "1".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    nats.restart().await.unwrap();
    assert!(nats.is_running());
    assert_eq!(nats.url(), url, "a restart keeps the ports");
    let js = jetstream_context(&nats).await;
    assert_eq!(stream_messages(&js, "HARNESS").await, 1);
    assert_eq!(js.query_account().await.unwrap().streams, 1);
}

#[tokio::test]
async fn nats_kill_then_restart_keeps_the_stream() {
    let mut nats = NatsServer::start().await.unwrap();
    {
        let js = jetstream_context(&nats).await;
        js.create_stream(stream::Config {
            name: "CRASH".into(),
            subjects: vec!["crash.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    nats.kill();
    assert!(!nats.is_running());
    assert!(
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_millis(300))
            .connect(nats.url())
            .await
            .is_err(),
        "a killed server refuses connections"
    );

    nats.restart().await.unwrap();
    let js = jetstream_context(&nats).await;
    assert_eq!(stream_messages(&js, "CRASH").await, 0);
}

#[tokio::test]
async fn s3_put_get_round_trip() {
    let s3 = S3Server::start(None).await.unwrap();
    let client = s3.client().await;
    client
        .create_bucket()
        .bucket("harness")
        .send()
        .await
        .unwrap();

    let key = "inbox/red flower+1 日本.jpg";
    client
        .put_object()
        .bucket("harness")
        .key(key)
        .body(ByteStream::from_static(b"not really a jpeg"))
        .send()
        .await
        .unwrap();
    let object = client
        .get_object()
        .bucket("harness")
        .key(key)
        .send()
        .await
        .unwrap();
    let body = object.body.collect().await.unwrap().into_bytes();
    assert_eq!(&body[..], b"not really a jpeg");

    let listed = client
        .list_objects_v2()
        .bucket("harness")
        .prefix("inbox/")
        .send()
        .await
        .unwrap();
    let keys: Vec<_> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, [key]);
}

#[tokio::test]
async fn s3_rejects_wrong_credentials() {
    let s3 = S3Server::start(None).await.unwrap();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new(s3.region()))
        .endpoint_url(s3.endpoint())
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            s3.access_key(),
            "wrong-secret",
            None,
            None,
            "test",
        ))
        .force_path_style(true)
        .build();
    let wrong = aws_sdk_s3::Client::from_conf(config);
    assert!(wrong.create_bucket().bucket("nope").send().await.is_err());
}

#[tokio::test]
async fn s3_restart_keeps_objects() {
    let mut s3 = S3Server::start(None).await.unwrap();
    let endpoint = s3.endpoint();
    let client = s3.client().await;
    client.create_bucket().bucket("keep").send().await.unwrap();
    client
        .put_object()
        .bucket("keep")
        .key("a.txt")
        .body(ByteStream::from_static(b"kept"))
        .send()
        .await
        .unwrap();

    s3.restart().await.unwrap();
    assert_eq!(s3.endpoint(), endpoint, "a restart keeps the ports");
    let object = s3
        .client()
        .await
        .get_object()
        .bucket("keep")
        .key("a.txt")
        .send()
        .await
        .unwrap();
    assert_eq!(
        &object.body.collect().await.unwrap().into_bytes()[..],
        b"kept"
    );
}

#[tokio::test]
async fn two_s3_servers_do_not_collide() {
    let (a, b) = tokio::join!(S3Server::start(None), S3Server::start(None));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.endpoint(), b.endpoint());

    for (server, content) in [(&a, "from a"), (&b, "from b")] {
        let client = server.client().await;
        client
            .create_bucket()
            .bucket("same-name")
            .send()
            .await
            .unwrap();
        client
            .put_object()
            .bucket("same-name")
            .key("who")
            .body(ByteStream::from(content.as_bytes().to_vec()))
            .send()
            .await
            .unwrap();
    }
    for (server, content) in [(&a, "from a"), (&b, "from b")] {
        let object = server
            .client()
            .await
            .get_object()
            .bucket("same-name")
            .key("who")
            .send()
            .await
            .unwrap();
        let body = object.body.collect().await.unwrap().into_bytes();
        assert_eq!(&body[..], content.as_bytes());
    }
}

#[tokio::test]
async fn s3_posts_events_to_the_webhook() {
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<serde_json::Value>();
    let app = axum::Router::new().route(
        "/v1/events/seaweedfs",
        axum::routing::post(move |axum::Json(event): axum::Json<serde_json::Value>| {
            let events_tx = events_tx.clone();
            async move {
                let _ = events_tx.send(event);
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!(
        "http://{}/v1/events/seaweedfs",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let s3 = S3Server::start(Some(&hook)).await.unwrap();
    assert_eq!(s3.webhook(), Some(hook.as_str()));
    let client = s3.client().await;
    client
        .create_bucket()
        .bucket("hooked")
        .send()
        .await
        .unwrap();
    client
        .put_object()
        .bucket("hooked")
        .key("inbox/photo.jpg")
        .body(ByteStream::from_static(b"jpeg bytes"))
        .send()
        .await
        .unwrap();

    let wanted = "/buckets/hooked/inbox/photo.jpg";
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events_rx.recv().await.unwrap();
            if event["key"] == wanted {
                break event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no webhook event for {wanted}"));
    assert_eq!(event["event_type"], "create");
    assert_eq!(event["message"]["new_entry"]["name"], "photo.jpg");
}
