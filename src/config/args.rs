//! The validated configuration, as plain data per command: each command is
//! handed only its own arguments, built from the groups it shares with the
//! others ([`Connection`], [`WorkerSettings`], [`DeliverySettings`], ...).
//! The command line itself stays one flat set of options, as Spiegel 1.2
//! accepted every option with every type.

use std::net::SocketAddr;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::ArgMatches;

use super::token::AdminToken;
use super::{Cli, Command, ConfigError, Passwords, Since, OBSOLETE};
use crate::backoff::Backoff;
use crate::couch::{ClientOptions, SecretUrl};
use crate::replication::Engine;

/// What the process was asked to do.
#[derive(Clone, Debug)]
pub struct Config {
    /// The command, with its arguments.
    pub command: CommandArgs,
    /// Obsolete options that were set explicitly, with why they do nothing.
    pub obsolete_set: Vec<(String, &'static str)>,
}

/// A command and its arguments.
#[derive(Clone, Debug)]
pub enum CommandArgs {
    /// `install`.
    Install(InstallArgs),
    /// `uninstall`.
    Uninstall(UninstallArgs),
    /// `status`.
    Status(StatusArgs),
    /// `redeliver`.
    Redeliver(RedeliverArgs),
    /// `update-listener`: idle until stopped.
    UpdateListener,
    /// `replicator`, `change-listener` or `run`: workers.
    Work(Box<RunArgs>),
}

impl CommandArgs {
    /// The CouchDB server and spiegel database the command works on; `None`
    /// for the idle update-listener.
    pub fn connection(&self) -> Option<&Connection> {
        match self {
            CommandArgs::Install(a) => Some(&a.connection),
            CommandArgs::Uninstall(a) => Some(&a.connection),
            CommandArgs::Status(a) => Some(&a.connection),
            CommandArgs::Redeliver(a) => Some(&a.connection),
            CommandArgs::Work(a) => Some(&a.connection),
            CommandArgs::UpdateListener => None,
        }
    }
}

/// The CouchDB server and the spiegel database in it.
#[derive(Clone, Debug)]
pub struct Connection {
    /// The server, with an admin's credentials.
    pub url: SecretUrl,
    /// The spiegel database.
    pub db_name: String,
    /// The prefix of Spiegel's document ids (`--namespace`).
    pub namespace: String,
    /// The heartbeat asked of CouchDB's feeds: 10 s, or the lease time if
    /// shorter.
    pub feed_heartbeat: Duration,
}

impl Connection {
    /// The CouchDB client's deadlines: a silent connection is dropped after
    /// about two feed heartbeats.
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions::with_heartbeat(self.feed_heartbeat)
    }
}

/// `install`'s arguments.
#[derive(Clone, Debug)]
pub struct InstallArgs {
    /// Where to install.
    pub connection: Connection,
    /// Partitions of database names, fixed at install.
    pub partitions: u32,
}

/// `uninstall`'s arguments.
#[derive(Clone, Debug)]
pub struct UninstallArgs {
    /// What to uninstall.
    pub connection: Connection,
    /// Also delete the user's replicator and on_change documents.
    pub delete_user_docs: bool,
}

/// `status`'s arguments.
#[derive(Clone, Debug)]
pub struct StatusArgs {
    /// The installation to report on.
    pub connection: Connection,
    /// Print JSON.
    pub json: bool,
    /// One table entry per document and worker.
    pub workers: bool,
}

/// `redeliver`'s arguments.
#[derive(Clone, Debug)]
pub struct RedeliverArgs {
    /// Where the dead letters are.
    pub connection: Connection,
    /// Only this rule's dead letters.
    pub rule: Option<String>,
    /// Only this database's dead letters.
    pub database: Option<String>,
    /// What on_change rules are compiled with.
    pub rules: RuleSettings,
    /// How requests are sent.
    pub delivery: DeliverySettings,
}

/// What the rules are compiled with.
#[derive(Clone, Debug)]
pub struct RuleSettings {
    /// Passwords for URLs in replicator and on_change documents.
    pub passwords: Passwords,
    /// The retry policy of requests whose rule sets none (`--backoff-*`).
    pub backoff: Backoff,
}

/// How on_change requests are sent.
#[derive(Clone, Debug)]
pub struct DeliverySettings {
    /// Deadline of one request.
    pub request_timeout: Duration,
    /// Requests at once, at most; an endpoint gets half while another is
    /// active.
    pub concurrency: usize,
    /// Failed attempts in a row that open an endpoint's circuit.
    pub circuit_failures: u32,
    /// How long an open circuit lets nothing through.
    pub circuit_cooldown: Duration,
}

/// How a worker runs and shares the work with the others of its role.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// This process's worker id (the role is appended).
    pub worker_id: String,
    /// Runs at once per role, at most.
    pub concurrency: usize,
    /// Of those, runs of a catch-up's history, at most.
    pub catch_up_concurrency: usize,
    /// Time without a heartbeat after which a worker is taken for dead.
    pub lease_time: Duration,
    /// Where a partition without a checkpoint starts.
    pub since: Since,
    /// How long a stop waits for runs in flight.
    pub shutdown_timeout: Duration,
    /// Interval of the sweep for missed updates; `None`: off.
    pub sweep_interval: Option<Duration>,
    /// Longest time between checkpoint saves.
    pub save_seq_after: Duration,
    /// How long a database must stay missing to be taken for deleted.
    pub assume_deleted_after: Duration,
    /// The retry policy of runs (`--backoff-*`).
    pub backoff: Backoff,
}

/// The admin HTTP server.
#[derive(Clone, Debug)]
pub struct AdminSettings {
    /// `None`: no admin server.
    pub addr: Option<SocketAddr>,
    /// `--admin-addr` was not set. Several processes on one host (as
    /// Spiegel 1.2 ran them) then share the default port: the ones that
    /// find it taken run without an admin server instead of exiting.
    pub addr_is_default: bool,
    /// Serve the web console.
    pub console: bool,
    /// `--console-public-read`: with a token, the console may be read
    /// without it.
    pub public_read: bool,
    /// Allows the console's actions; `None`: read-only.
    pub token: Option<AdminToken>,
}

/// The worker commands' arguments.
#[derive(Clone, Debug)]
pub struct RunArgs {
    /// `replicator`, `change-listener` or `run` (both).
    pub command: Command,
    /// The CouchDB server and the spiegel database.
    pub connection: Connection,
    /// How the workers run.
    pub worker: WorkerSettings,
    /// What the rules are compiled with.
    pub rules: RuleSettings,
    /// How the change-listener sends requests.
    pub delivery: DeliverySettings,
    /// Changes read per `_changes` request of the change-listener.
    pub batch_size: u64,
    /// The engine of replicator documents that name none.
    pub replication_engine: Engine,
    /// How long a native run waits to share its target's requests.
    pub group_window: Duration,
    /// The admin HTTP server.
    pub admin: AdminSettings,
}

impl RunArgs {
    /// `redeliver`'s arguments for the dead letters of `rule` (all when
    /// `None`), sent as this process sends requests.
    pub fn redeliver(&self, rule: Option<String>) -> RedeliverArgs {
        RedeliverArgs {
            connection: self.connection.clone(),
            rule,
            database: None,
            rules: self.rules.clone(),
            delivery: self.delivery.clone(),
        }
    }
}

/// Options that were validated together, whatever the command.
struct Checked {
    command: Command,
    connection: Connection,
    admin_addr: Option<SocketAddr>,
    passwords: Passwords,
}

impl Cli {
    /// Checks what clap cannot, loads the passwords file and hands each
    /// command its own arguments.
    pub fn into_config(self, matches: &ArgMatches) -> Result<Config, ConfigError> {
        let checked = self.check()?;
        let obsolete_set = obsolete_set(matches);
        let connection = checked.connection.clone();
        let command = match checked.command {
            Command::Install => CommandArgs::Install(InstallArgs {
                connection,
                partitions: self.partitions,
            }),
            Command::Uninstall => CommandArgs::Uninstall(UninstallArgs {
                connection,
                delete_user_docs: self.delete_user_docs,
            }),
            Command::Status => CommandArgs::Status(StatusArgs {
                connection,
                json: self.json,
                workers: self.workers,
            }),
            Command::Redeliver => CommandArgs::Redeliver(RedeliverArgs {
                connection,
                rules: self.rule_settings(checked.passwords),
                delivery: self.delivery_settings(),
                rule: self.rule,
                database: self.database,
            }),
            Command::UpdateListener => CommandArgs::UpdateListener,
            Command::Run | Command::Replicator | Command::ChangeListener => {
                CommandArgs::Work(Box::new(self.run_args(checked, matches)))
            }
        };
        Ok(Config {
            command,
            obsolete_set,
        })
    }

    /// The options every command checks, in the order their errors are
    /// reported: the command, the URL, the admin address, the passwords.
    fn check(&self) -> Result<Checked, ConfigError> {
        let command = match (self.command, self.type_) {
            (Some(a), Some(b)) if a != b => {
                return Err(ConfigError::TwoCommands(a.name(), b.name()))
            }
            (Some(c), _) | (None, Some(c)) => c,
            (None, None) => return Err(ConfigError::MissingCommand),
        };
        let url = SecretUrl::parse(self.url.as_deref().ok_or(ConfigError::MissingUrl)?)?;
        let admin_addr = match self.admin_addr.trim() {
            "" => None,
            addr => Some(
                addr.parse()
                    .map_err(|_| ConfigError::AdminAddr(addr.to_string()))?,
            ),
        };
        let passwords = match &self.passwords_file {
            Some(path) => Passwords::load(path)?,
            None => Passwords::default(),
        };
        let connection = Connection {
            url,
            db_name: self.db_name.clone(),
            namespace: self.namespace.clone(),
            feed_heartbeat: Duration::from_secs(10).min(self.lease_time()),
        };
        Ok(Checked {
            command,
            connection,
            admin_addr,
            passwords,
        })
    }

    fn lease_time(&self) -> Duration {
        Duration::from_secs_f64(self.lease_time)
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            strategy: self.backoff_strategy,
            delay: Duration::from_secs_f64(self.backoff_delay),
            multiplier: self.backoff_multiplier,
            max_delay: None,
            limit: self.backoff_limit,
            jitter: false,
        }
    }

    fn rule_settings(&self, passwords: Passwords) -> RuleSettings {
        RuleSettings {
            passwords,
            backoff: self.backoff(),
        }
    }

    fn delivery_settings(&self) -> DeliverySettings {
        DeliverySettings {
            request_timeout: Duration::from_secs_f64(self.request_timeout),
            // Bounded to < 10,000 by the parser.
            concurrency: self.concurrency as usize,
            circuit_failures: self.circuit_failures,
            circuit_cooldown: Duration::from_secs_f64(self.circuit_cooldown),
        }
    }

    fn worker_settings(&self) -> WorkerSettings {
        WorkerSettings {
            worker_id: self
                .worker_id
                .clone()
                .unwrap_or_else(super::default_worker_id),
            concurrency: self.concurrency as usize,
            // Half the runs by default: live changes keep the other half.
            catch_up_concurrency: self
                .catch_up_concurrency
                .map_or(self.concurrency.div_ceil(2), |n| n.min(self.concurrency))
                as usize,
            lease_time: self.lease_time(),
            since: self.since,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
            sweep_interval: (self.sweep_interval > 0)
                .then(|| Duration::from_secs(self.sweep_interval)),
            save_seq_after: Duration::from_secs(self.save_seq_after),
            assume_deleted_after: Duration::from_secs(self.assume_deleted_after),
            backoff: self.backoff(),
        }
    }

    fn run_args(&self, checked: Checked, matches: &ArgMatches) -> RunArgs {
        let addr_is_default = !set_explicitly(matches, "admin_addr");
        let admin = AdminSettings {
            addr: checked.admin_addr.map(|mut addr| {
                // The console shows user data: by default, to this host only.
                if self.console && addr_is_default {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                addr
            }),
            addr_is_default,
            console: self.console,
            public_read: self.console_public_read,
            token: self
                .admin_token
                .clone()
                .filter(|t| !t.is_empty())
                .map(AdminToken::new),
        };
        RunArgs {
            command: checked.command,
            connection: checked.connection,
            worker: self.worker_settings(),
            rules: self.rule_settings(checked.passwords),
            delivery: self.delivery_settings(),
            batch_size: self.batch_size,
            replication_engine: self.replication_engine,
            group_window: Duration::from_millis(self.group_window),
            admin,
        }
    }
}

/// Whether option `id` was given on the command line or in the environment.
fn set_explicitly(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// The obsolete options that were set, named as on the command line.
fn obsolete_set(matches: &ArgMatches) -> Vec<(String, &'static str)> {
    OBSOLETE
        .iter()
        .filter(|(id, _)| set_explicitly(matches, id))
        .map(|(id, why)| (format!("--{}", id.replace('_', "-")), *why))
        .collect()
}
