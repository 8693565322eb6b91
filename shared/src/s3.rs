//! The S3 client: AWS, or any S3-compatible server at a custom endpoint.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::RuntimeConfig;

/// Builds an S3 client from the configuration: static keys when configured, else the usual AWS
/// credential chain (environment, profile, web identity, container and instance metadata).
pub async fn client(config: &RuntimeConfig) -> aws_sdk_s3::Client {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(config.s3_region.clone()));
    if let (Some(key), Some(secret)) = (&config.s3_access_key_id, &config.s3_secret_access_key) {
        loader = loader.credentials_provider(Credentials::new(
            key,
            secret,
            None,
            None,
            "darkroom-config",
        ));
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_s3::config::Builder::from(&shared).timeout_config(timeouts(config));
    if let Some(endpoint) = &config.s3_endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    let path_style = config
        .s3_force_path_style
        .unwrap_or(config.s3_endpoint.is_some());
    aws_sdk_s3::Client::from_conf(builder.force_path_style(path_style).build())
}

/// Every S3 call's timeouts: connect, first byte and the whole call (each attempt and all of
/// them), so a stalled server turns into a transient error instead of a call that never
/// returns.
fn timeouts(config: &RuntimeConfig) -> TimeoutConfig {
    let secs = |value: f64, default: u64| {
        Duration::try_from_secs_f64(value)
            .ok()
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(default))
    };
    let operation = secs(config.s3_operation_timeout_secs, 120);
    TimeoutConfig::builder()
        .connect_timeout(secs(config.s3_connect_timeout_secs, 5))
        .read_timeout(secs(config.s3_read_timeout_secs, 30))
        .operation_attempt_timeout(operation)
        .operation_timeout(operation)
        .build()
}

/// Creates `bucket` unless it exists already (idempotent, for provisioning and tests).
pub async fn ensure_bucket(client: &aws_sdk_s3::Client, bucket: &str) -> crate::Result<()> {
    if client.head_bucket().bucket(bucket).send().await.is_ok() {
        return Ok(());
    }
    match client.create_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(()),
        Err(error) => {
            let owned = error.as_service_error().is_some_and(|e| {
                e.is_bucket_already_owned_by_you() || e.is_bucket_already_exists()
            });
            if owned {
                Ok(())
            } else {
                Err(crate::RuntimeError::Storage(format!(
                    "create bucket {bucket}: {}",
                    describe_error(&error)
                )))
            }
        }
    }
}

/// An S3 error in one line: the service's code, HTTP status and message, or the causes that
/// kept the request from an answer (a refused connection, a timeout). The SDK's own
/// `DisplayErrorContext` also prints the raw response, kilobytes of it.
pub fn describe_error<E>(error: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if let SdkError::ServiceError(service) = error {
        let status = service.raw().status().as_u16();
        let err = service.err();
        return match (err.code(), err.message()) {
            (Some(code), Some(message)) => format!("{code} (HTTP {status}): {message}"),
            (Some(code), None) => format!("{code} (HTTP {status})"),
            _ => format!("HTTP {status}: {err}"),
        };
    }
    crate::error_chain(error)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, Instant};

    use darkroom_events::ObjectRef;

    use super::*;

    /// A server that accepts connections and never answers.
    async fn stalled_server() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        (endpoint, task)
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_a_transient_error_not_a_hang() {
        let (endpoint, server) = stalled_server().await;
        let config = RuntimeConfig {
            s3_endpoint: Some(endpoint),
            s3_access_key_id: Some("key".to_owned()),
            s3_secret_access_key: Some("secret".to_owned()),
            s3_read_timeout_secs: 0.5,
            s3_operation_timeout_secs: 2.0,
            ..RuntimeConfig::default()
        };
        let s3 = client(&config).await;
        let started = Instant::now();
        let object = ObjectRef::new("photos", "inbox/a.jpg");
        let outcome =
            tokio::time::timeout(Duration::from_secs(30), crate::fetch::head(&s3, &object))
                .await
                .expect("the S3 call must give up by itself");
        let error = outcome.unwrap_err();
        assert!(!error.is_permanent(), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        server.abort();
    }
}
