//! The S3 bucket, its lifecycle rule expiring intermediate objects, and (not managed here) its
//! event notification.

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::types::{
    BucketLifecycleConfiguration, ExpirationStatus, LifecycleExpiration, LifecycleRule,
    LifecycleRuleFilter,
};
use darkroom_shared::topology::diff::FieldChange;

use crate::ProvisionError;
use crate::config::ProvisionConfig;
use crate::plan::{Action, Item};

/// The id of the lifecycle rule this tool owns; other rules on the bucket are kept as they are.
pub const WORK_EXPIRY_RULE_ID: &str = "darkroom-work-expiry";

/// Why the bucket notification is not managed here.
pub const NOTIFICATION_NOT_MANAGED: &str = "AWS: the CloudFormation template's S3 -> preprocess \
     Lambda notification on inbox/; SeaweedFS: notification.toml on the filer, posting to \
     darkroom-ingest";

/// The plan for the bucket, its lifecycle rule and its notification.
pub async fn plan(
    s3: &aws_sdk_s3::Client,
    config: &ProvisionConfig,
) -> Result<Vec<Item>, ProvisionError> {
    let bucket = &config.runtime.bucket;
    let exists = bucket_exists(s3, bucket).await?;
    let lifecycle = if exists {
        let rules = lifecycle_rules(s3, bucket).await?;
        match rules
            .iter()
            .find(|rule| rule.id() == Some(WORK_EXPIRY_RULE_ID))
        {
            None => Action::Create,
            Some(rule) => {
                let changes = rule_changes(rule, config);
                if changes.is_empty() {
                    Action::NoChange
                } else {
                    Action::Update(changes)
                }
            }
        }
    } else {
        Action::Create
    };
    Ok(vec![
        Item {
            resource: format!("bucket {bucket}"),
            action: if exists {
                Action::NoChange
            } else {
                Action::Create
            },
        },
        Item {
            resource: format!("lifecycle {bucket}"),
            action: lifecycle,
        },
        Item {
            resource: format!("notification {bucket}"),
            action: Action::NotManaged(NOTIFICATION_NOT_MANAGED.to_owned()),
        },
    ])
}

/// Creates the bucket if missing and puts the lifecycle rule if it is missing or differs,
/// keeping the bucket's other rules.
pub async fn apply(
    s3: &aws_sdk_s3::Client,
    config: &ProvisionConfig,
) -> Result<(), ProvisionError> {
    let bucket = &config.runtime.bucket;
    darkroom_shared::s3::ensure_bucket(s3, bucket)
        .await
        .map_err(|e| ProvisionError::S3(e.to_string()))?;
    let mut rules = lifecycle_rules(s3, bucket).await?;
    let ours = rules
        .iter()
        .find(|rule| rule.id() == Some(WORK_EXPIRY_RULE_ID));
    if ours.is_some_and(|rule| rule_changes(rule, config).is_empty()) {
        return Ok(());
    }
    rules.retain(|rule| rule.id() != Some(WORK_EXPIRY_RULE_ID));
    rules.push(wanted_rule(config)?);
    let lifecycle = BucketLifecycleConfiguration::builder()
        .set_rules(Some(rules))
        .build()
        .map_err(|e| ProvisionError::S3(format!("lifecycle of {bucket}: {e}")))?;
    s3.put_bucket_lifecycle_configuration()
        .bucket(bucket)
        .lifecycle_configuration(lifecycle)
        .send()
        .await
        .map_err(|e| {
            ProvisionError::S3(format!(
                "put lifecycle of {bucket}: {}",
                DisplayErrorContext(e)
            ))
        })?;
    Ok(())
}

/// The rule's fields that differ from what `config` wants.
fn rule_changes(rule: &LifecycleRule, config: &ProvisionConfig) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    let prefix = rule_prefix(rule).unwrap_or_default();
    if prefix != config.work_prefix {
        changes.push(change(
            "prefix",
            format!("{prefix:?}"),
            format!("{:?}", config.work_prefix),
        ));
    }
    let days = rule.expiration().and_then(LifecycleExpiration::days);
    let wanted_days = i32::try_from(config.work_expiry_days).ok();
    if days != wanted_days {
        let show =
            |days: Option<i32>| days.map_or_else(|| "none".to_owned(), |d| format!("{d} days"));
        changes.push(change("expiration", show(days), show(wanted_days)));
    }
    if rule.status() != &ExpirationStatus::Enabled {
        changes.push(change("status", rule.status().as_str(), "Enabled"));
    }
    changes
}

fn change(field: &'static str, from: impl Into<String>, to: impl Into<String>) -> FieldChange {
    FieldChange {
        field,
        from: from.into(),
        to: to.into(),
        data_loss: None,
        recreate: false,
    }
}

/// The rule's key prefix, from its filter or from the older top-level `Prefix`.
#[allow(deprecated)]
fn rule_prefix(rule: &LifecycleRule) -> Option<String> {
    rule.filter()
        .and_then(LifecycleRuleFilter::prefix)
        .or(rule.prefix())
        .map(str::to_owned)
}

fn wanted_rule(config: &ProvisionConfig) -> Result<LifecycleRule, ProvisionError> {
    let days = i32::try_from(config.work_expiry_days).map_err(|_| {
        ProvisionError::S3(format!(
            "work_expiry_days {} is too large",
            config.work_expiry_days
        ))
    })?;
    LifecycleRule::builder()
        .id(WORK_EXPIRY_RULE_ID)
        .filter(
            LifecycleRuleFilter::builder()
                .prefix(config.work_prefix.clone())
                .build(),
        )
        .expiration(LifecycleExpiration::builder().days(days).build())
        .status(ExpirationStatus::Enabled)
        .build()
        .map_err(|e| ProvisionError::S3(format!("lifecycle rule: {e}")))
}

async fn bucket_exists(s3: &aws_sdk_s3::Client, bucket: &str) -> Result<bool, ProvisionError> {
    match s3.head_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(true),
        Err(error) if error.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(false),
        Err(error) => Err(ProvisionError::S3(format!(
            "head bucket {bucket}: {}",
            DisplayErrorContext(error)
        ))),
    }
}

/// The bucket's lifecycle rules; none when it has no lifecycle configuration.
async fn lifecycle_rules(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
) -> Result<Vec<LifecycleRule>, ProvisionError> {
    match s3
        .get_bucket_lifecycle_configuration()
        .bucket(bucket)
        .send()
        .await
    {
        Ok(output) => Ok(output.rules().to_vec()),
        Err(error)
            if error
                .as_service_error()
                .and_then(aws_sdk_s3::error::ProvideErrorMetadata::code)
                == Some("NoSuchLifecycleConfiguration") =>
        {
            Ok(Vec::new())
        }
        Err(error) => Err(ProvisionError::S3(format!(
            "get lifecycle of {bucket}: {}",
            DisplayErrorContext(error)
        ))),
    }
}
