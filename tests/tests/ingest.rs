//! Ingest against real servers: SeaweedFS posts its webhook to ingest, which puts S3 records on
//! the uploads stream of a real nats-server.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer};
use darkroom_events::s3::{S3Message, encode_key, parse_s3_message};
use darkroom_events::{ObjectRef, S3EventRecord, S3Notification, subjects};
use darkroom_ingest::IngestConfig;
use darkroom_shared::RuntimeConfig;
use darkroom_tests::{NatsServer, S3Server};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "photos";

/// nats-server, SeaweedFS with its webhook pointed at ingest, and ingest itself.
struct Stack {
    nats: NatsServer,
    s3: S3Server,
    s3_client: aws_sdk_s3::Client,
    ingest_addr: std::net::SocketAddr,
    ingest: Option<(
        CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )>,
}

impl Stack {
    async fn start(with_ingest: bool) -> anyhow::Result<Self> {
        let nats = NatsServer::start().await?;
        // Bind first so SeaweedFS can be told the webhook's port before ingest runs.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let ingest_addr = listener.local_addr()?;
        drop(listener);
        let webhook = format!("http://{ingest_addr}/v1/events/seaweedfs");
        let s3 = S3Server::start(Some(&webhook)).await?;
        let s3_client = s3.client().await;
        darkroom_shared::s3::ensure_bucket(&s3_client, BUCKET).await?;
        let mut stack = Stack {
            nats,
            s3,
            s3_client,
            ingest_addr,
            ingest: None,
        };
        if with_ingest {
            stack.start_ingest().await?;
        }
        Ok(stack)
    }

    fn config(&self) -> IngestConfig {
        IngestConfig {
            runtime: RuntimeConfig {
                nats_url: self.nats.url(),
                s3_endpoint: Some(self.s3.endpoint()),
                s3_access_key_id: Some(self.s3.access_key().to_owned()),
                s3_secret_access_key: Some(self.s3.secret_key().to_owned()),
                bucket: BUCKET.to_owned(),
                ..RuntimeConfig::default()
            },
            ingest_listen: self.ingest_addr,
            ingest_reconcile_interval_secs: 0,
            ..IngestConfig::default()
        }
    }

    async fn start_ingest(&mut self) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.ingest_addr).await?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(darkroom_ingest::serve(
            self.config(),
            listener,
            shutdown.clone(),
        ));
        self.ingest = Some((shutdown, task));
        let health = format!("http://{}/healthz", self.ingest_addr);
        for _ in 0..100 {
            if reqwest::get(&health)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("ingest did not become healthy")
    }

    async fn stop_ingest(&mut self) {
        if let Some((shutdown, task)) = self.ingest.take() {
            shutdown.cancel();
            let _ = task.await;
        }
    }

    async fn put(&self, key: &str, body: Vec<u8>) -> String {
        let put = self
            .s3_client
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .body(body.into())
            .send()
            .await
            .unwrap();
        put.e_tag().unwrap().trim_matches('"').to_owned()
    }

    async fn post(&self, route: &str, body: Vec<u8>) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("http://{}{route}", self.ingest_addr))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// Every upload record on the stream, as decoded object keys.
    async fn uploaded_keys(&self) -> anyhow::Result<Vec<String>> {
        let client = async_nats::connect(self.nats.url()).await?;
        let js = jetstream::new(client);
        let stream = js.get_stream(subjects::UPLOADS_STREAM).await?;
        let total = stream.get_info().await?.state.messages;
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await?;
        let mut keys = Vec::new();
        if total == 0 {
            return Ok(keys);
        }
        let mut messages = consumer
            .fetch()
            .max_messages(total as usize)
            .messages()
            .await?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| anyhow::anyhow!(e))?;
            match parse_s3_message(&message.payload).context("uploads stream holds S3 records")? {
                S3Message::Records(records) => {
                    for record in records {
                        keys.push(record.object_ref()?.key);
                    }
                }
                S3Message::TestEvent => {}
            }
        }
        Ok(keys)
    }

    /// Waits until `key` has appeared, then a little longer, and returns how often it appeared.
    async fn count_records(&self, key: &str) -> usize {
        for _ in 0..100 {
            if self.uploaded_keys().await.unwrap().iter().any(|k| k == key) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Late duplicates would arrive within this window.
        tokio::time::sleep(Duration::from_millis(700)).await;
        self.uploaded_keys()
            .await
            .unwrap()
            .iter()
            .filter(|k| *k == key)
            .count()
    }
}

#[tokio::test]
async fn each_put_appears_exactly_once_whatever_its_key() {
    let stack = Stack::start(true).await.unwrap();
    for key in [
        "inbox/portrait.jpg",
        "inbox/red flower+1.jpg",
        "inbox/日本/é.png",
    ] {
        stack
            .put(key, format!("photo bytes of {key}").into_bytes())
            .await;
        assert_eq!(stack.count_records(key).await, 1, "{key}");
    }
    // Nothing outside the inbox, nor any directory or internal entry, was relayed.
    let keys = stack.uploaded_keys().await.unwrap();
    assert_eq!(keys.len(), 3, "{keys:?}");
}

#[tokio::test]
async fn a_multipart_upload_appears_once_with_its_multipart_etag() {
    let stack = Stack::start(true).await.unwrap();
    let key = "inbox/big photo.jpg";
    let s3 = &stack.s3_client;
    let upload = s3
        .create_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id().unwrap();
    let mut parts = Vec::new();
    for (number, body) in [(1, vec![b'a'; 5 << 20]), (2, vec![b'b'; 1000])] {
        let part = s3
            .upload_part()
            .bucket(BUCKET)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(body.into())
            .send()
            .await
            .unwrap();
        parts.push(
            aws_sdk_s3::types::CompletedPart::builder()
                .part_number(number)
                .e_tag(part.e_tag().unwrap())
                .build(),
        );
    }
    let completed = s3
        .complete_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .upload_id(upload_id)
        .multipart_upload(
            aws_sdk_s3::types::CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(completed.e_tag().unwrap().ends_with("-2\""));
    assert_eq!(stack.count_records(key).await, 1);
    assert_eq!(
        stack.uploaded_keys().await.unwrap().len(),
        1,
        "parts must not be relayed"
    );
}

#[tokio::test]
async fn the_same_event_three_times_yields_one_record() {
    let stack = Stack::start(true).await.unwrap();
    let key = "inbox/red flower+1.jpg";
    let etag = stack.put(key, b"one photo".to_vec()).await;
    let object = ObjectRef {
        etag: Some(etag),
        ..ObjectRef::new(BUCKET, key)
    };
    let mut record = S3EventRecord::object_created("minio:s3", &object, None);
    record.event_name = "s3:ObjectCreated:Put".to_owned();
    assert_eq!(record.s3.object.key, encode_key(key));
    let body = serde_json::to_vec(&S3Notification {
        records: vec![record],
    })
    .unwrap();
    for _ in 0..3 {
        let response = stack.post("/v1/events/s3", body.clone()).await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(stack.count_records(key).await, 1);
}

#[tokio::test]
async fn the_reconciler_delivers_what_was_uploaded_while_ingest_was_down() {
    let mut stack = Stack::start(true).await.unwrap();
    stack.stop_ingest().await;
    let key = "inbox/while down.jpg";
    stack.put(key, b"uploaded during an outage".to_vec()).await;
    // SeaweedFS dropped its event: the webhook was unreachable.
    assert!(stack.uploaded_keys().await.unwrap().is_empty());
    stack.start_ingest().await.unwrap();
    assert_eq!(stack.count_records(key).await, 1);
    // A second pass finds the job record and publishes nothing.
    let relay = darkroom_ingest::connect(&stack.config()).await.unwrap();
    let report = darkroom_ingest::reconcile::reconcile(&relay, BUCKET)
        .await
        .unwrap();
    assert_eq!((report.listed, report.published), (1, 0));
    assert_eq!(stack.count_records(key).await, 1);
}

#[tokio::test]
async fn bad_webhook_bodies_get_typed_errors_and_ingest_keeps_working() {
    let stack = Stack::start(true).await.unwrap();
    let cases: [(&str, Vec<u8>, u16); 6] = [
        ("/v1/events/seaweedfs", b"{not json".to_vec(), 400),
        ("/v1/events/s3", b"{not json".to_vec(), 400),
        ("/v1/events/s3", br#"{"hello":"world"}"#.to_vec(), 400),
        ("/v1/events/s3", vec![b' '; 2 << 20], 413),
        (
            "/v1/events/s3",
            br#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"photos"}"#.to_vec(),
            200,
        ),
        (
            "/v1/events/s3",
            br#"{"Records":[{"eventName":"s3:ObjectRemoved:Delete","s3":{"bucket":{"name":"photos"},"object":{"key":"inbox/a.jpg"}}}]}"#.to_vec(),
            200,
        ),
    ];
    for (route, body, status) in cases {
        let response = stack.post(route, body).await;
        assert_eq!(response.status().as_u16(), status, "{route}");
        if status == 400 {
            let error: serde_json::Value = response.json().await.unwrap();
            assert_eq!(error["reason"], "invalid_event");
            assert!(error["error"].as_str().unwrap().contains("bad payload"));
        }
    }
    let key = "inbox/after the noise.jpg";
    stack.put(key, b"still works".to_vec()).await;
    assert_eq!(stack.count_records(key).await, 1);
}
