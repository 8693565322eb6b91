//! Test-only fault hooks, compiled in with the `fault-hooks` feature (the end-to-end tests'
//! build; production images build without it).
//!
//! `DARKROOM_TEST_FAULT=<what>@<step>` makes every render misbehave after denoising step
//! `<step>`:
//! - `freeze@N`: the engine thread stops there for good, as a CUDA call that never returns
//!   would (what the watchdog is for);
//! - `abort@N`: the process aborts there, as a driver crash would.

use std::sync::OnceLock;
use std::time::Duration;

/// The variable naming the fault.
pub const VARIABLE: &str = "DARKROOM_TEST_FAULT";

/// A fault and the step it strikes after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The engine thread never returns.
    Freeze(usize),
    /// The process aborts.
    Abort(usize),
}

impl Fault {
    /// Parses `freeze@N` or `abort@N`.
    pub fn parse(text: &str) -> Option<Fault> {
        let (what, step) = text.trim().split_once('@')?;
        let step = step.parse().ok()?;
        match what {
            "freeze" => Some(Fault::Freeze(step)),
            "abort" => Some(Fault::Abort(step)),
            _ => None,
        }
    }
}

fn configured() -> Option<Fault> {
    static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
    *FAULT.get_or_init(|| {
        let text = std::env::var(VARIABLE).ok()?;
        let fault = Fault::parse(&text);
        if fault.is_none() {
            tracing::error!(%text, "{VARIABLE}: expected freeze@<step> or abort@<step>; ignored");
        } else {
            tracing::warn!(?fault, "test fault hook armed");
        }
        fault
    })
}

/// Called by the engine after each denoising step.
pub fn at_step(done: usize) {
    match configured() {
        Some(Fault::Freeze(step)) if done >= step => {
            tracing::warn!(step = done, "test fault: freezing the engine thread");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Some(Fault::Abort(step)) if done >= step => {
            tracing::warn!(step = done, "test fault: aborting the process");
            std::process::abort();
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        assert_eq!(Fault::parse("freeze@2"), Some(Fault::Freeze(2)));
        assert_eq!(Fault::parse(" abort@0 "), Some(Fault::Abort(0)));
        assert_eq!(Fault::parse("melt@2"), None);
        assert_eq!(Fault::parse("freeze"), None);
    }
}
