//! Command line and environment: both `spiegel replicator --url ...` and
//! Spiegel 1.2's `spiegel --type=replicator --url=...`, every option also as
//! an upper-snake-case environment variable, with Spiegel 1.2's defaults.

mod args;
mod passwords;
mod token;

use std::path::PathBuf;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

pub use self::args::{
    AdminSettings, CommandArgs, Config, Connection, DeliverySettings, InstallArgs, RedeliverArgs,
    RuleSettings, RunArgs, StatusArgs, UninstallArgs, WorkerSettings,
};
pub use self::passwords::{Passwords, PasswordsError};
pub use self::token::AdminToken;
use crate::backoff::Strategy;
use crate::couch::UrlError;
use crate::replication::Engine;

/// What the process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Subcommand, ValueEnum)]
pub enum Command {
    /// Create the spiegel database, its security and internal documents, and
    /// `_global_changes` when missing. Safe to run again.
    Install,
    /// Remove what install made (user documents only with --delete-user-docs).
    Uninstall,
    /// Run every worker role in one process (small deployments).
    Run,
    /// Run the replicator role: replicate each database that changed.
    Replicator,
    /// Run the change-listener role: call on_change rules' APIs.
    ChangeListener,
    /// Spiegel 1.2's update-listener; no longer needed, stays idle.
    UpdateListener,
    /// Show the installation's state.
    Status,
    /// Send the change-listener's dead letters again (all, or by --rule
    /// and/or --database); the ones delivered are removed.
    Redeliver,
}

impl Command {
    /// The command's name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Command::Install => "install",
            Command::Uninstall => "uninstall",
            Command::Run => "run",
            Command::Replicator => "replicator",
            Command::ChangeListener => "change-listener",
            Command::UpdateListener => "update-listener",
            Command::Status => "status",
            Command::Redeliver => "redeliver",
        }
    }
}

/// Where a partition without a checkpoint starts (`--since`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Since {
    /// Handle every existing database once.
    Beginning,
    /// Skip the history: only updates from now on.
    Now,
}

/// How much is logged (`--log-level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Failures only.
    Error,
    /// Failures and what an operator should look at.
    Warn,
    /// Also starts, stops and partition moves.
    Info,
    /// Also each run and request.
    Debug,
    /// Also each update event.
    Trace,
    /// Spiegel 1.2's name for its most severe level; same as error.
    Fatal,
}

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON lines otherwise.
    Auto,
    /// Text for a terminal.
    Human,
    /// One JSON object per line.
    Json,
}

const AFTER_HELP: &str = "\
Every option can also be set by an environment variable in upper snake case \
(URL, TYPE, LOG_LEVEL, PASSWORDS_FILE, ...); a command-line option wins over \
its variable. Spiegel 1.2's way of naming the command, --type (TYPE), works \
too, and its options that no longer have an effect are accepted with a \
warning. See docs/configuration.md for the full reference.";

/// Scalable replication and change listening for Apache CouchDB.
#[derive(Debug, Parser)]
#[command(name = "spiegel", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// The command (or `--type`).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The command, Spiegel 1.2 style: install, uninstall, run, replicator,
    /// change-listener, update-listener, status or redeliver.
    // Hidden from --help (the commands say it better); documented in
    // docs/configuration.md.
    #[arg(
        long = "type",
        env = "TYPE",
        value_enum,
        global = true,
        value_name = "TYPE",
        hide = true
    )]
    pub type_: Option<Command>,

    /// The CouchDB server, with an admin's credentials, e.g.
    /// http://admin:secret@localhost:5984.
    ///
    /// Read as text and checked later, so that a malformed URL's password is
    /// never echoed in an error.
    #[arg(
        long,
        env = "URL",
        global = true,
        value_name = "URL",
        hide_env_values = true
    )]
    pub url: Option<String>,

    #[arg(
        long,
        env = "LOG_LEVEL",
        value_enum,
        default_value = "info",
        global = true
    )]
    /// How much is logged: error, warn, info, debug or trace.
    pub log_level: LogLevel,

    #[arg(
        long,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "auto",
        global = true
    )]
    /// How log lines are written: auto, human or json.
    pub log_format: LogFormat,

    /// The name of the spiegel database, which holds the replicator and
    /// on_change docs and Spiegel's own bookkeeping.
    #[arg(
        long,
        env = "DB_NAME",
        default_value = "spiegel",
        global = true,
        value_name = "NAME"
    )]
    pub db_name: String,

    /// A prefix for the ids of Spiegel's internal documents, to keep several
    /// installations apart in one database.
    #[arg(long, env = "NAMESPACE", default_value = "", global = true)]
    pub namespace: String,

    /// A JSON file {"<host>": {"<user>": "<password>"}} with the passwords of
    /// user@host URLs in replicator and on_change docs.
    #[arg(long, env = "PASSWORDS_FILE", global = true, value_name = "PATH")]
    pub passwords_file: Option<PathBuf>,

    /// The most changes read from a database's _changes feed at once.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 100, global = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,

    /// The most runs (replications, change batches) in flight at once.
    #[arg(long, env = "CONCURRENCY", default_value_t = 20, global = true,
          value_parser = clap::value_parser!(u64).range(1..10_000))]
    pub concurrency: u64,

    /// Seconds after which a database that keeps answering "not found" is
    /// taken for deleted: its work stops until it is created again.
    #[arg(
        long,
        env = "ASSUME_DELETED_AFTER",
        default_value_t = 300,
        global = true,
        value_name = "SECS"
    )]
    pub assume_deleted_after: u64,

    /// Seconds between saves of a worker's feed checkpoints, at most.
    #[arg(
        long,
        env = "SAVE_SEQ_AFTER",
        default_value_t = 60,
        global = true,
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub save_seq_after: u64,

    /// How the wait between retries of a failed API call or replication grows.
    #[arg(
        long,
        env = "BACKOFF_STRATEGY",
        value_enum,
        default_value = "linear",
        global = true
    )]
    pub backoff_strategy: Strategy,

    /// Seconds to wait before the first retry (fractions allowed).
    #[arg(long, env = "BACKOFF_DELAY", default_value_t = 5.0, global = true, value_name = "SECS",
          value_parser = non_negative_secs)]
    pub backoff_delay: f64,

    /// Factor between successive waits with the exponential strategy.
    #[arg(long, env = "BACKOFF_MULTIPLIER", default_value_t = 2.0, global = true,
          value_parser = positive_number)]
    pub backoff_multiplier: f64,

    /// Retries after the first attempt; 0 retries forever.
    #[arg(long, env = "BACKOFF_LIMIT", default_value_t = 0, global = true)]
    pub backoff_limit: u32,

    /// Spiegel 1.2's update-listener batching delay (ms). No effect: workers
    /// follow database updates themselves, without a batching delay.
    #[arg(
        long,
        env = "BATCH_TIMEOUT",
        default_value_t = 1000,
        global = true,
        value_name = "MS",
        hide = true
    )]
    pub batch_timeout: u64,

    /// Spiegel 1.2's wait before retrying locked work (s). No effect: a
    /// crashed worker's work is taken over when its lease expires.
    #[arg(
        long,
        env = "RETRY_AFTER",
        default_value_t = 10800,
        global = true,
        value_name = "SECS",
        hide = true
    )]
    pub retry_after: u64,

    /// Spiegel 1.2's interval of stalled-work checks (s). No effect: leases
    /// replace locks.
    #[arg(
        long,
        env = "CHECK_STALLED",
        default_value_t = 600,
        global = true,
        value_name = "SECS",
        hide = true
    )]
    pub check_stalled: u64,

    /// This worker's id among the workers of its role; unique per process.
    /// Default: host name, process id and a random suffix.
    #[arg(long, env = "WORKER_ID", global = true, value_parser = worker_id)]
    pub worker_id: Option<String>,

    /// Seconds without a heartbeat after which a worker is taken for dead
    /// and its partitions are taken over. Heartbeats come every third of it.
    #[arg(long, env = "LEASE_TIME", default_value_t = 15.0, global = true, value_name = "SECS",
          value_parser = timing_secs)]
    pub lease_time: f64,

    /// Where a partition starts when it has no checkpoint yet (first start):
    /// `beginning` handles every existing database once; `now` skips history.
    #[arg(
        long,
        env = "SINCE",
        value_enum,
        default_value = "beginning",
        global = true
    )]
    pub since: Since,

    /// How replicator documents without an `engine` replicate: `native`
    /// (Spiegel itself, over the replication protocol: no start-up delay)
    /// or `couchdb` (CouchDB's one-shot `_replicate`).
    #[arg(
        long,
        env = "REPLICATION_ENGINE",
        value_enum,
        default_value = "native",
        global = true
    )]
    pub replication_engine: Engine,

    /// The most runs at once, per role, of databases that only a catch-up
    /// asks for (a first start's history, or a takeover's replay); live
    /// changes always go first. Default: half of `--concurrency`.
    #[arg(long, env = "CATCH_UP_CONCURRENCY", global = true, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub catch_up_concurrency: Option<u64>,

    /// Milliseconds a native replication run waits for other runs writing
    /// to the same target, to share their requests to it (checkpoint read,
    /// `_revs_diff`, `_bulk_docs`). A run alone on its target never waits,
    /// and a group goes as soon as every run on the target has joined it.
    /// 0: every run sends its own.
    #[arg(
        long,
        env = "GROUP_WINDOW",
        default_value_t = 25,
        global = true,
        value_name = "MS"
    )]
    pub group_window: u64,

    /// Seconds a stopping worker waits for its runs in flight before it
    /// abandons them (they are handled again by the next owner).
    #[arg(
        long,
        env = "SHUTDOWN_TIMEOUT",
        default_value_t = 30,
        global = true,
        value_name = "SECS"
    )]
    pub shutdown_timeout: u64,

    /// Address of the admin HTTP server (/healthz, /readyz, /metrics) of
    /// worker processes; an empty value turns it off. With --console and
    /// no address set, 127.0.0.1 on this port.
    #[arg(
        long,
        env = "ADMIN_ADDR",
        default_value = "0.0.0.0:9090",
        global = true,
        value_name = "HOST:PORT"
    )]
    pub admin_addr: String,

    /// Serve the web console at / on the admin server. It shows database
    /// names, which are often user ids: see docs/console.md before you
    /// expose it.
    #[arg(long, env = "CONSOLE", global = true)]
    pub console: bool,

    /// The token that allows the console's actions (redeliver, run now,
    /// pause), sent as `Authorization: Bearer <token>`; without one the
    /// console is read-only.
    #[arg(
        long,
        env = "ADMIN_TOKEN",
        global = true,
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub admin_token: Option<String>,

    /// With --admin-token: anyone who reaches the admin server may read
    /// the console (its page, state and live tail) without the token; its
    /// actions still need it.
    #[arg(long, env = "CONSOLE_PUBLIC_READ", global = true)]
    pub console_public_read: bool,

    /// Seconds an API call of an on_change rule may take before it counts
    /// as failed (a rule's `timeout` overrides it).
    #[arg(long, env = "REQUEST_TIMEOUT", default_value_t = 30.0, global = true, value_name = "SECS",
          value_parser = timing_secs)]
    pub request_timeout: f64,

    /// Failed attempts in a row (no answer, a timeout, a 5xx or a 429)
    /// that open an API endpoint's circuit: its requests then wait, without
    /// holding a delivery slot, until a probe succeeds.
    #[arg(long, env = "CIRCUIT_FAILURES", default_value_t = 5, global = true, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub circuit_failures: u32,

    /// Seconds an open circuit lets no request through before it tries a
    /// probe.
    #[arg(long, env = "CIRCUIT_COOLDOWN", default_value_t = 30.0, global = true, value_name = "SECS",
          value_parser = timing_secs)]
    pub circuit_cooldown: f64,

    /// Seconds between sweeps for database changes that `_db_updates` missed
    /// (it is best effort); 0 turns the sweep off. Costs one `_dbs_info`
    /// request per 100 databases and a run per database changed since the
    /// previous sweep. Needs CouchDB 3.2 or later.
    #[arg(
        long,
        env = "SWEEP_INTERVAL",
        default_value_t = 0,
        global = true,
        value_name = "SECS"
    )]
    pub sweep_interval: u64,

    /// Partitions of database names, fixed at install (the most workers of
    /// one role that can share the work).
    #[arg(long, env = "PARTITIONS", default_value_t = 32, global = true,
          value_parser = clap::value_parser!(u32).range(1..=1024), help_heading = "Options of install")]
    pub partitions: u32,

    /// uninstall: also delete the spiegel database with the user's
    /// replicator and on_change docs.
    #[arg(long, global = true, help_heading = "Options of uninstall")]
    pub delete_user_docs: bool,

    /// redeliver: only the dead letters of this on_change document id.
    #[arg(
        long,
        global = true,
        value_name = "ID",
        help_heading = "Options of redeliver"
    )]
    pub rule: Option<String>,

    /// redeliver: only the dead letters of this database.
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        help_heading = "Options of redeliver"
    )]
    pub database: Option<String>,

    /// status: print JSON instead of a table.
    #[arg(long, global = true, help_heading = "Options of status")]
    pub json: bool,

    /// status: one table entry per document and worker, instead of one per
    /// document.
    #[arg(long, global = true, help_heading = "Options of status")]
    pub workers: bool,
}

/// Options that Spiegel 1.2 had and this design makes meaningless: accepted
/// so that existing deployments start, and warned about when set.
const OBSOLETE: [(&str, &str); 3] = [
    ("batch_timeout", "workers follow database updates themselves, without a batching delay"),
    ("retry_after", "there are no locks to wait for; a crashed worker's work is taken over when its lease expires"),
    ("check_stalled", "there are no locks to check; leases replace them"),
];

/// Why the command line or the environment was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--url (or URL) is required: the CouchDB server, e.g. http://admin:secret@localhost:5984"
    )]
    /// No `--url`.
    MissingUrl,
    /// No command and no `--type`.
    #[error("a command is required: spiegel <COMMAND> or --type=<TYPE> (see --help)")]
    MissingCommand,
    /// `--admin-addr` is not `HOST:PORT`.
    #[error("--admin-addr (or ADMIN_ADDR): {0:?} is not HOST:PORT (for example 0.0.0.0:9090), or empty to turn the server off")]
    AdminAddr(String),
    /// `--url` is not a usable URL.
    #[error("--url (or URL): {0}")]
    BadUrl(#[from] UrlError),
    /// A command and a different `--type`.
    #[error("two different commands given: {0} and --type={1}")]
    TwoCommands(&'static str, &'static str),
    /// The passwords file is unusable.
    #[error(transparent)]
    Passwords(#[from] PasswordsError),
}

impl Cli {
    /// Parses the given arguments, reading the environment as usual; the
    /// matches tell which options were set explicitly.
    pub fn try_parse_with_sources<I, T>(args: I) -> Result<(Cli, ArgMatches), clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let matches = match Cli::command().try_get_matches_from(&args) {
            Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
                return Err(Cli::focused_help(&args).unwrap_or(e))
            }
            parsed => parsed?,
        };
        // The matches were produced by this very Cli's command, so they fit.
        let cli = Cli::from_arg_matches(&matches)?;
        Ok((cli, matches))
    }

    /// The help of the command named in `args`, without the options of
    /// the other commands; `None` when no command is named.
    fn focused_help(args: &[std::ffi::OsString]) -> Option<clap::Error> {
        let mut cli = Cli::command_with_focused_help();
        let name = args
            .iter()
            .skip(1)
            .filter_map(|a| a.to_str())
            .find(|a| cli.find_subcommand(a).is_some())?
            .to_string();
        let long = args.iter().any(|a| a == "--help");
        let sub = cli.find_subcommand_mut(&name)?;
        let help = match long {
            true => sub.render_long_help(),
            false => sub.render_help(),
        };
        let text = help.ansi().to_string();
        Some(clap::Error::raw(clap::error::ErrorKind::DisplayHelp, text))
    }

    /// The command line, with each command's help showing only its own
    /// options: those of another command ("Options of install", ...) stay
    /// accepted everywhere, as Spiegel 1.2 accepted every option with every
    /// type, but are hidden from the others' help. For rendering help only.
    fn command_with_focused_help() -> clap::Command {
        let mut command = Cli::command();
        // Global options are copied into each command by the build.
        command.build();
        let names: Vec<String> = command
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        for name in names {
            let own = format!("Options of {name}");
            command = command.mut_subcommand(&name, |mut sub| {
                let others: Vec<String> = sub
                    .get_arguments()
                    .filter(|a| {
                        a.get_help_heading()
                            .is_some_and(|h| h.starts_with("Options of ") && h != own)
                    })
                    .map(|a| a.get_id().to_string())
                    .collect();
                for id in others {
                    sub = sub.mut_arg(id, |a| a.hide(true));
                }
                sub
            });
        }
        command
    }
}

/// A number of seconds in `range`; `shown` names the range in the error.
fn secs_in(s: &str, range: std::ops::RangeInclusive<f64>, shown: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if v.is_finite() && range.contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is out of range ({shown})"))
    }
}

/// Lease times and request timeouts.
fn timing_secs(s: &str) -> Result<f64, String> {
    secs_in(s, 0.3..=3600.0, "0.3 to 3600 seconds")
}

fn worker_id(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        Ok(s.to_string())
    } else {
        Err("use 1 to 100 letters, digits, '-', '_' or '.'".into())
    }
}

fn non_negative_secs(s: &str) -> Result<f64, String> {
    secs_in(s, 0.0..=86_400.0 * 365.0, "0 to one year")
}

fn positive_number(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() && v > 0.0 && v <= 1000.0 {
        Ok(v)
    } else {
        Err(format!("{s} is out of range (above 0, at most 1000)"))
    }
}

/// A default worker id: host name, process id and a random suffix.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_else(|| "spiegel".into());
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn help_of(command: &str) -> String {
        let mut cli = Cli::command_with_focused_help();
        let sub = cli.find_subcommand_mut(command).expect("a command");
        sub.render_long_help().to_string()
    }

    #[test]
    fn each_command_shows_its_own_options_and_accepts_the_others() {
        let run = help_of("run");
        for hidden in ["--json", "--rule", "--partitions", "--delete-user-docs"] {
            assert!(!run.contains(hidden), "run --help shows {hidden}");
        }
        assert!(run.contains("--concurrency"));
        let status = help_of("status");
        assert!(status.contains("--json") && !status.contains("--rule"));
        assert!(help_of("install").contains("--partitions"));
        let args = [
            "spiegel", "run", "--url", "http://h", "--json", "--rule", "r",
        ];
        assert!(Cli::try_parse_with_sources(args).is_ok(), "still accepted");
    }
}
