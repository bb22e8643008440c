//! The `twinsan` command.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;
use twinsan::config::Config;
use twinsan::server::{iscsi_url, Server};

#[derive(Parser)]
#[command(
    name = "twinsan",
    version,
    about = "Two-host highly available iSCSI storage server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve iSCSI targets. Without --config: one target with a 1 GiB sparse LUN on 127.0.0.1:3260.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data directory for the embedded default configuration.
        #[arg(long, default_value = "./twinsan-data")]
        data_dir: PathBuf,
    },
    /// Show what the running daemon serves: targets, LUNs, sessions.
    Status {
        /// Configuration of the daemon to ask (its control socket); default: embedded config.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Control socket path (overrides the one from the configuration).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Replicated volumes: `create-md` (daemon stopped) or an action on the running daemon:
    /// primary, secondary, verify, discard-my-data, invalidate, connect, disconnect, resume-io.
    Replication {
        action: String,
        #[arg(long, short)]
        config: PathBuf,
        /// Volume name (`replication.name` in the configuration).
        #[arg(long)]
        volume: String,
        /// create-md: `full` (this host is the initial sync source) or `skip-identical`.
        #[arg(long)]
        initial_sync: Option<String>,
        /// create-md with skip-identical: the same token on both hosts.
        #[arg(long)]
        skip_token: Option<String>,
        /// primary: promote even if the local disk is not UpToDate.
        #[arg(long)]
        force: bool,
    },
    /// Write a twinsan configuration from drbd.conf + targets.conf (tgt) or ietd.conf (IET)
    /// + iscsi-ha.conf, for one host; every value is commented with its source file:line.
    Import {
        /// Which `on NAME { }` section of drbd.conf is this host.
        #[arg(long)]
        host: String,
        #[arg(long)]
        drbd: Option<PathBuf>,
        /// tgt's targets.conf.
        #[arg(long)]
        tgt: Option<PathBuf>,
        /// Saved `tgtadm --lld iscsi --mode target --op show` of the running tgtd (its tids
        /// and SCSI ID/SN win over targets.conf).
        #[arg(long)]
        tgt_show: Option<PathBuf>,
        /// IET's ietd.conf.
        #[arg(long)]
        ietd: Option<PathBuf>,
        /// IET's initiators.allow (with --ietd).
        #[arg(long)]
        initiators_allow: Option<PathBuf>,
        #[arg(long)]
        iscsi_ha: Option<PathBuf>,
        /// Portal(s) to serve on (default: the iscsi-ha VIP, else 0.0.0.0:3260).
        #[arg(long)]
        portal: Vec<String>,
        /// data_dir of the generated configuration (default /var/lib/twinsan).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Identity rehearsal: serve every LUN from a small sparse file in DIR, without
        /// replication or [ha], to compare its identity with the running target first.
        #[arg(long, value_name = "DIR")]
        rehearsal: Option<PathBuf>,
        /// Output file (default: stdout).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Validate a configuration file and print what it defines.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    match cli.command {
        Command::Serve { config, data_dir } => {
            let config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::embedded_default(&data_dir),
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("twinsan")
                .build()
                .context("cannot start the async runtime")?
                .block_on(serve(config))
        }
        Command::Status {
            config,
            socket,
            json,
        } => {
            let path = match (socket, config) {
                (Some(s), _) => s,
                (None, Some(c)) => Config::load(&c)?.server.control_socket_path(),
                (None, None) => Config::embedded_default(std::path::Path::new("./twinsan-data"))
                    .server
                    .control_socket_path(),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let reply = rt.block_on(twinsan::control::request(
                &path,
                serde_json::json!({"command": "status"}),
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply["status"])?);
            } else {
                let status: twinsan::control::Status =
                    serde_json::from_value(reply["status"].clone())?;
                print!("{}", twinsan::control::render(&status));
            }
            Ok(())
        }
        Command::Replication {
            action,
            config,
            volume,
            initial_sync,
            skip_token,
            force,
        } => {
            let c = Config::load(&config)?;
            let lun = c
                .targets
                .iter()
                .flat_map(|t| t.luns.iter())
                .find(|l| l.replication.as_ref().is_some_and(|r| r.name == volume))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: no LUN has replication.name = {volume}",
                        config.display()
                    )
                })?;
            if action == "create-md" {
                let usable = twinsan::volumes::create_md(
                    lun,
                    initial_sync.as_deref(),
                    skip_token.as_deref(),
                )?;
                println!("{volume}: metadata created, usable size {usable} bytes");
                return Ok(());
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(twinsan::control::request(
                &c.server.control_socket_path(),
                serde_json::json!({"command": "replication", "volume": volume, "action": action, "force": force}),
            ))?;
            println!("{volume}: {action} done");
            Ok(())
        }
        Command::Import {
            host,
            drbd,
            tgt,
            tgt_show,
            ietd,
            initiators_allow,
            iscsi_ha,
            portal,
            data_dir,
            rehearsal,
            output,
        } => {
            let req = twinsan::import::ImportRequest {
                host,
                drbd,
                tgt,
                tgt_show,
                ietd,
                initiators_allow,
                iscsi_ha,
                portals: portal,
                data_dir,
                rehearsal,
            };
            let result = twinsan::import::import(&req)?;
            for w in &result.warnings {
                eprintln!("warning: {w}");
            }
            // The output must be a configuration twinsan accepts; check before writing.
            let name = output
                .clone()
                .unwrap_or_else(|| PathBuf::from("<generated>"));
            twinsan::import::check_generated(&result.toml, &name)?;
            match output {
                Some(path) => {
                    std::fs::write(&path, &result.toml)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "wrote {} ({} warnings)",
                        path.display(),
                        result.warnings.len()
                    );
                }
                None => print!("{}", result.toml),
            }
            Ok(())
        }
        Command::CheckConfig { config } => {
            let c = Config::load(&config)?;
            for t in &c.targets {
                for l in &t.luns {
                    for p in &t.portals {
                        println!("{} -> {}", iscsi_url(p, t, l.number), l.path.display());
                    }
                }
            }
            println!("{}: OK", config.display());
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = Server::build(&config).await?;
    for t in &config.targets {
        for l in &t.luns {
            for p in &t.portals {
                println!("serving {}", iscsi_url(p, t, l.number));
            }
        }
    }
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        stop.cancel();
    });
    server.run(shutdown).await
}
