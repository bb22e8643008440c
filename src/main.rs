//! The `twinsan` command.

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;
use twinsan::config::Config;
use twinsan::server::{iscsi_url, Server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Common tasks, shown by `twinsan --help` and in the man page.
const EXAMPLES: &str = "\
Examples (C is the configuration, e.g. /etc/twinsan/twinsan.toml):
  Serve one 1 GiB test LUN on 127.0.0.1:3260:
    twinsan serve
  Check a configuration, then serve it:
    twinsan check-config -c C
    twinsan serve -c C
  What the daemon serves (targets, LUNs, sessions, replication, HA):
    twinsan status -c C
  Replication metadata on the host that syncs its peer first:
    twinsan replication create-md -c C --volume r0 \\
      --initial-sync full
  Adopt a DRBD resource's metadata in place (daemon stopped):
    twinsan replication adopt -c C --volume r0 --dry-run
  A configuration from a DRBD + tgt + iscsi-ha host:
    twinsan import --host xs1 --drbd /etc/drbd.conf \\
      --tgt /etc/tgt/targets.conf \\
      --iscsi-ha /etc/iscsi-ha/iscsi-ha.conf -o C
  Hand the primary role over by hand (HA manual mode):
    twinsan manual-mode-enable -c C
    twinsan become-secondary -c C  (then become-primary on the peer)
  Follow the daemon's log:
    twinsan log -f -c C
  Shell completion for bash:
    source <(twinsan completions bash)";

#[derive(Parser)]
#[command(
    name = "twinsan",
    version,
    about = "Two-host highly available iSCSI storage server",
    long_about = "Two-host highly available iSCSI storage server: an iSCSI target (RFC 7143) \
serving local files or block devices, with synchronous replication to a peer host \
(DRBD-compatible metadata) and role and floating-IP handover. One process per host replaces \
DRBD + tgt + iscsi-ha.",
    after_help = EXAMPLES
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
        /// Refresh in place, like `watch` or drbdmon, until interrupted; without a terminal
        /// on stdout, print one snapshot and exit.
        #[arg(long, short, conflicts_with = "json")]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
    },
    /// Replicated volumes: `create-md` or `adopt` (existing DRBD metadata; daemon stopped),
    /// or an action on the running daemon:
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
        /// adopt: check and report only, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// adopt: rewrite v09 metadata as v08 (the bitmap UUID is kept).
        #[arg(long)]
        convert_to_v08: bool,
        /// adopt: print the report as JSON.
        #[arg(long)]
        json: bool,
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
    /// Print the running daemon's effective configuration (secrets masked).
    Get(DaemonArgs),
    /// Print the daemon's recent log lines.
    Log {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Keep printing new lines until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// HA: enter manual mode (roles change only by command; persists across restarts).
    ManualModeEnable(DaemonArgs),
    /// HA: leave manual mode (refused until this host is in its native role).
    ManualModeDisable(DaemonArgs),
    /// HA, manual mode: make this host primary (refused while the peer is primary).
    BecomePrimary(DaemonArgs),
    /// HA, manual mode: make this host secondary.
    BecomeSecondary(DaemonArgs),
    /// Print the man page (roff) to stdout: `twinsan man | man -l -`.
    Man {
        /// Instead, write twinsan.1 and a page per subcommand (twinsan-status.1...) into DIR.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print a shell completion script: `source <(twinsan completions bash)`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Which daemon to talk to.
#[derive(clap::Args)]
struct DaemonArgs {
    /// Configuration of the daemon to ask (its control socket); default: embedded config.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Control socket path (overrides the one from the configuration).
    #[arg(long)]
    socket: Option<PathBuf>,
}

fn socket_path(config: Option<PathBuf>, socket: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match (socket, config) {
        (Some(s), _) => s,
        (None, Some(c)) => Config::load(&c)?.server.control_socket_path(),
        (None, None) => Config::embedded_default(std::path::Path::new("./twinsan-data"))
            .server
            .control_socket_path(),
    })
}

/// `--interval`: 0.1 to 3600 seconds.
fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s}: seconds between 0.1 and 3600")),
    }
}

/// `status --watch`: the status redrawn in place every `interval` seconds, with the
/// replication link's rates since the previous refresh; one plain snapshot when stdout is
/// not a terminal (a pipe or a file gets no escape sequences).
async fn watch_status(path: &std::path::Path, interval: f64) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let fetch = || async {
        let reply =
            twinsan::control::request(path, serde_json::json!({"command": "status"})).await?;
        anyhow::Ok(serde_json::from_value::<twinsan::control::Status>(
            reply["status"].clone(),
        )?)
    };
    if !std::io::stdout().is_terminal() {
        print!("{}", twinsan::control::render(&fetch().await?));
        return Ok(());
    }
    let period = std::time::Duration::from_secs_f64(interval);
    let mut previous: Option<(std::time::Instant, twinsan::control::Status)> = None;
    loop {
        let now = std::time::Instant::now();
        let mut screen = format!(
            "twinsan status every {interval} s ({}; Ctrl-C to quit)\n\n",
            path.display()
        );
        match fetch().await {
            Ok(st) => {
                screen.push_str(&twinsan::control::render(&st));
                if let Some((then, before)) = &previous {
                    screen.push_str(&twinsan::control::render_rates(
                        before,
                        &st,
                        now.duration_since(*then),
                    ));
                }
                previous = Some((now, st));
            }
            // The daemon may be restarting: keep trying, as `watch` would.
            Err(e) => screen.push_str(&format!("cannot reach the daemon: {e:#}\n")),
        }
        let mut out = std::io::stdout().lock();
        // Home, draw, clear what the previous screen left below.
        write!(out, "\x1b[H{}\x1b[J", screen.replace('\n', "\x1b[K\n"))?;
        out.flush()?;
        drop(out);
        tokio::time::sleep_until(tokio::time::Instant::from_std(now + period)).await;
    }
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    twinsan::logbuf::init_tracing();
    let cli_action = match &cli.command {
        Command::ManualModeEnable(_) => Some("manual-mode-enable"),
        Command::ManualModeDisable(_) => Some("manual-mode-disable"),
        Command::BecomePrimary(_) => Some("become-primary"),
        Command::BecomeSecondary(_) => Some("become-secondary"),
        _ => None,
    };
    match cli.command {
        Command::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
            Ok(())
        }
        Command::Man { dir: None } => {
            let mut out = std::io::stdout().lock();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                // `twinsan man | head`: the reader left, nothing to report.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => r.context("cannot write the man page"),
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "twinsan",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Serve { config, data_dir } => {
            let config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::embedded_default(&data_dir),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.server.effective_worker_threads())
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
            watch,
            interval,
        } => {
            let path = socket_path(config, socket)?;
            if watch {
                return client_runtime()?.block_on(watch_status(&path, interval));
            }
            let rt = client_runtime()?;
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
            dry_run,
            convert_to_v08,
            json,
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
            if action == "adopt" {
                let opts = twinsan_replication::drbd::adopt::AdoptOptions {
                    dry_run,
                    convert_to_v08,
                };
                let report =
                    twinsan::adopt::adopt_volume(lun, &c.server.control_socket_path(), opts)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{volume}: {report}");
                }
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
        Command::Get(d) => {
            let path = socket_path(d.config, d.socket)?;
            print!(
                "{}",
                client_runtime()?.block_on(twinsan::control::client::get(&path))?
            );
            Ok(())
        }
        Command::Log { daemon, follow } => {
            let path = socket_path(daemon.config, daemon.socket)?;
            client_runtime()?.block_on(twinsan::control::client::log(&path, follow))
        }
        Command::ManualModeEnable(d)
        | Command::ManualModeDisable(d)
        | Command::BecomePrimary(d)
        | Command::BecomeSecondary(d) => {
            let action = match &cli_action {
                Some(a) => *a,
                None => unreachable!("set above"),
            };
            let path = socket_path(d.config, d.socket)?;
            match client_runtime()?.block_on(twinsan::ha::cli::ha_action(&path, action)) {
                Ok(msg) => {
                    println!("{action}: {msg}");
                    Ok(())
                }
                Err(e) => {
                    eprintln!("{action}: {e}");
                    std::process::exit(1);
                }
            }
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
    let ha = match &config.ha {
        Some(_) => {
            let h = twinsan::ha::start(&config, server.iscsi(), server.volumes()).await?;
            server.set_ha(h.clone());
            Some(h)
        }
        None => None,
    };
    // Signals first stop the role loop (VIP removed, sessions dropped), then the server
    // (listeners, control socket, volumes).
    let signal = CancellationToken::new();
    let shutdown = CancellationToken::new();
    {
        let (signal, shutdown, ha) = (signal.clone(), shutdown.clone(), ha.clone());
        tokio::spawn(async move {
            use tokio::signal::unix::{signal as unix_signal, SignalKind};
            let mut term = unix_signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            twinsan::sdnotify::notify("STOPPING=1");
            signal.cancel();
            if let Some(h) = ha {
                h.shutdown().await;
            }
            shutdown.cancel();
        });
    }
    if let Some(period) = twinsan::sdnotify::watchdog_interval() {
        tokio::spawn(watchdog(period, ha.clone(), signal.clone()));
    }
    let run = tokio::spawn(server.run(shutdown));
    twinsan::sdnotify::notify(&format!(
        "READY=1\nSTATUS={}",
        if ha.is_some() {
            "serving; HA role loop started"
        } else {
            "serving"
        }
    ));
    run.await.context("server task")?
}

/// Feeds the systemd watchdog at half its period, only while healthy: this task running shows
/// the reactor is responsive, and the HA role loop must have gone round within one period.
async fn watchdog(
    period: std::time::Duration,
    ha: Option<std::sync::Arc<twinsan::ha::HaHandle>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stuck = ha
            .as_ref()
            .map(|h| h.loop_age())
            .filter(|age| *age > period);
        match stuck {
            None => {
                twinsan::sdnotify::notify("WATCHDOG=1");
            }
            Some(age) => tracing::warn!(
                age_ms = age.as_millis() as u64,
                "HA role loop unresponsive: not feeding the watchdog"
            ),
        }
    }
}
