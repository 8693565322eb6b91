//! Streams, KV buckets and consumers: planned with the same diff [`Topology::ensure`] uses,
//! applied with the changes it refuses too when forced.

use async_nats::jetstream::{self, stream};
use darkroom_shared::topology::{self, Topology, diff};

use crate::ProvisionError;
use crate::plan::{Action, Item};

/// The plan for every stream, KV bucket and consumer of `topology`.
pub async fn plan(
    js: &jetstream::Context,
    topology: &Topology,
) -> Result<Vec<Item>, ProvisionError> {
    let mut items = Vec::new();
    for wanted in topology.streams() {
        let action = stream_action(js, &wanted).await?;
        items.push(Item {
            resource: format!("stream {}", wanted.name),
            action,
        });
    }
    for wanted in topology.key_values() {
        let action = stream_action(js, &diff::kv_stream_config(&wanted)).await?;
        items.push(Item {
            resource: format!("kv {}", wanted.bucket),
            action,
        });
    }
    for (stream, wanted) in topology.consumers() {
        let name = wanted.durable_name.clone().unwrap_or_default();
        let action = match topology::consumer_info(js, stream, &name).await? {
            None => Action::Create,
            Some(info) => update_or_not(diff::consumer_changes(&wanted, &info.config)),
        };
        items.push(Item {
            resource: format!("consumer {stream}/{name}"),
            action,
        });
    }
    Ok(items)
}

/// Makes every stream, KV bucket and consumer of `topology` as wanted, deciding afresh for
/// each (a stream created again loses its consumers, which are then created again after it).
/// The caller has checked the refusals: changes that lose data are made.
pub async fn apply(js: &jetstream::Context, topology: &Topology) -> Result<(), ProvisionError> {
    for wanted in topology.streams() {
        let name = wanted.name.clone();
        match stream_action(js, &wanted).await? {
            Action::Create => {
                js.create_stream(wanted)
                    .await
                    .map_err(|e| nats_error(format!("create stream {name}"), e))?;
            }
            Action::Update(changes) => {
                if diff::needs_recreate(&changes) {
                    js.delete_stream(&name)
                        .await
                        .map_err(|e| nats_error(format!("delete stream {name}"), e))?;
                    js.create_stream(wanted)
                        .await
                        .map_err(|e| nats_error(format!("create stream {name}"), e))?;
                } else {
                    js.update_stream(wanted)
                        .await
                        .map_err(|e| nats_error(format!("update stream {name}"), e))?;
                }
            }
            Action::NoChange | Action::NotManaged(_) => {}
        }
    }
    for wanted in topology.key_values() {
        let name = wanted.bucket.clone();
        match stream_action(js, &diff::kv_stream_config(&wanted)).await? {
            Action::NoChange | Action::NotManaged(_) => continue,
            Action::Update(changes) if diff::needs_recreate(&changes) => {
                js.delete_key_value(&name)
                    .await
                    .map_err(|e| nats_error(format!("delete KV {name}"), e))?;
            }
            Action::Create | Action::Update(_) => {}
        }
        js.create_or_update_key_value(wanted)
            .await
            .map_err(|e| nats_error(format!("create or update KV {name}"), e))?;
    }
    for (stream, wanted) in topology.consumers() {
        let name = wanted.durable_name.clone().unwrap_or_default();
        let action = match topology::consumer_info(js, stream, &name).await? {
            None => Action::Create,
            Some(info) => update_or_not(diff::consumer_changes(&wanted, &info.config)),
        };
        match action {
            Action::NoChange | Action::NotManaged(_) => continue,
            Action::Update(changes) if diff::needs_recreate(&changes) => {
                js.delete_consumer_from_stream(&name, stream)
                    .await
                    .map_err(|e| nats_error(format!("delete consumer {stream}/{name}"), e))?;
            }
            Action::Create | Action::Update(_) => {}
        }
        js.create_consumer_on_stream(wanted, stream)
            .await
            .map_err(|e| nats_error(format!("create or update consumer {stream}/{name}"), e))?;
    }
    Ok(())
}

async fn stream_action(
    js: &jetstream::Context,
    wanted: &stream::Config,
) -> Result<Action, ProvisionError> {
    Ok(match topology::stream_info(js, &wanted.name).await? {
        None => Action::Create,
        Some(info) => update_or_not(diff::stream_changes(wanted, &info)),
    })
}

fn update_or_not(changes: Vec<diff::FieldChange>) -> Action {
    if changes.is_empty() {
        Action::NoChange
    } else {
        Action::Update(changes)
    }
}

fn nats_error(what: String, error: impl std::fmt::Display) -> ProvisionError {
    ProvisionError::Nats(format!("{what}: {error}"))
}
