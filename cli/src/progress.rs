//! How `upload --wait` shows a job's progress on stderr: a progress bar on a terminal, one plain
//! line per event otherwise (logs, CI, pipes).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::event::Lifecycle;

/// The display.
pub enum Progress {
    /// indicatif's bar, driven by `started` and `progress` (step/total).
    Bar(ProgressBar),
    /// `queued    preset …` lines.
    Lines,
}

impl Progress {
    /// A bar when stderr is a terminal, else plain lines.
    pub fn for_stderr() -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(120));
            bar.set_message("waiting for the upload to be picked up");
            Progress::Bar(bar)
        } else {
            Progress::Lines
        }
    }

    /// Says something that is not an event (`uploaded …`).
    pub fn note(&self, text: &str) {
        match self {
            Progress::Bar(bar) => bar.println(text),
            Progress::Lines => eprintln!("{text}"),
        }
    }

    /// Shows one event.
    pub fn event(&mut self, event: &Lifecycle) {
        match self {
            Progress::Lines => eprintln!("{:<9} {}", event.kind().as_str(), event.summary()),
            Progress::Bar(bar) => match event {
                Lifecycle::Queued(e) => {
                    bar.set_message(format!("queued with preset {}", e.data.preset));
                }
                Lifecycle::Started(e) => {
                    bar.set_message(format!(
                        "rendering on {} (attempt {})",
                        e.data.worker, e.data.attempt
                    ));
                }
                Lifecycle::Progress(e) => {
                    if bar.length() != Some(u64::from(e.data.total_steps)) {
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{spinner} [{bar:40}] step {pos}/{len} {elapsed_precise} {msg}",
                            )
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                        );
                        bar.set_length(u64::from(e.data.total_steps));
                    }
                    bar.set_position(u64::from(e.data.step));
                }
                Lifecycle::Completed(_) | Lifecycle::Failed(_) => {
                    bar.finish_and_clear();
                    eprintln!("{:<9} {}", event.kind().as_str(), event.summary());
                }
            },
        }
    }

    /// Removes the bar, if any.
    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
