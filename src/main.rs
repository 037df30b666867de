//! The `spiegel` binary: parses the configuration, sets up logging and runs
//! the command. Errors end here as one readable line and a non-zero exit.

use std::process::ExitCode;
use std::sync::Arc;

use clap::error::ErrorKind;
use spiegel::admin::{Admin, Console};
use spiegel::commands::{install, redeliver, status, update_listener};
use spiegel::config::{
    AdminSettings, Cli, CommandArgs, Config, Connection, RedeliverArgs, RunArgs, StatusArgs,
};
use spiegel::couch::{CouchClient, CouchError};
use spiegel::process::Process;
use spiegel::{logging, roles};

#[tokio::main]
async fn main() -> ExitCode {
    let (cli, matches) = match Cli::try_parse_with_sources(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            // clap's first line names the option and the problem; the usage
            // lines after it are noise in a container log.
            let rendered = e.render().to_string();
            let line = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("error: invalid arguments");
            eprintln!("{line} (see --help)");
            return ExitCode::from(2);
        }
    };
    logging::init(cli.log_level, cli.log_format);
    let config = match cli.into_config(&matches) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Displayed with its password masked.
    let url = config.command.connection().map(|c| c.url.to_string());
    let worker = matches!(
        config.command,
        CommandArgs::Work(_) | CommandArgs::UpdateListener
    );
    let Err(e) = run(config).await else {
        return ExitCode::SUCCESS;
    };
    let mut message = format!("{e:#}");
    if let Some(url) = url.filter(|_| unreachable(&e)) {
        message.push_str(&format!(
            " (is CouchDB running at {url}? see --url, env URL)"
        ));
    }
    if worker {
        // A worker's logs go to a collector: one more log line.
        tracing::error!("{message}");
    } else {
        // A person ran the command: plain text, as option errors are.
        eprintln!("error: {message}");
    }
    ExitCode::FAILURE
}

/// The command failed because CouchDB did not answer.
fn unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<CouchError>(),
            Some(CouchError::Unreachable(_))
        ) || matches!(
            cause.downcast_ref::<spiegel::Error>(),
            Some(spiegel::Error::Couch(CouchError::Unreachable(_)))
        )
    })
}

async fn run(config: Config) -> anyhow::Result<()> {
    for (option, why) in &config.obsolete_set {
        tracing::warn!(option = %option, "option has no effect: {why}");
    }
    match config.command {
        CommandArgs::Install(args) => {
            let conn = &args.connection;
            let client = connect(conn)?;
            install::install(&client, &conn.db_name, &conn.namespace, args.partitions).await?;
        }
        CommandArgs::Uninstall(args) => {
            let conn = &args.connection;
            let client = connect(conn)?;
            let (db, namespace) = (&conn.db_name, &conn.namespace);
            install::uninstall(&client, db, namespace, args.delete_user_docs).await?;
        }
        CommandArgs::UpdateListener => update_listener::run(shutdown_signal()).await,
        CommandArgs::Status(args) => show_status(&args).await?,
        CommandArgs::Redeliver(args) => redeliver_letters(&args).await?,
        CommandArgs::Work(args) => work(&args).await?,
    }
    Ok(())
}

fn connect(conn: &Connection) -> anyhow::Result<CouchClient> {
    Ok(CouchClient::new(&conn.url, conn.client_options())?)
}

/// `spiegel status`: a table, or JSON.
async fn show_status(args: &StatusArgs) -> anyhow::Result<()> {
    let conn = &args.connection;
    let client = connect(conn)?;
    let report = status::report(&client, &conn.db_name, &conn.namespace).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", status::render(&report, args.workers));
    }
    Ok(())
}

/// `spiegel redeliver`: fails when a letter could not be delivered or was
/// held back by an open circuit.
async fn redeliver_letters(args: &RedeliverArgs) -> anyhow::Result<()> {
    let client = connect(&args.connection)?;
    let delivery = spiegel::delivery::Delivery::new(&args.delivery)?;
    let report = redeliver::redeliver(&client, args, &delivery).await?;
    println!(
        "redelivered {}, failed again {}, held by an open circuit {}, kept without their on_change document {}, skipped (another redelivery had them) {}",
        report.delivered, report.failed, report.held, report.orphaned, report.skipped
    );
    if report.failed + report.held > 0 {
        anyhow::bail!(
            "{} dead letters could not be delivered, {} held by an open circuit",
            report.failed,
            report.held
        );
    }
    Ok(())
}

/// The worker commands: their roles, and the admin server beside them
/// until the workers have stopped.
async fn work(args: &RunArgs) -> anyhow::Result<()> {
    // Long-running commands stop cleanly on SIGTERM/SIGINT; the one-shot
    // ones keep the default action (stop at once).
    let shutdown = shutdown_signal();
    let process = Arc::new(Process::default());
    let client = connect(&args.connection)?.with_metrics(process.metrics.couch.clone());
    let mut admin = tokio::task::JoinSet::new();
    if let Some(served) = admin_server(args, &client, &process).await? {
        admin.spawn(served);
    }
    let ran = roles::run(args, &client, &process, shutdown).await;
    admin.shutdown().await;
    Ok(ran?)
}

/// The admin server, ready to serve, if one is wanted and can be had.
async fn admin_server(
    args: &RunArgs,
    client: &CouchClient,
    process: &Arc<Process>,
) -> anyhow::Result<Option<impl std::future::Future<Output = ()>>> {
    let Some(listener) = admin_listener(&args.admin).await? else {
        if args.admin.console {
            tracing::warn!("--console has no effect without the admin HTTP server");
        }
        return Ok(None);
    };
    let console = match args.admin.console {
        true => Some(Console::new(args, client.clone(), process.clone())?),
        false => None,
    };
    let admin = &args.admin;
    let paths = match (&console, &admin.token) {
        (None, _) => "/healthz /readyz /metrics",
        (Some(_), None) => {
            "/healthz /readyz /metrics, the console at / (read-only and open to all who reach it: no --admin-token)"
        }
        (Some(_), Some(_)) if admin.public_read => {
            "/healthz /readyz /metrics, the console at / (read by all who reach it, its actions with the token: --console-public-read)"
        }
        (Some(_), Some(_)) => "/healthz /readyz /metrics, the console at / (with the token)",
    };
    let addr = listener.local_addr()?;
    let reach = match console.is_some() && admin.addr_is_default {
        true => " (on this host only, the console's default: set --admin-addr to serve elsewhere)",
        false => "",
    };
    tracing::info!(%addr, "admin HTTP server on {addr}{reach}: {paths}");
    let served = Admin {
        process: process.clone(),
        client: client.clone(),
        console,
    };
    Ok(Some(spiegel::admin::serve(listener, served)))
}

/// The admin server's socket, if one is wanted and can be had. The default
/// address taken (a second process on the host, as Spiegel 1.2 ran them) is
/// logged and the process runs without it; an address set explicitly must
/// be free.
async fn admin_listener(admin: &AdminSettings) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = admin.addr else {
        return Ok(None);
    };
    match spiegel::admin::bind(addr).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if admin.addr_is_default && e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(
                %addr,
                "admin HTTP server not started: the default address {addr} is in use (another Spiegel process on this host?); this process runs without /healthz, /readyz and /metrics: give each process its own --admin-addr (ADMIN_ADDR) to have them"
            );
            Ok(None)
        }
        Err(e) => Err(anyhow::anyhow!("--admin-addr {addr}: {e}")),
    }
}

/// Resolves on SIGTERM (what Docker and Kubernetes send) or SIGINT (Ctrl-C).
/// The handlers are installed when this is called, not when the future is
/// first polled, so a signal that arrives early is not lost to the default
/// action (which would kill the process without a clean stop).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (mut term, mut int) = match (term, int) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("cannot listen for SIGTERM/SIGINT: {e}");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = int.recv() => tracing::info!("received SIGINT, stopping"),
            _ = term.recv() => tracing::info!("received SIGTERM, stopping"),
        }
    }
}
