//! `darkroom status JOB [--json]`: the job's record (jobs KV bucket) and the last lifecycle
//! event of each kind (`darkroom.events.<job>.<kind>` on the events stream).

use darkroom_events::JobId;
use serde_json::{Map, Value, json};

use crate::client::Clients;
use crate::error::{CliError, Result};
use crate::event::reason_code;
use crate::lookup::{JobState, status_word};

/// Runs `darkroom status`.
pub async fn run(clients: &mut Clients, job: JobId, json: bool) -> Result<()> {
    let state = JobState::load(clients, job).await?;
    if !state.is_known() {
        return Err(CliError::UnknownJob { job });
    }
    if json {
        println!("{}", to_json(&state));
    } else {
        print!("{}", to_text(&state));
    }
    Ok(())
}

/// `{"job", "status", "record", "events": {kind: CloudEvent}}`.
pub fn to_json(state: &JobState) -> Value {
    let mut events = Map::new();
    for stored in &state.events {
        let value = serde_json::from_slice(&stored.bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&stored.bytes).into_owned()));
        events.insert(stored.kind.as_str().to_owned(), value);
    }
    json!({
        "job": state.job.to_string(),
        "status": state.status(),
        "record": state.record.as_ref().and_then(|(record, _)| serde_json::to_value(record).ok()),
        "events": events,
    })
}

/// The readable form: one `name  value` line per fact, then one line per event.
pub fn to_text(state: &JobState) -> String {
    let mut text = format!("job       {}\nstatus    {}\n", state.job, state.status());
    if let Some((record, _)) = &state.record {
        text.push_str(&format!("source    {}\n", record.source));
        if let Some(preset) = &record.preset {
            text.push_str(&format!("preset    {preset}\n"));
        }
        text.push_str(&format!(
            "record    {} since {}, created {}",
            status_word(record.status),
            record.updated_at.to_rfc3339(),
            record.created_at.to_rfc3339()
        ));
        if let Some(reason) = record.failure {
            text.push_str(&format!(", failure {}", reason_code(reason)));
        }
        text.push('\n');
    } else {
        text.push_str("record    none in the jobs KV bucket\n");
    }
    if state.events.is_empty() {
        text.push_str("events    none stored\n");
    }
    for stored in &state.events {
        match &stored.event {
            Some(event) => text.push_str(&format!(
                "{:<9} {}  {}\n",
                stored.kind.as_str(),
                event.time().to_rfc3339(),
                event.summary()
            )),
            None => text.push_str(&format!(
                "{:<9} (not a valid lifecycle event)\n",
                stored.kind.as_str()
            )),
        }
    }
    text
}
