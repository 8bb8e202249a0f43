//! The logger for burn's libraries. They log through the `log` crate, and
//! burn-communication installs a console logger at INFO level the first time it starts a
//! server (a multi-node run: one line per tensor download). The program installs this one
//! first, so only burn's warnings and errors reach the terminal.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct WarningsOnly;

impl Log for WarningsOnly {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= Level::Warn
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "{} {}: {}",
                record.level().as_str().to_lowercase(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Installs the logger (a no-op if one is already installed).
pub(crate) fn install() {
    if log::set_logger(&WarningsOnly).is_ok() {
        log::set_max_level(LevelFilter::Warn);
    }
}
