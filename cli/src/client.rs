//! The connections a command uses, and the S3 and JetStream requests the commands share.

use std::path::Path;

use async_nats::jetstream;
use aws_sdk_s3::primitives::ByteStream;
use darkroom_events::JobId;
use darkroom_events::subjects::{self, JOBS_KV};
use darkroom_shared::RuntimeConfig;
use darkroom_shared::jobs::{JobRecord, JobStore};

use crate::error::{CliError, Result};

/// Name the CLI's NATS connections carry (visible in the server's connection list).
pub const CLIENT_NAME: &str = "darkroom-cli";

/// The configuration plus lazily made NATS and S3 clients.
pub struct Clients {
    /// Settings (`DARKROOM_*`, `DARKROOM_CONFIG`, `--bucket`).
    pub config: RuntimeConfig,
    nats: Option<async_nats::Client>,
    s3: Option<aws_sdk_s3::Client>,
}

impl Clients {
    /// Clients for `config`; nothing is connected yet.
    pub fn new(config: RuntimeConfig) -> Self {
        Clients {
            config,
            nats: None,
            s3: None,
        }
    }

    /// The NATS connection, made on first use.
    pub async fn nats(&mut self) -> Result<async_nats::Client> {
        if let Some(client) = &self.nats {
            return Ok(client.clone());
        }
        let client = darkroom_shared::nats::connect(&self.config, CLIENT_NAME).await?;
        self.nats = Some(client.clone());
        Ok(client)
    }

    /// A JetStream context on the NATS connection.
    pub async fn jetstream(&mut self) -> Result<jetstream::Context> {
        Ok(jetstream::new(self.nats().await?))
    }

    /// The S3 client, made on first use.
    pub async fn s3(&mut self) -> aws_sdk_s3::Client {
        if let Some(client) = &self.s3 {
            return client.clone();
        }
        let client = darkroom_shared::s3::client(&self.config).await;
        self.s3 = Some(client.clone());
        client
    }

    /// Where S3 requests go, for error messages.
    pub fn s3_endpoint(&self) -> String {
        self.config
            .s3_endpoint
            .clone()
            .unwrap_or_else(|| format!("AWS ({})", self.config.s3_region))
    }

    /// A NATS error naming the server.
    pub fn nats_error(
        &self,
        operation: impl Into<String>,
        error: impl std::fmt::Display,
    ) -> CliError {
        CliError::Nats {
            url: self.config.nats_url.clone(),
            operation: operation.into(),
            message: error.to_string(),
        }
    }

    /// An S3 error naming the endpoint and object.
    pub fn s3_error(
        &self,
        operation: &'static str,
        bucket: &str,
        key: &str,
        message: impl std::fmt::Display,
    ) -> CliError {
        CliError::S3 {
            operation,
            endpoint: self.s3_endpoint(),
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            message: message.to_string(),
        }
    }

    /// The job's record in the jobs KV bucket and its revision, if it has one.
    pub async fn job_record(&mut self, job: JobId) -> Result<Option<(JobRecord, u64)>> {
        let js = self.jetstream().await?;
        let store = JobStore::open(&js)
            .await
            .map_err(|e| self.nats_error(format!("open the KV bucket {JOBS_KV}"), e))?;
        Ok(store.get(job).await?)
    }

    /// The last message stored on `subject` in `stream`, if any.
    pub async fn last_message(
        &mut self,
        stream: &str,
        subject: &str,
    ) -> Result<Option<jetstream::message::StreamMessage>> {
        let js = self.jetstream().await?;
        let handle = js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| self.nats_error(format!("open stream {stream}"), e))?;
        match handle.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(Some(message)),
            Err(error)
                if error.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                Ok(None)
            }
            Err(error) => Err(self.nats_error(
                format!("read the last message on {subject} in {stream}"),
                error,
            )),
        }
    }

    /// An ordered consumer on `stream` reading the messages on `filter` from the first stored.
    pub async fn replay_from_start(
        &mut self,
        stream: &str,
        filter: &str,
    ) -> Result<jetstream::consumer::Consumer<jetstream::consumer::pull::OrderedConfig>> {
        let js = self.jetstream().await?;
        let handle = js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| self.nats_error(format!("open stream {stream}"), e))?;
        handle
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.to_owned(),
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| self.nats_error(format!("ordered consumer on {stream} ({filter})"), e))
    }

    /// The last lifecycle event of `kind` of the job stored on the events stream.
    pub async fn last_event(
        &mut self,
        job: JobId,
        kind: darkroom_events::LifecycleKind,
    ) -> Result<Option<bytes::Bytes>> {
        let subject = subjects::lifecycle_subject(job, kind);
        Ok(self
            .last_message(subjects::EVENTS_STREAM, &subject)
            .await?
            .map(|message| message.payload))
    }

    /// Downloads `s3://bucket/key` into the file `to` (written beside it, then renamed, so an
    /// interrupted download never leaves a partial file under the final name).
    pub async fn download(&mut self, bucket: &str, key: &str, to: &Path) -> Result<u64> {
        let s3 = self.s3().await;
        let object = s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| {
                self.s3_error("GET", bucket, key, darkroom_shared::s3::describe_error(&e))
            })?;
        let body = object
            .body
            .collect()
            .await
            .map_err(|e| self.s3_error("GET", bucket, key, e))?
            .into_bytes();
        let partial = to.with_extension("part");
        std::fs::write(&partial, &body).map_err(|e| CliError::io(&partial, e))?;
        std::fs::rename(&partial, to).map_err(|e| CliError::io(to, e))?;
        Ok(body.len() as u64)
    }

    /// Uploads `body` to `s3://bucket/key`; returns the ETag the server gave, normalised.
    pub async fn upload(
        &mut self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        subject: Option<&str>,
    ) -> Result<Option<String>> {
        let s3 = self.s3().await;
        let mut put = s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body));
        // Cleaned as preprocess would: a header value cannot hold a line break.
        if let Some(subject) = subject.and_then(darkroom_shared::preset::clean_subject) {
            put = put.metadata("subject", subject);
        }
        let output = put.send().await.map_err(|e| {
            self.s3_error("PUT", bucket, key, darkroom_shared::s3::describe_error(&e))
        })?;
        Ok(output.e_tag().map(darkroom_events::s3::normalize_etag))
    }
}
