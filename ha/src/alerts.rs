//! Alerts: e-mail over SMTP and XenCenter messages via XAPI `message.create`.
//!
//! As with iscsi-ha, the same text is not resent within a window (30 min by default), and alerts
//! are muted during quiet periods (the start-up grace period and manual mode, when an operator is
//! at work and role changes are expected). Critical alerts (two primaries, promotion failures)
//! are never muted by quiet periods: they are exactly what an operator must not miss.
//!
//! SMTP (RFC 5321) is lettre's connection, driven step by step: EHLO, optional STARTTLS (RFC 3207)
//! or implicit TLS (RFC 8314), AUTH PLAIN or LOGIN (RFC 4954), MAIL/RCPT/DATA. Stepping keeps the
//! failing command in [`SmtpError::Reply`]. TLS is rustls with ring (no C TLS library, for the
//! portable glibc 2.17 build).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::Data;
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::xapi::{Session, XapiClient};

// The alert data types live in the role machine, which raises them as actions; delivery
// (this module) depends on role, never the other way round. Re-exported so callers keep
// naming them `alerts::Alert` / `alerts::Severity`.
pub use crate::role::{Alert, Severity};

// The priority mapping is delivery detail, so it stays here, next to `message.create`.
impl Severity {
    /// XAPI message priority (1 = most severe ... 5 = informational).
    pub fn xapi_priority(self) -> i64 {
        match self {
            Severity::Critical => 1,
            Severity::Warning => 3,
            Severity::Info => 5,
        }
    }
}

/// What the filter decided for one alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Deliver it.
    Send,
    /// Same text sent less than the window ago.
    Duplicate,
    /// Muted by a quiet period (the reason).
    Quiet(&'static str),
}

/// Duplicate suppression and quiet periods; pure (time is passed in).
#[derive(Debug)]
pub struct AlertFilter {
    window: Duration,
    grace_until: Instant,
    manual: bool,
    sent: HashMap<String, Instant>,
}

impl AlertFilter {
    /// `window`: duplicate window; `startup_grace`: quiet time from `now`.
    pub fn new(window: Duration, startup_grace: Duration, now: Instant) -> Self {
        AlertFilter {
            window,
            grace_until: now + startup_grace,
            manual: false,
            sent: HashMap::new(),
        }
    }

    /// Manual mode mutes non-critical alerts.
    pub fn set_manual(&mut self, on: bool) {
        self.manual = on;
    }

    /// Decides about one alert and records it when it is to be sent.
    pub fn decide(&mut self, alert: &Alert, now: Instant) -> Decision {
        if alert.severity != Severity::Critical {
            if now < self.grace_until {
                return Decision::Quiet("start-up grace period");
            }
            if self.manual {
                return Decision::Quiet("manual mode");
            }
        }
        let window = self.window;
        self.sent
            .retain(|_, t| now.saturating_duration_since(*t) < window);
        if self.sent.contains_key(&alert.text) {
            return Decision::Duplicate;
        }
        self.sent.insert(alert.text.clone(), now);
        Decision::Send
    }
}

/// SMTP transport security.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain text (port 25 inside a trusted network).
    None,
    /// Upgrade with STARTTLS (port 587); fails if the server does not offer it.
    StartTls,
    /// TLS from the first byte (port 465).
    Implicit,
}

/// SMTP settings (as iscsi-ha's: server, port, user, password, from, to, subject).
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// Server host name or IP.
    pub server: String,
    /// Port.
    pub port: u16,
    /// Security.
    pub tls: SmtpTls,
    /// Check the server certificate against the system trust store (false accepts any).
    pub verify_cert: bool,
    /// User for AUTH (none = no AUTH).
    pub user: Option<String>,
    /// Password for AUTH.
    pub password: Option<String>,
    /// Envelope and header sender.
    pub from: String,
    /// Recipients.
    pub to: Vec<String>,
    /// Subject prefix, e.g. `[twinsan host-a]`.
    pub subject_prefix: String,
    /// Name sent in EHLO.
    pub helo_name: String,
    /// Deadline for the whole conversation.
    pub timeout: Duration,
}

/// SMTP delivery failures.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    /// Connection or I/O failure.
    #[error("SMTP I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// TLS failure.
    #[error("SMTP TLS error: {0}")]
    Tls(String),
    /// The server answered with an unexpected code.
    #[error("SMTP server said {code} {text} to {command}")]
    Reply {
        /// What we sent.
        command: String,
        /// Reply code.
        code: u16,
        /// Reply text.
        text: String,
    },
    /// Malformed reply or missing capability.
    #[error("SMTP protocol error: {0}")]
    Protocol(String),
    /// Deadline passed.
    #[error("SMTP timed out")]
    Timeout,
}

/// Standard base64 with padding (RFC 2047 encoded-word subjects; the tests check AUTH with it).
pub fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// RFC 5322 date for a UNIX time (UTC).
pub fn rfc5322_date(unix: u64) -> String {
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MO: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        WD[(days.rem_euclid(7)) as usize],
        d,
        MO[(m - 1) as usize],
        y,
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

fn header_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect()
}

/// Builds the message (headers + body, CRLF line ends). Dot-stuffing (RFC 5321 §4.5.2) and the
/// final "." are the transport's, on the wire.
pub fn build_message(cfg: &SmtpConfig, subject: &str, body: &str, unix: u64) -> String {
    let subject = header_safe(format!("{} {}", cfg.subject_prefix, subject).trim());
    let subject = if subject.is_ascii() {
        subject
    } else {
        format!("=?UTF-8?B?{}?=", base64(subject.as_bytes()))
    };
    let mut m = String::new();
    m.push_str(&format!("From: {}\r\n", header_safe(&cfg.from)));
    m.push_str(&format!("To: {}\r\n", header_safe(&cfg.to.join(", "))));
    m.push_str(&format!("Subject: {subject}\r\n"));
    m.push_str(&format!("Date: {}\r\n", rfc5322_date(unix)));
    m.push_str(&format!(
        "Message-ID: <twinsan.{unix}.{}@{}>\r\n",
        std::process::id(),
        header_safe(&cfg.helo_name)
    ));
    m.push_str("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n");
    for line in body.lines() {
        m.push_str(line);
        m.push_str("\r\n");
    }
    m
}

/// Maps a failed step to [`SmtpError`], naming the command as the hand-written client did.
fn step_error(command: &str, e: lettre::transport::smtp::Error) -> SmtpError {
    if let Some(code) = e.status() {
        // A 4xx/5xx reply (RFC 5321 §4.2.1); lettre keeps the reply text as the source.
        let text = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        return SmtpError::Reply {
            command: command.into(),
            code: u16::from(code),
            text,
        };
    }
    if e.is_tls() {
        return SmtpError::Tls(e.to_string());
    }
    let io = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(|io| std::io::Error::new(io.kind(), io.to_string()));
    match io {
        Some(io) => SmtpError::Io(io),
        None => SmtpError::Protocol(format!("{e} after {command}")),
    }
}

/// A positive reply with another code than the one the step needs (RFC 5321 §4.3.2 lists them).
fn expect(command: &str, r: Response, ok: &[u16]) -> Result<(), SmtpError> {
    if ok.iter().any(|c| r.has_code(*c)) {
        return Ok(());
    }
    Err(SmtpError::Reply {
        command: command.into(),
        code: u16::from(r.code()),
        text: r.message().collect::<Vec<_>>().join(" "),
    })
}

/// TLS for SMTP: the system trust store, or any certificate and name when `verify_cert` is off.
fn tls_parameters(cfg: &SmtpConfig) -> Result<TlsParameters, SmtpError> {
    let b = TlsParameters::builder(cfg.server.clone());
    let b = if cfg.verify_cert {
        b
    } else {
        b.dangerous_accept_invalid_certs(true)
            .dangerous_accept_invalid_hostnames(true)
    };
    b.build_rustls().map_err(|e| SmtpError::Tls(e.to_string()))
}

async fn converse(cfg: &SmtpConfig, message: &str) -> Result<(), SmtpError> {
    let helo = ClientId::Domain(cfg.helo_name.clone());
    let implicit = match cfg.tls {
        SmtpTls::Implicit => Some(tls_parameters(cfg)?),
        SmtpTls::None | SmtpTls::StartTls => None,
    };
    debug!(server = %cfg.server, port = cfg.port, "SMTP connect");
    // Greeting and EHLO; the deadline is `send_mail`'s, so lettre gets none of its own.
    let mut c = AsyncSmtpConnection::connect_tokio1(
        (cfg.server.as_str(), cfg.port),
        None,
        &helo,
        implicit,
        None,
    )
    .await
    .map_err(|e| step_error("connect", e))?;
    if cfg.tls == SmtpTls::StartTls {
        // RFC 3207: refuse to go on in clear text when STARTTLS was asked for.
        if !c.can_starttls() {
            return Err(SmtpError::Protocol("server does not offer STARTTLS".into()));
        }
        debug!(command = "STARTTLS", "SMTP");
        c.starttls(tls_parameters(cfg)?, &helo)
            .await
            .map_err(|e| step_error("STARTTLS", e))?;
    }
    if let (Some(user), Some(pw)) = (&cfg.user, &cfg.password) {
        // RFC 4954; PLAIN (RFC 4616) first, as before, then LOGIN.
        let Some(mechanism) = c
            .server_info()
            .get_auth_mechanism(&[Mechanism::Plain, Mechanism::Login])
        else {
            return Err(SmtpError::Protocol(
                "server offers neither AUTH PLAIN nor LOGIN".into(),
            ));
        };
        let shown = format!("AUTH {mechanism}");
        debug!(command = %shown, "SMTP");
        let r = c
            .auth(&[mechanism], &Credentials::new(user.clone(), pw.clone()))
            .await
            .map_err(|e| step_error(&shown, e))?;
        expect(&shown, r, &[235])?;
    }
    // MAIL and RCPT carry the configured strings as they are (CR/LF blanked), as the
    // hand-written client did; lettre's Address would reject some that servers accept.
    let l = format!("MAIL FROM:<{}>", header_safe(&cfg.from));
    debug!(command = %l, "SMTP");
    let r = c
        .command(format!("{l}\r\n"))
        .await
        .map_err(|e| step_error(&l, e))?;
    expect(&l, r, &[250])?;
    for to in &cfg.to {
        let l = format!("RCPT TO:<{}>", header_safe(to));
        debug!(command = %l, "SMTP");
        let r = c
            .command(format!("{l}\r\n"))
            .await
            .map_err(|e| step_error(&l, e))?;
        expect(&l, r, &[250, 251])?;
    }
    debug!(command = "DATA", "SMTP");
    let r = c.command(Data).await.map_err(|e| step_error("DATA", e))?;
    expect("DATA", r, &[354])?;
    // lettre dot-stuffs (RFC 5321 §4.5.2) and adds the closing CRLF "." CRLF itself.
    let body = message.strip_suffix("\r\n").unwrap_or(message);
    let r = c
        .message(body.as_bytes())
        .await
        .map_err(|e| step_error("end of DATA", e))?;
    expect("end of DATA", r, &[250])?;
    // The mail is accepted; a failing QUIT does not matter.
    let _ = c.quit().await;
    Ok(())
}

/// Sends one mail, bounded by `cfg.timeout`.
pub async fn send_mail(cfg: &SmtpConfig, subject: &str, body: &str) -> Result<(), SmtpError> {
    if cfg.to.is_empty() {
        return Err(SmtpError::Protocol("no recipients configured".into()));
    }
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let msg = build_message(cfg, subject, body, unix);
    tokio::time::timeout(cfg.timeout, converse(cfg, &msg))
        .await
        .map_err(|_| SmtpError::Timeout)?
}

/// Where XenCenter messages go: an XAPI client with a live session and this host's uuid.
#[derive(Debug, Clone)]
pub struct XapiSink {
    /// Client.
    pub client: XapiClient,
    /// Live session.
    pub session: Session,
    /// This host's uuid (the message is attached to the host object).
    pub host_uuid: String,
}

/// What happened to one raised alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Filter decision.
    pub decision: Decision,
    /// Mail delivered (None = not attempted).
    pub mail: Option<Result<(), String>>,
    /// XAPI message created (None = not attempted).
    pub xapi: Option<Result<(), String>>,
}

/// The daemon's alert dispatcher.
pub struct Alerter {
    filter: std::sync::Mutex<AlertFilter>,
    smtp: Option<SmtpConfig>,
    xapi: Mutex<Option<XapiSink>>,
    host_name: String,
}

impl Alerter {
    /// `host_name` goes into every mail body.
    pub fn new(
        filter: AlertFilter,
        smtp: Option<SmtpConfig>,
        host_name: impl Into<String>,
    ) -> Arc<Self> {
        Arc::new(Alerter {
            filter: std::sync::Mutex::new(filter),
            smtp,
            xapi: Mutex::new(None),
            host_name: host_name.into(),
        })
    }

    /// Sets or clears the XAPI session used for XenCenter messages.
    pub async fn set_xapi(&self, sink: Option<XapiSink>) {
        *self.xapi.lock().await = sink;
    }

    /// Manual mode mutes non-critical alerts.
    pub fn set_manual(&self, on: bool) {
        self.filter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_manual(on);
    }

    /// Filters, then delivers by mail and XAPI (both attempted; failures are logged, not raised).
    pub async fn raise(&self, alert: &Alert) -> Delivery {
        let decision = self
            .filter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .decide(alert, Instant::now());
        if decision != Decision::Send {
            debug!(?decision, text = %alert.text, "alert not sent");
            return Delivery {
                decision,
                mail: None,
                xapi: None,
            };
        }
        info!(severity = ?alert.severity, name = %alert.name, text = %alert.text, "alert");
        let sink = self.xapi.lock().await.clone();
        let mail = async {
            let cfg = self.smtp.as_ref()?;
            let subject = format!("{:?}: {}", alert.severity, alert.name);
            let body = format!(
                "Host: {}\nSeverity: {:?}\n\n{}\n",
                self.host_name, alert.severity, alert.text
            );
            let r = send_mail(cfg, &subject, &body)
                .await
                .map_err(|e| e.to_string());
            if let Err(e) = &r {
                warn!(error = %e, "alert mail failed");
            }
            Some(r)
        };
        let xapi = async {
            let s = sink?;
            let r = s
                .client
                .message_create(
                    &s.session,
                    &alert.name,
                    alert.severity.xapi_priority(),
                    "Host",
                    &s.host_uuid,
                    &alert.text,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
            if let Err(e) = &r {
                warn!(error = %e, "XAPI message.create failed");
            }
            Some(r)
        };
        let (mail, xapi) = tokio::join!(mail, xapi);
        Delivery {
            decision,
            mail,
            xapi,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    fn a(sev: Severity, text: &str) -> Alert {
        Alert::new(sev, "TEST", text)
    }

    #[test]
    fn duplicates_are_suppressed_within_the_window() {
        let t0 = Instant::now();
        let mut f = AlertFilter::new(Duration::from_secs(1800), Duration::ZERO, t0);
        assert_eq!(f.decide(&a(Severity::Warning, "x"), t0), Decision::Send);
        assert_eq!(
            f.decide(&a(Severity::Warning, "x"), t0 + Duration::from_secs(60)),
            Decision::Duplicate
        );
        assert_eq!(
            f.decide(&a(Severity::Critical, "x"), t0 + Duration::from_secs(60)),
            Decision::Duplicate
        );
        assert_eq!(
            f.decide(&a(Severity::Warning, "y"), t0 + Duration::from_secs(60)),
            Decision::Send
        );
        assert_eq!(
            f.decide(&a(Severity::Warning, "x"), t0 + Duration::from_secs(1800)),
            Decision::Send
        );
    }

    #[test]
    fn quiet_periods_mute_all_but_critical() {
        let t0 = Instant::now();
        let mut f = AlertFilter::new(Duration::from_secs(1800), Duration::from_secs(120), t0);
        assert_eq!(
            f.decide(&a(Severity::Info, "i"), t0),
            Decision::Quiet("start-up grace period")
        );
        assert_eq!(
            f.decide(&a(Severity::Warning, "w"), t0),
            Decision::Quiet("start-up grace period")
        );
        assert_eq!(f.decide(&a(Severity::Critical, "c"), t0), Decision::Send);
        let later = t0 + Duration::from_secs(121);
        // Muted alerts were not recorded as sent.
        assert_eq!(f.decide(&a(Severity::Warning, "w"), later), Decision::Send);
        f.set_manual(true);
        assert_eq!(
            f.decide(&a(Severity::Warning, "w2"), later),
            Decision::Quiet("manual mode")
        );
        assert_eq!(
            f.decide(&a(Severity::Critical, "c2"), later),
            Decision::Send
        );
        f.set_manual(false);
        assert_eq!(f.decide(&a(Severity::Warning, "w2"), later), Decision::Send);
    }

    #[test]
    fn base64_and_dates() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"\0u\0p"), "AHUAcA==");
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_700_000_000),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
    }

    fn smtp_cfg(port: u16) -> SmtpConfig {
        SmtpConfig {
            server: "127.0.0.1".into(),
            port,
            tls: SmtpTls::None,
            verify_cert: false,
            user: Some("alerts".into()),
            password: Some("pw".into()),
            from: "twinsan@host-a".into(),
            to: vec!["ops@example.invalid".into(), "b@example.invalid".into()],
            subject_prefix: "[twinsan]".into(),
            helo_name: "host-a".into(),
            timeout: Duration::from_secs(5),
        }
    }

    /// Dot-stuffing is lettre's now, on the wire, so the message is checked as the server
    /// receives it (same inputs and assertions as when `build_message` stuffed).
    #[tokio::test]
    async fn message_is_dot_stuffed_and_headers_safe() {
        let (port, mut rx) = sink("AUTH PLAIN", false).await;
        let cfg = smtp_cfg(port);
        let mut recv = async || {
            tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap()
                .data
        };
        send_mail(&cfg, "evil\r\nBcc: x", "line\n.dot\nend")
            .await
            .unwrap();
        let m = recv().await;
        assert!(m.contains("Subject: [twinsan] evil  Bcc: x\r\n"));
        assert!(m.contains("\r\n..dot\r\n"));
        assert!(m.contains("To: ops@example.invalid, b@example.invalid\r\n"));
        send_mail(&cfg, "grüße", "").await.unwrap();
        let m = recv().await;
        assert!(m.contains("Subject: =?UTF-8?B?"));
    }

    /// A recorded mail from the sink.
    #[derive(Debug, Default, Clone)]
    struct Mail {
        auth: Vec<String>,
        from: String,
        to: Vec<String>,
        data: String,
    }

    /// Tiny SMTP sink on 127.0.0.1: accepts one session per connection, records it.
    async fn sink(
        auth_methods: &'static str,
        reject_rcpt: bool,
    ) -> (u16, tokio::sync::mpsc::Receiver<Mail>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            // Bounded: at most a few connections per test.
            for _ in 0..4 {
                let Ok((s, _)) = l.accept().await else { return };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut r = BufReader::new(s);
                    let mut mail = Mail::default();
                    r.get_mut().write_all(b"220 sink ESMTP\r\n").await.unwrap();
                    let mut in_data = false;
                    let mut login_step = 0;
                    for _ in 0..10_000 {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let out: String = if in_data {
                            if line == ".\r\n" {
                                in_data = false;
                                "250 queued\r\n".into()
                            } else {
                                mail.data.push_str(&line);
                                continue;
                            }
                        } else if login_step > 0 {
                            mail.auth.push(line.trim_end().to_string());
                            login_step += 1;
                            if login_step == 3 {
                                login_step = 0;
                                "235 ok\r\n".into()
                            } else {
                                "334 UGFzc3dvcmQ6\r\n".into()
                            }
                        } else {
                            let u = line.to_ascii_uppercase();
                            if u.starts_with("EHLO") {
                                format!("250-sink\r\n250-{auth_methods}\r\n250 8BITMIME\r\n")
                            } else if u.starts_with("AUTH PLAIN") {
                                mail.auth.push(line.trim_end().to_string());
                                "235 ok\r\n".into()
                            } else if u.starts_with("AUTH LOGIN") {
                                login_step = 1;
                                "334 VXNlcm5hbWU6\r\n".into()
                            } else if u.starts_with("MAIL FROM:") {
                                mail.from = line.trim_end()[10..].to_string();
                                "250 ok\r\n".into()
                            } else if u.starts_with("RCPT TO:") {
                                if reject_rcpt {
                                    "550 no such user\r\n".into()
                                } else {
                                    mail.to.push(line.trim_end()[8..].to_string());
                                    "250 ok\r\n".into()
                                }
                            } else if u.starts_with("DATA") {
                                in_data = true;
                                "354 go\r\n".into()
                            } else if u.starts_with("QUIT") {
                                let _ = r.get_mut().write_all(b"221 bye\r\n").await;
                                let _ = tx.send(mail.clone()).await;
                                return;
                            } else {
                                "500 what\r\n".into()
                            }
                        };
                        if r.get_mut().write_all(out.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn mail_reaches_the_sink_with_auth_plain() {
        let (port, mut rx) = sink("AUTH PLAIN LOGIN", false).await;
        send_mail(&smtp_cfg(port), "VIP moved", "now on host-a\n.leading dot")
            .await
            .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            m.auth,
            vec![format!("AUTH PLAIN {}", base64(b"\0alerts\0pw"))]
        );
        assert_eq!(m.from, "<twinsan@host-a>");
        assert_eq!(m.to.len(), 2);
        assert!(m.data.contains("Subject: [twinsan] VIP moved\r\n"));
        assert!(m.data.contains("\r\nnow on host-a\r\n..leading dot\r\n"));
    }

    #[tokio::test]
    async fn mail_with_auth_login() {
        let (port, mut rx) = sink("AUTH LOGIN", false).await;
        send_mail(&smtp_cfg(port), "s", "b").await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.auth, vec![base64(b"alerts"), base64(b"pw")]);
    }

    #[tokio::test]
    async fn smtp_errors_are_reported() {
        let (port, _rx) = sink("AUTH PLAIN", true).await;
        match send_mail(&smtp_cfg(port), "s", "b").await {
            Err(SmtpError::Reply { code: 550, .. }) => {}
            other => panic!("{other:?}"),
        }
        let (port, _rx) = sink("X-NOTHING", false).await;
        let mut cfg = smtp_cfg(port);
        cfg.tls = SmtpTls::StartTls;
        assert!(matches!(
            send_mail(&cfg, "s", "b").await,
            Err(SmtpError::Protocol(_))
        ));
        cfg.tls = SmtpTls::None;
        assert!(matches!(
            send_mail(&cfg, "s", "b").await,
            Err(SmtpError::Protocol(_))
        ));
        cfg.to.clear();
        assert!(send_mail(&cfg, "s", "b").await.is_err());
        // A server that accepts and says nothing: the timeout ends it.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = smtp_cfg(l.local_addr().unwrap().port());
        cfg.timeout = Duration::from_millis(300);
        assert!(matches!(
            send_mail(&cfg, "s", "b").await,
            Err(SmtpError::Timeout)
        ));
    }

    #[cfg(feature = "test-xapi")]
    #[tokio::test]
    async fn alerter_sends_mail_and_xapi_message_once() {
        use crate::testxapi::{self, TestXapi};
        let (port, mut rx) = sink("AUTH PLAIN", false).await;
        let x = TestXapi::start().await.unwrap();
        let client = XapiClient::new(x.endpoint(0), Duration::from_secs(2));
        let session = client
            .login(testxapi::USER, testxapi::PASSWORD)
            .await
            .unwrap();
        let alerter = Alerter::new(
            AlertFilter::new(Duration::from_secs(1800), Duration::ZERO, Instant::now()),
            Some(smtp_cfg(port)),
            "host-a",
        );
        alerter
            .set_xapi(Some(XapiSink {
                client,
                session,
                host_uuid: testxapi::host_uuid(0),
            }))
            .await;
        let al = Alert::new(
            Severity::Critical,
            "TWINSAN_TWO_PRIMARIES",
            "both hosts primary",
        );
        let d = alerter.raise(&al).await;
        assert_eq!(d.decision, Decision::Send);
        assert_eq!(d.mail, Some(Ok(())));
        assert_eq!(d.xapi, Some(Ok(())));
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(m.data.contains("both hosts primary"));
        let msgs = x.messages();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].name, "TWINSAN_TWO_PRIMARIES");
        assert_eq!(msgs[0].priority, 1);
        assert_eq!(msgs[0].obj_uuid, testxapi::host_uuid(0));
        // Duplicate: nothing sent.
        assert_eq!(alerter.raise(&al).await.decision, Decision::Duplicate);
        assert_eq!(x.messages().len(), 1);
        // Manual mode mutes warnings.
        alerter.set_manual(true);
        let w = Alert::new(Severity::Warning, "W", "warn");
        assert_eq!(
            alerter.raise(&w).await.decision,
            Decision::Quiet("manual mode")
        );
        // Without SMTP and XAPI: decided, nothing attempted.
        let quiet = Alerter::new(
            AlertFilter::new(Duration::from_secs(1), Duration::ZERO, Instant::now()),
            None,
            "h",
        );
        let d = quiet.raise(&w).await;
        assert_eq!((d.mail, d.xapi), (None, None));
    }
}
