//! Issue 15 item 2: `twinsan status --watch` redraws in place in a terminal (run under
//! `script`, which gives it a pseudo-terminal) and prints one plain snapshot without one.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn without_a_terminal_watch_prints_one_snapshot_and_exits() {
    let dir = scratch_dir();
    let mut server = Server::start(dir.path(), "", None, "");
    let t = Instant::now();
    let o = run(
        Command::new(bin())
            .args(["status", "--watch", "--interval", "0.2", "--config"])
            .arg(&server.config),
        Duration::from_secs(20),
    );
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "status --watch: {}", text(&o));
    assert!(t.elapsed() < Duration::from_secs(10), "it did not exit");
    assert!(out.contains(&format!("target {IQN}")), "{out}");
    assert!(!out.contains('\x1b'), "escape sequences on a pipe:\n{out}");
    server.assert_alive();
}

#[test]
fn in_a_terminal_watch_refreshes_in_place() {
    let dir = scratch_dir();
    let mut server = Server::start(dir.path(), "", None, "");
    let _session = raw::Raw::login(server.port, false, false);
    let cmd = format!(
        "{} status --watch --interval 0.2 --config {}",
        bin().display(),
        server.config.display()
    );
    // script(1) runs the command on a pseudo-terminal and copies what it draws to stdout;
    // timeout stops it (SIGTERM to script, which ends the session) after a few refreshes.
    let o = run(
        Command::new("timeout")
            .args(["-s", "TERM", "2", "script", "-qfec"])
            .arg(&cmd)
            .arg("/dev/null")
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let frames = out.matches("\x1b[H").count();
    assert!(frames >= 2, "{frames} frames drawn:\n{out}");
    assert!(out.contains("Ctrl-C to quit"), "{out}");
    assert!(out.contains("sessions: 1"), "{out}");
    assert!(
        out.contains(common::INIT1),
        "the session's initiator:\n{out}"
    );
    server.assert_alive();
}
