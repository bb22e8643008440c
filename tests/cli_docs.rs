//! Issue 15 item 3: the man page and the shell completions come from the clap definitions.
//! `man -l` renders the page (man-db, from scripts/install-deps.sh), `twinsan man --dir` writes a page per
//! subcommand, and the bash completion loads and completes subcommand names and options.

mod common;

use common::{bin, run, scratch_dir, text};
use std::process::Command;
use std::time::Duration;

#[test]
fn man_page_renders_and_has_a_page_per_subcommand() {
    let dir = scratch_dir();
    let page = dir.path().join("twinsan.1");
    let o = run(Command::new(bin()).arg("man"), Duration::from_secs(30));
    assert!(o.status.success(), "twinsan man: {}", text(&o));
    std::fs::write(&page, &o.stdout).unwrap();
    let roff = String::from_utf8_lossy(&o.stdout);
    assert!(roff.contains(".TH twinsan 1"), "not a man page:\n{roff}");
    assert!(roff.contains("check\\-config") || roff.contains("check-config"));

    let pages = dir.path().join("pages");
    let o = run(
        Command::new(bin()).arg("man").arg("--dir").arg(&pages),
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "twinsan man --dir: {}", text(&o));
    for name in [
        "twinsan.1",
        "twinsan-serve.1",
        "twinsan-status.1",
        "twinsan-replication.1",
    ] {
        assert!(pages.join(name).is_file(), "{name} missing");
    }

    assert!(
        std::path::Path::new("/usr/bin/man").exists(),
        "man-db is not installed (scripts/install-deps.sh installs it)"
    );
    let o = run(
        Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat"),
        Duration::from_secs(30),
    );
    let shown = text(&o);
    assert!(o.status.success(), "man -l failed: {shown}");
    for want in [
        "NAME",
        "SYNOPSIS",
        "twinsan-status",
        "Examples",
        "twinsan replication adopt",
    ] {
        assert!(
            shown.contains(want),
            "rendered page lacks {want:?}:\n{shown}"
        );
    }
    let o = run(
        Command::new("man")
            .arg("-l")
            .arg(pages.join("twinsan-status.1"))
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat"),
        Duration::from_secs(30),
    );
    assert!(text(&o).contains("--json"), "status page lacks --json");
}

#[test]
fn bash_completion_loads_and_completes() {
    let dir = scratch_dir();
    let script = dir.path().join("twinsan.bash");
    let o = run(
        Command::new(bin()).args(["completions", "bash"]),
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "twinsan completions bash: {}", text(&o));
    std::fs::write(&script, &o.stdout).unwrap();
    // The subcommand after `twinsan sta`, and the options after `twinsan status --`.
    let probe = r#"
        source "$1" || exit 2
        complete -p twinsan >/dev/null || exit 3
        COMP_WORDS=(twinsan sta); COMP_CWORD=1; _twinsan twinsan sta twinsan
        printf 'sub:%s\n' "${COMPREPLY[@]}"
        COMP_WORDS=(twinsan status --); COMP_CWORD=2; _twinsan twinsan -- status
        printf 'opt:%s\n' "${COMPREPLY[@]}"
    "#;
    let o = run(
        Command::new("bash")
            .arg("-c")
            .arg(probe)
            .arg("_")
            .arg(&script),
        Duration::from_secs(30),
    );
    let out = text(&o);
    assert!(o.status.success(), "completion did not load: {out}");
    assert!(
        out.lines().any(|l| l == "sub:status"),
        "no `status`:\n{out}"
    );
    assert!(
        out.lines().any(|l| l == "opt:--json"),
        "no `--json`:\n{out}"
    );

    for shell in ["zsh", "fish"] {
        let o = run(
            Command::new(bin()).args(["completions", shell]),
            Duration::from_secs(30),
        );
        assert!(
            o.status.success() && !o.stdout.is_empty(),
            "{shell}: {}",
            text(&o)
        );
    }
}

#[test]
fn help_shows_examples_for_the_common_tasks() {
    let o = run(Command::new(bin()).arg("--help"), Duration::from_secs(30));
    let out = text(&o);
    assert!(o.status.success());
    for want in [
        "Examples",
        "twinsan check-config",
        "twinsan replication create-md",
        "twinsan become-secondary",
    ] {
        assert!(out.contains(want), "--help lacks {want:?}:\n{out}");
    }
}
