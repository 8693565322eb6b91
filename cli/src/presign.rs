//! Presigned S3 URLs, for people and programs without S3 credentials:
//!
//! - `darkroom url JOB [--expires-in 15m] [--metadata]`: a GET URL of a finished job's
//!   `result.png` (or `job.json`);
//! - `darkroom upload-url --preset NAME FILE_NAME [--expires-in 15m]`: a PUT URL for
//!   `inbox/<preset>/<file name>`, what an app hands to a browser or a phone to upload straight
//!   into the studio's inbox (the upload then goes through the pipeline like any other).
//!
//! The URL is printed alone on stdout; the key, the expiry and the headers the PUT must send
//! (they are part of the signature) go to stderr. URLs are signed with the caller's own S3
//! credentials (SigV4 query parameters), so they grant exactly that identity's access to that
//! one object, until they expire: S3 refuses them afterwards (`403 AccessDenied`, "Request has
//! expired").

use std::path::Path;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::presigning::{PresignedRequest, PresigningConfig};
use darkroom_events::JobId;

use crate::client::Clients;
use crate::error::{CliError, Result};
use crate::lookup::JobState;

/// The longest validity SigV4 allows for a presigned URL: 7 days.
pub const MAX_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default validity, when `--expires-in` is not given.
pub const DEFAULT_EXPIRY: &str = "15m";

/// Content types an upload URL may be signed for: what preprocess accepts (it sniffs the bytes
/// anyway; the type only tells S3 what to store).
pub const UPLOAD_CONTENT_TYPES: [&str; 3] = ["image/jpeg", "image/png", "image/webp"];

/// Arguments of `darkroom upload-url`.
#[derive(Debug, Clone, clap::Args)]
pub struct UploadUrlArgs {
    /// The object's file name (`photo.jpg`): the key is `<key-prefix><preset>/<file name>`.
    pub file_name: String,
    /// The preset: the folder under the inbox (`profile-warm`, `storybook`, …).
    #[arg(long)]
    pub preset: String,
    /// How long the URL works: `90s`, `15m`, `2h`, `7d` (at most 7 days).
    #[arg(long, default_value = DEFAULT_EXPIRY, value_parser = parse_expiry)]
    pub expires_in: Duration,
    /// The Content-Type the upload must send (signed into the URL): image/jpeg, image/png or
    /// image/webp. By default the file name's extension decides.
    #[arg(long)]
    pub content_type: Option<String>,
    /// Key prefix of the inbox.
    #[arg(long, default_value = "inbox/")]
    pub key_prefix: String,
}

/// Parses a validity: a humantime duration (`90s`, `15m`, `1h 30m`, `7d`), at least one second
/// and at most [`MAX_EXPIRY`].
pub fn parse_expiry(text: &str) -> std::result::Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration such as 15m, 2h or 7d: {e}"))?;
    if duration < Duration::from_secs(1) {
        return Err(format!("{text:?}: a URL must be valid for at least 1s"));
    }
    if duration > MAX_EXPIRY {
        return Err(format!(
            "{text:?}: S3 signatures are valid for at most 7 days"
        ));
    }
    Ok(duration)
}

/// The content type for an upload named `file_name`: `explicit` if given (one of
/// [`UPLOAD_CONTENT_TYPES`]), else from the extension.
pub fn upload_content_type(file_name: &str, explicit: Option<&str>) -> Result<&'static str> {
    if let Some(explicit) = explicit {
        return UPLOAD_CONTENT_TYPES
            .iter()
            .find(|known| known.eq_ignore_ascii_case(explicit))
            .copied()
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "--content-type {explicit:?}: uploads are {}",
                    UPLOAD_CONTENT_TYPES.join(", ")
                ))
            });
    }
    let extension = Path::new(file_name)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("jpg" | "jpeg") => Ok("image/jpeg"),
        Some("png") => Ok("image/png"),
        Some("webp") => Ok("image/webp"),
        _ => Err(CliError::Usage(format!(
            "{file_name:?}: name the file .jpg, .png or .webp, or give --content-type"
        ))),
    }
}

fn presigning(expires_in: Duration) -> Result<PresigningConfig> {
    PresigningConfig::builder()
        .start_time(SystemTime::now())
        .expires_in(expires_in)
        .build()
        .map_err(|e| CliError::Usage(format!("--expires-in: {e}")))
}

/// Prints the URL on stdout and what goes with it on stderr.
fn print(request: &PresignedRequest, bucket: &str, key: &str, expires_in: Duration) {
    let expires_at = chrono::Utc::now()
        + chrono::Duration::from_std(expires_in).unwrap_or(chrono::Duration::zero());
    eprintln!("object    s3://{bucket}/{key}");
    eprintln!(
        "expires   {} (in {})",
        expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        humantime::format_duration(expires_in)
    );
    let headers: Vec<(&str, &str)> = request.headers().collect();
    for (name, value) in &headers {
        eprintln!("header    {name}: {value}");
    }
    if request.method() == "PUT" {
        let header_flags: String = headers
            .iter()
            .map(|(name, value)| format!(" -H '{name}: {value}'"))
            .collect();
        eprintln!(
            "upload    curl -fsS -X PUT -T FILE{header_flags} \"$URL\"   (URL: the line on stdout)"
        );
    }
    println!("{}", request.uri());
}

/// Runs `darkroom url`.
pub async fn run_url(
    clients: &mut Clients,
    job: JobId,
    expires_in: Duration,
    metadata: bool,
) -> Result<()> {
    let state = JobState::load(clients, job).await?;
    if !state.is_known() {
        return Err(CliError::UnknownJob { job });
    }
    let Some(location) = state.result() else {
        return Err(CliError::NoResult {
            job,
            status: state.status(),
        });
    };
    let key = if metadata {
        &location.metadata_key
    } else {
        &location.image_key
    };
    let config = presigning(expires_in)?;
    let s3 = clients.s3().await;
    let request = s3
        .get_object()
        .bucket(&location.bucket)
        .key(key)
        .presigned(config)
        .await
        .map_err(|e| {
            clients.s3_error(
                "presign GET",
                &location.bucket,
                key,
                darkroom_shared::s3::describe_error(&e),
            )
        })?;
    print(&request, &location.bucket, key, expires_in);
    Ok(())
}

/// Runs `darkroom upload-url`.
pub async fn run_upload_url(clients: &mut Clients, args: &UploadUrlArgs) -> Result<()> {
    if args.file_name.contains('/') || args.file_name.trim().is_empty() {
        return Err(CliError::Usage(format!(
            "{:?}: give a file name, without folders",
            args.file_name
        )));
    }
    let key =
        crate::upload::object_key(&args.key_prefix, &args.preset, Path::new(&args.file_name))?;
    let content_type = upload_content_type(&args.file_name, args.content_type.as_deref())?;
    let bucket = clients.config.bucket.clone();
    let config = presigning(args.expires_in)?;
    let s3 = clients.s3().await;
    let request = s3
        .put_object()
        .bucket(&bucket)
        .key(&key)
        .content_type(content_type)
        .presigned(config)
        .await
        .map_err(|e| {
            clients.s3_error(
                "presign PUT",
                &bucket,
                &key,
                darkroom_shared::s3::describe_error(&e),
            )
        })?;
    print(&request, &bucket, &key, args.expires_in);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn expiries_are_humantime_between_a_second_and_seven_days() {
        assert_eq!(parse_expiry("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_expiry("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_expiry("7d").unwrap(), MAX_EXPIRY);
        assert!(parse_expiry("8d").unwrap_err().contains("7 days"));
        assert!(parse_expiry("0s").unwrap_err().contains("at least"));
        assert!(parse_expiry("soon").is_err());
        assert!(parse_expiry("15").is_err(), "a unit is required");
    }

    #[test]
    fn content_types_come_from_the_extension_or_the_allow_list() {
        assert_eq!(upload_content_type("a.JPG", None).unwrap(), "image/jpeg");
        assert_eq!(upload_content_type("a.jpeg", None).unwrap(), "image/jpeg");
        assert_eq!(upload_content_type("a.png", None).unwrap(), "image/png");
        assert_eq!(upload_content_type("a.webp", None).unwrap(), "image/webp");
        assert!(upload_content_type("a.gif", None).is_err());
        assert!(upload_content_type("noext", None).is_err());
        assert_eq!(
            upload_content_type("noext", Some("IMAGE/PNG")).unwrap(),
            "image/png"
        );
        assert!(upload_content_type("a.jpg", Some("text/html")).is_err());
    }
}
