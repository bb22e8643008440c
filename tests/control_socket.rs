//! The control socket answers bad input with an error and logs the refusal once, naming the
//! client (issue 13, item 5).

mod common;

use common::{scratch_dir, Server};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn answer(r: &mut BufReader<UnixStream>) -> serde_json::Value {
    let mut line = String::new();
    r.read_line(&mut line).expect("an answer line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

#[test]
fn control_socket_answers_and_logs_lines_that_are_not_utf8_or_not_requests() {
    let dir = scratch_dir();
    let s = Server::start(dir.path(), "", None, "");
    let sock = dir.path().join("data").join("twinsan.sock");
    let stream = UnixStream::connect(&sock).expect("control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);

    w.write_all(b"{\"command\":\"st\xffatus\"}\n").unwrap();
    let a = answer(&mut r);
    assert_eq!(a["ok"], false, "{a}");
    assert!(a["error"].as_str().unwrap().contains("not UTF-8"), "{a}");

    w.write_all(b"{\"command\":\"reboot\"}\n").unwrap();
    let a = answer(&mut r);
    assert_eq!(a["ok"], false, "{a}");
    assert!(a["error"].as_str().unwrap().contains("bad request"), "{a}");

    // The connection still serves a good request afterwards.
    w.write_all(b"{\"command\":\"status\"}\n").unwrap();
    let a = answer(&mut r);
    assert_eq!(a["ok"], true, "{a}");

    let me = format!("pid {}", std::process::id());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = s.log_text();
        let utf8: Vec<&str> = log.lines().filter(|l| l.contains("not UTF-8")).collect();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("refused a request: bad request"))
            .collect();
        if utf8.len() == 1 && bad.len() == 1 {
            assert!(utf8[0].contains("WARN") && utf8[0].contains(&me), "{log}");
            assert!(bad[0].contains("WARN") && bad[0].contains(&me), "{log}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected one log line for each refusal, naming {me}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
