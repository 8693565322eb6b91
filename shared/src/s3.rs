//! The S3 client: AWS, or any S3-compatible server at a custom endpoint.

use aws_config::BehaviorVersion;
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
    let mut builder = aws_sdk_s3::config::Builder::from(&shared);
    if let Some(endpoint) = &config.s3_endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    let path_style = config
        .s3_force_path_style
        .unwrap_or(config.s3_endpoint.is_some());
    aws_sdk_s3::Client::from_conf(builder.force_path_style(path_style).build())
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
