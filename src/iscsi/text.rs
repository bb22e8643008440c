//! Text Requests in Full Feature Phase (RFC 7143 §11.10, §11.11): SendTargets (§13.3 and
//! Appendix C) and negotiation of the few keys allowed there.
//!
//! [`TextNegotiation::handle`] takes one Text Request and returns the Text Response, or the
//! reason for a Reject PDU (§11.17): a malformed request, or one in which no key means
//! anything (only unknown non-extension keys and invalid SendTargets values). Long answers are split at the initiator's
//! MaxRecvDataSegmentLength with the C bit and a Target Transfer Tag; the initiator fetches
//! the rest with empty Text Requests carrying that TTT (§11.11.1, §11.11.4).
//!
//! Sequence numbers: responses leave StatSN, ExpCmdSN and MaxCmdSN at zero; the caller fills
//! them with [`stamp_sequence_numbers`] as for any other response. CmdSN accounting of the
//! request (immediate or not) is also the caller's.

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::Bytes;

use super::login::TargetAuth;
use super::negotiation::{
    encode_text, is_reserved_value, key_def, parse_numeric, parse_text, split_text, SessionParams,
    SessionType, MAX_NEGOTIATION_TEXT, MAX_SEGMENT, MIN_SEGMENT,
};
use super::pdu::{Opcode, Pdu, RejectReason, TextRequest, TextResponseBuilder, RESERVED_TAG};

const FLAG_FINAL: u8 = 0x80;
const FLAG_CONTINUE: u8 = 0x40;

/// What a Text Request is answered from.
#[derive(Debug, Clone, Copy)]
pub struct TextContext<'a> {
    /// All configured targets (SendTargets lists those the initiator may log in to).
    pub targets: &'a [TargetAuth],
    pub portal_group_tag: u16,
    /// Portals of this portal group. An unspecified address (0.0.0.0 / ::) stands for
    /// `local_addr`'s address with the portal's port.
    pub portals: &'a [SocketAddr],
    /// Local address of this connection (used for wildcard portals, or if `portals` is empty).
    pub local_addr: Option<SocketAddr>,
    pub session_type: SessionType,
    pub initiator_name: &'a str,
    /// The session's target (Normal sessions).
    pub target_name: Option<&'a str>,
    /// Current parameters: `max_xmit_data_segment_length` bounds each response, our
    /// MaxRecvDataSegmentLength is re-declared when the initiator re-declares its own.
    pub params: &'a SessionParams,
}

/// Parameter changes made by a Text Request (§13.12 allows MaxRecvDataSegmentLength in FFP).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamUpdate {
    /// The initiator's new MaxRecvDataSegmentLength: apply to what we send from now on.
    pub max_xmit_data_segment_length: Option<u32>,
}

/// How to answer a Text Request.
#[derive(Debug)]
pub enum TextOutcome {
    /// Send this Text Response once stamped with [`stamp_sequence_numbers`].
    Respond { response: Pdu, update: ParamUpdate },
    /// Send a Reject PDU (§11.17) with this reason and the request's header.
    Reject {
        reason: RejectReason,
        detail: String,
    },
}

/// Fills StatSN, ExpCmdSN and MaxCmdSN of a response PDU (§11.11.5).
pub fn stamp_sequence_numbers(pdu: &mut Pdu, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) {
    pdu.set_stat_sn(stat_sn);
    pdu.set_exp_cmd_sn(exp_cmd_sn);
    pdu.set_max_cmd_sn(max_cmd_sn);
}

#[derive(Debug)]
struct Ongoing {
    itt: u32,
    ttt: u32,
    incoming: Vec<u8>,
    outgoing: VecDeque<Vec<u8>>,
    /// F bit of the request the pending answer belongs to.
    initiator_final: bool,
}

/// Text negotiation state of one connection (one outstanding Text Request at a time).
#[derive(Debug, Default)]
pub struct TextNegotiation {
    ongoing: Option<Ongoing>,
    last_ttt: u32,
}

fn reject(reason: RejectReason, detail: impl Into<String>) -> TextOutcome {
    TextOutcome::Reject {
        reason,
        detail: detail.into(),
    }
}

impl TextNegotiation {
    pub fn new() -> TextNegotiation {
        TextNegotiation::default()
    }

    fn alloc_ttt(&mut self) -> u32 {
        self.last_ttt = self.last_ttt.wrapping_add(1);
        if self.last_ttt == RESERVED_TAG || self.last_ttt == 0 {
            self.last_ttt = 1;
        }
        self.last_ttt
    }

    /// Handles one Text Request (§11.10).
    pub fn handle(&mut self, req: &Pdu, ctx: &TextContext<'_>) -> TextOutcome {
        if req.opcode() != Some(Opcode::TextRequest) {
            return reject(RejectReason::ProtocolError, "not a Text Request");
        }
        let view = TextRequest(req);
        let fin = view.final_bit();
        let cont = view.continue_bit();
        if fin && cont {
            return reject(
                RejectReason::ProtocolError,
                "F and C bits both set (§11.10.2)",
            );
        }
        let itt = view.itt();
        let ttt = view.target_transfer_tag();
        if itt == RESERVED_TAG {
            return reject(RejectReason::InvalidPduField, "reserved ITT");
        }
        let mut ongoing = if ttt == RESERVED_TAG {
            // A new negotiation; a reserved TTT also resets one in progress (§11.10.4).
            let ttt = self.alloc_ttt();
            Ongoing {
                itt,
                ttt,
                incoming: Vec::new(),
                outgoing: VecDeque::new(),
                initiator_final: fin,
            }
        } else {
            match self.ongoing.take() {
                Some(o) if o.itt == itt && o.ttt == ttt => o,
                other => {
                    self.ongoing = other;
                    return reject(
                        RejectReason::InvalidPduField,
                        format!("unknown TTT {ttt:#x}"),
                    );
                }
            }
        };

        if !ongoing.outgoing.is_empty() {
            if !req.data.is_empty() || cont {
                return reject(
                    RejectReason::ProtocolError,
                    "text sent while the response was continued",
                );
            }
            return self.emit(ongoing, ParamUpdate::default());
        }

        if ongoing.incoming.len() + req.data.len() > MAX_NEGOTIATION_TEXT {
            return reject(RejectReason::ProtocolError, "text request too large");
        }
        ongoing.incoming.extend_from_slice(&req.data);
        if cont {
            // Ask for the rest of the text (§11.10.2).
            let response = text_response(itt, ongoing.ttt, 0, Vec::new());
            self.ongoing = Some(ongoing);
            return TextOutcome::Respond {
                response,
                update: ParamUpdate::default(),
            };
        }
        let text = std::mem::take(&mut ongoing.incoming);
        let pairs = match parse_text(&text) {
            Ok(p) => p,
            Err(e) => return reject(RejectReason::ProtocolError, format!("malformed text: {e}")),
        };
        let mut update = ParamUpdate::default();
        let mut answer = Vec::new();
        // Keys the request cannot mean anything by: an unknown key that is not an extension
        // key (§13.22), or SendTargets with a value §13.3 does not define.
        let mut senseless = 0usize;
        for kv in &pairs {
            let key = kv.key.as_str();
            let value = kv.value.as_str();
            match key {
                "SendTargets" => {
                    if !send_targets_value_ok(value) {
                        senseless += 1;
                    }
                    answer.extend(send_targets(ctx, value))
                }
                "MaxRecvDataSegmentLength" => {
                    // Declarative and allowed in FFP (§13.12): take theirs, re-declare ours.
                    match parse_numeric(value)
                        .filter(|v| (MIN_SEGMENT as u64..=MAX_SEGMENT as u64).contains(v))
                    {
                        Some(v) => {
                            update.max_xmit_data_segment_length = Some(v as u32);
                            answer.extend(encode_text(&[(
                                key,
                                ctx.params.max_recv_data_segment_length.to_string().as_str(),
                            )]));
                        }
                        None => answer.extend(encode_text(&[(key, "Reject")])),
                    }
                }
                "InitiatorAlias" => {}
                _ if is_reserved_value(value) => {}
                // Login-only keys cannot change in Full Feature Phase.
                _ if key_def(key).is_some() => answer.extend(encode_text(&[(key, "Irrelevant")])),
                _ => {
                    if !is_extension_key(key) {
                        senseless += 1;
                    }
                    answer.extend(encode_text(&[(key, "NotUnderstood")]))
                }
            }
        }
        if senseless > 0 && senseless == pairs.len() {
            // Nothing in the request is a request: `SendTargetsPlease=All`, `SendTargets=Alle`,
            // `sENDtARGETS=aLL` (keys are case-sensitive, §6.1). The PDU itself is bad: Reject it
            // (§11.17.1 Protocol Error), as LIO does. A Text Response would carry only
            // `NotUnderstood` / `Reject` (§6.2), which libiscsi counts as a failed request only
            // by dropping the connection and logging in again (its SendTargets.Invalid test then
            // waits forever on the second one); a Reject PDU fails just the request.
            return reject(
                RejectReason::ProtocolError,
                format!(
                    "nothing understood in the text request ({} key(s))",
                    pairs.len()
                ),
            );
        }
        ongoing.initiator_final = fin;
        let max = ctx
            .params
            .max_xmit_data_segment_length
            .clamp(MIN_SEGMENT, MAX_SEGMENT) as usize;
        ongoing.outgoing = split_text(&answer, max).into();
        self.emit(ongoing, update)
    }

    /// Sends the next chunk of the pending answer.
    fn emit(&mut self, mut o: Ongoing, update: ParamUpdate) -> TextOutcome {
        let chunk = o.outgoing.pop_front().unwrap_or_default();
        let response = if !o.outgoing.is_empty() {
            // More to come: C=1, F=0, our TTT (§11.11.2).
            let r = text_response(o.itt, o.ttt, FLAG_CONTINUE, chunk);
            self.ongoing = Some(o);
            r
        } else if !o.initiator_final {
            // The initiator has more to say (F=0): we may not end the exchange (§11.11.1).
            let r = text_response(o.itt, o.ttt, 0, chunk);
            self.ongoing = Some(o);
            r
        } else {
            self.ongoing = None;
            text_response(o.itt, RESERVED_TAG, FLAG_FINAL, chunk)
        };
        TextOutcome::Respond { response, update }
    }
}

fn text_response(itt: u32, ttt: u32, flags: u8, data: Vec<u8>) -> Pdu {
    TextResponseBuilder::new(itt, ttt, flags)
        .data(Bytes::from(data))
        .build()
}

/// Whether `value` is one §13.3 defines for SendTargets: `All` (case-sensitive), empty, or
/// an iSCSI name (`iqn.` / `eui.` / `naa.`).
fn send_targets_value_ok(value: &str) -> bool {
    let is_name = ["iqn.", "eui.", "naa."].iter().any(|p| {
        value
            .get(..4)
            .is_some_and(|head| head.eq_ignore_ascii_case(p))
    });
    matches!(value, "All" | "") || is_name
}

/// `X-` private and `X#` public extension keys (§13.22): unknown ones are answered
/// NotUnderstood, as §6.2 requires.
fn is_extension_key(key: &str) -> bool {
    key.starts_with("X-") || key.starts_with("X#")
}

/// The addresses to advertise: configured portals, wildcards replaced by the local address.
fn addresses(ctx: &TextContext<'_>, portals: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    let mut push = |a: SocketAddr| {
        let a = SocketAddr::new(a.ip().to_canonical(), a.port());
        if !out.contains(&a) {
            out.push(a);
        }
    };
    for p in portals {
        if p.ip().is_unspecified() {
            if let Some(local) = ctx.local_addr {
                push(SocketAddr::new(local.ip(), p.port()));
            }
        } else {
            push(*p);
        }
    }
    if portals.is_empty() {
        if let Some(local) = ctx.local_addr {
            push(local);
        }
    }
    out
}

/// The SendTargets answer (§13.3, Appendix C): one record per target, `TargetName` followed by its
/// `TargetAddress=<addr>:<port>,<tpgt>` keys (IPv6 addresses in brackets). In a Discovery
/// session `All` lists every target the initiator may access and `<name>` that one target. A
/// Normal session only ever learns about its own target: the empty value, its own name and
/// `All` (libiscsi's iscsi-test-cu sends `All` in Full Feature Phase of a Normal session and
/// expects success) list it. A value that is neither `All`, empty nor an iSCSI name
/// (`iqn.` / `eui.` / `naa.`) is answered `SendTargets=Reject`; an unknown or hidden name
/// yields no record.
pub fn send_targets(ctx: &TextContext<'_>, value: &str) -> Vec<u8> {
    if !send_targets_value_ok(value) {
        return encode_text(&[("SendTargets", "Reject")]);
    }
    let visible = |t: &&TargetAuth| t.allows(ctx.initiator_name);
    let find = |name: &str| {
        ctx.targets
            .iter()
            .filter(visible)
            .find(|t| t.name.eq_ignore_ascii_case(name))
    };
    let chosen: Vec<&TargetAuth> = match (ctx.session_type, value) {
        (SessionType::Discovery, "All") => ctx.targets.iter().filter(visible).collect(),
        (SessionType::Discovery, "") => Vec::new(),
        (SessionType::Normal, "All" | "") => ctx.target_name.and_then(find).into_iter().collect(),
        (SessionType::Discovery, name) => find(name).into_iter().collect(),
        (SessionType::Normal, name) => match ctx.target_name {
            Some(t) if t.eq_ignore_ascii_case(name) => find(t).into_iter().collect(),
            _ => Vec::new(),
        },
    };
    let mut pairs: Vec<(String, String)> = Vec::new();
    for t in chosen {
        pairs.push(("TargetName".into(), t.name.clone()));
        let portals = if t.portals.is_empty() {
            ctx.portals
        } else {
            &t.portals[..]
        };
        let tpgt = t.portal_group_tag.unwrap_or(ctx.portal_group_tag);
        for a in addresses(ctx, portals) {
            pairs.push(("TargetAddress".into(), format!("{a},{tpgt}")));
        }
    }
    encode_text(&pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::pdu::{TextRequestBuilder, TextResponse};

    const INI: &str = "iqn.2024-01.org.example:ini";

    fn targets() -> Vec<TargetAuth> {
        let a = TargetAuth::new("iqn.2024-01.org.example:a");
        let mut b = TargetAuth::new("iqn.2024-01.org.example:b");
        b.allowed_initiators = vec!["iqn.2024-01.org.example:someone-else".into()];
        let c = TargetAuth::new("iqn.2024-01.org.example:c");
        vec![a, b, c]
    }

    fn ctx<'a>(
        targets: &'a [TargetAuth],
        portals: &'a [SocketAddr],
        st: SessionType,
        params: &'a SessionParams,
    ) -> TextContext<'a> {
        TextContext {
            targets,
            portal_group_tag: 1,
            portals,
            local_addr: Some("192.0.2.10:3260".parse().unwrap()),
            session_type: st,
            initiator_name: INI,
            target_name: match st {
                SessionType::Normal => Some("iqn.2024-01.org.example:a"),
                SessionType::Discovery => None,
            },
            params,
        }
    }

    fn request(itt: u32, ttt: u32, flags: u8, text: &[u8]) -> Pdu {
        TextRequestBuilder::new(itt, ttt, flags)
            .data(Bytes::copy_from_slice(text))
            .build()
    }

    fn respond(o: TextOutcome) -> (Pdu, ParamUpdate) {
        match o {
            TextOutcome::Respond { response, update } => (response, update),
            TextOutcome::Reject { reason, detail } => panic!("rejected {reason:?}: {detail}"),
        }
    }

    fn pairs(data: &[u8]) -> Vec<(String, String)> {
        parse_text_allow_repeats(data)
    }

    /// SendTargets answers repeat TargetName/TargetAddress, which `parse_text` forbids for
    /// requests; split by hand here.
    fn parse_text_allow_repeats(data: &[u8]) -> Vec<(String, String)> {
        data.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let s = std::str::from_utf8(s).unwrap();
                let (k, v) = s.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[test]
    fn send_targets_all_in_discovery() {
        let t = targets();
        let portals: Vec<SocketAddr> = vec![
            "0.0.0.0:3260".parse().unwrap(),
            "[2001:db8::1]:3261".parse().unwrap(),
        ];
        let params = SessionParams::default();
        let c = ctx(&t, &portals, SessionType::Discovery, &params);
        let mut n = TextNegotiation::new();
        let (r, _) = respond(n.handle(
            &request(9, RESERVED_TAG, FLAG_FINAL, b"SendTargets=All\0"),
            &c,
        ));
        assert_eq!(r.opcode(), Some(Opcode::TextResponse));
        assert_eq!(r.flags(), FLAG_FINAL, "libiscsi insists on exactly F");
        assert_eq!(r.itt(), 9);
        assert_eq!(TextResponse(&r).target_transfer_tag(), RESERVED_TAG);
        assert_eq!(
            pairs(&r.data),
            vec![
                ("TargetName".into(), "iqn.2024-01.org.example:a".into()),
                ("TargetAddress".into(), "192.0.2.10:3260,1".into()),
                ("TargetAddress".into(), "[2001:db8::1]:3261,1".into()),
                ("TargetName".into(), "iqn.2024-01.org.example:c".into()),
                ("TargetAddress".into(), "192.0.2.10:3260,1".into()),
                ("TargetAddress".into(), "[2001:db8::1]:3261,1".into()),
            ]
        );
    }

    #[test]
    fn send_targets_variants() {
        let t = targets();
        let portals: Vec<SocketAddr> = vec!["198.51.100.1:3260".parse().unwrap()];
        let params = SessionParams::default();
        let d = ctx(&t, &portals, SessionType::Discovery, &params);
        let n = ctx(&t, &portals, SessionType::Normal, &params);
        let names = |data: Vec<u8>| -> Vec<String> {
            pairs(&data)
                .into_iter()
                .filter(|(k, _)| k == "TargetName")
                .map(|(_, v)| v)
                .collect()
        };
        assert_eq!(
            names(send_targets(&d, "iqn.2024-01.org.example:C")),
            vec!["iqn.2024-01.org.example:c"]
        );
        assert!(
            names(send_targets(&d, "iqn.2024-01.org.example:b")).is_empty(),
            "ACL hides b"
        );
        assert!(names(send_targets(&d, "iqn.unknown")).is_empty());
        assert!(send_targets(&d, "").is_empty());
        assert_eq!(
            names(send_targets(&n, "")),
            vec!["iqn.2024-01.org.example:a"]
        );
        assert_eq!(
            names(send_targets(&n, "iqn.2024-01.org.example:a")),
            vec!["iqn.2024-01.org.example:a"]
        );
        assert!(names(send_targets(&n, "iqn.2024-01.org.example:c")).is_empty());
        assert_eq!(
            names(send_targets(&n, "All")),
            vec!["iqn.2024-01.org.example:a"]
        );
        // What iscsi-test-cu's SendTargets-invalid test sends must not succeed silently.
        for bad in ["Alle", "A", "aLL", "iq", "\u{e9}t\u{e9}"] {
            assert_eq!(
                send_targets(&d, bad),
                b"SendTargets=Reject\0".to_vec(),
                "{bad}"
            );
            assert_eq!(
                send_targets(&n, bad),
                b"SendTargets=Reject\0".to_vec(),
                "{bad}"
            );
        }
        // IPv4-mapped local address on a dual-stack wildcard portal is shown as IPv4.
        let wild: Vec<SocketAddr> = vec!["[::]:3260".parse().unwrap()];
        let mut c = ctx(&t, &wild, SessionType::Normal, &params);
        c.local_addr = Some("[::ffff:192.0.2.7]:3260".parse().unwrap());
        assert_eq!(
            pairs(&send_targets(&c, "")),
            vec![
                ("TargetName".into(), "iqn.2024-01.org.example:a".into()),
                ("TargetAddress".into(), "192.0.2.7:3260,1".into()),
            ]
        );
    }

    #[test]
    fn long_answer_is_split_and_continued_with_ttt() {
        let t: Vec<TargetAuth> = (0..200)
            .map(|i| TargetAuth::new(format!("iqn.2024-01.org.example:target-number-{i:04}")))
            .collect();
        let portals: Vec<SocketAddr> = vec!["198.51.100.1:3260".parse().unwrap()];
        let params = SessionParams {
            max_xmit_data_segment_length: 1024,
            ..SessionParams::default()
        };
        let c = ctx(&t, &portals, SessionType::Discovery, &params);
        let mut n = TextNegotiation::new();
        let (first, _) = respond(n.handle(
            &request(3, RESERVED_TAG, FLAG_FINAL, b"SendTargets=All\0"),
            &c,
        ));
        assert_eq!(first.flags(), FLAG_CONTINUE);
        let ttt = TextResponse(&first).target_transfer_tag();
        assert_ne!(ttt, RESERVED_TAG);
        assert!(first.data.len() <= 1024);
        assert_eq!(*first.data.last().unwrap(), 0, "split at a pair boundary");
        let mut all = first.data.to_vec();
        loop {
            let (r, _) = respond(n.handle(&request(3, ttt, FLAG_FINAL, b""), &c));
            assert!(r.data.len() <= 1024);
            all.extend_from_slice(&r.data);
            if r.flags() & FLAG_FINAL != 0 {
                assert_eq!(TextResponse(&r).target_transfer_tag(), RESERVED_TAG);
                break;
            }
            assert_eq!(r.flags(), FLAG_CONTINUE);
            assert_eq!(TextResponse(&r).target_transfer_tag(), ttt);
        }
        let got = pairs(&all);
        assert_eq!(got.iter().filter(|(k, _)| k == "TargetName").count(), 200);
        // The exchange is over: the old TTT is now unknown.
        assert!(matches!(
            n.handle(&request(3, ttt, FLAG_FINAL, b""), &c),
            TextOutcome::Reject {
                reason: RejectReason::InvalidPduField,
                ..
            }
        ));
    }

    #[test]
    fn multi_pdu_request_with_c_bit() {
        let t = targets();
        let params = SessionParams::default();
        let c = ctx(&t, &[], SessionType::Discovery, &params);
        let mut n = TextNegotiation::new();
        let (ack, _) = respond(n.handle(&request(4, RESERVED_TAG, FLAG_CONTINUE, b"SendTarg"), &c));
        assert_eq!(ack.flags(), 0);
        assert!(ack.data.is_empty());
        let ttt = TextResponse(&ack).target_transfer_tag();
        assert_ne!(ttt, RESERVED_TAG);
        let (r, _) = respond(n.handle(&request(4, ttt, FLAG_FINAL, b"ets=All\0"), &c));
        assert_eq!(r.flags(), FLAG_FINAL);
        let got = pairs(&r.data);
        assert_eq!(
            got[0],
            ("TargetName".into(), "iqn.2024-01.org.example:a".into())
        );
        assert_eq!(got[1], ("TargetAddress".into(), "192.0.2.10:3260,1".into()));
    }

    #[test]
    fn initiator_not_final_keeps_exchange_open() {
        let t = targets();
        let params = SessionParams::default();
        let c = ctx(&t, &[], SessionType::Normal, &params);
        let mut n = TextNegotiation::new();
        let (r, _) = respond(n.handle(&request(6, RESERVED_TAG, 0, b"X-foo=1\0"), &c));
        assert_eq!(r.flags() & FLAG_FINAL, 0);
        assert_ne!(TextResponse(&r).target_transfer_tag(), RESERVED_TAG);
        assert_eq!(
            pairs(&r.data),
            vec![("X-foo".into(), "NotUnderstood".into())]
        );
        let (r2, _) = respond(n.handle(
            &request(6, TextResponse(&r).target_transfer_tag(), FLAG_FINAL, b""),
            &c,
        ));
        assert_eq!(r2.flags(), FLAG_FINAL);
    }

    /// The requests of libiscsi's iSCSI.iSCSISendTargets.Invalid test, in its order and as it
    /// sends them (immediate, F=1, TTT 0xffffffff): each bad one is answered with a Reject
    /// (the only failure libiscsi takes without dropping the connection), then plain
    /// `SendTargets=All` succeeds on the same connection.
    #[test]
    fn iscsi_test_cu_sendtargets_cases() {
        let t = targets();
        let params = SessionParams::default();
        for st in [SessionType::Normal, SessionType::Discovery] {
            let c = ctx(&t, &[], st, &params);
            let mut n = TextNegotiation::new();
            let bad: [&[u8]; 4] = [
                b"SendTargetsPlease=All\0",
                b"SendTargets=Alle\0",
                b"SendTargets=A\0",
                b"sENDtARGETS=aLL\0",
            ];
            for (i, text) in bad.into_iter().enumerate() {
                match n.handle(&request(i as u32, RESERVED_TAG, FLAG_FINAL, text), &c) {
                    TextOutcome::Reject { reason, .. } => {
                        assert_eq!(reason, RejectReason::ProtocolError, "{text:?}")
                    }
                    other => panic!("{text:?}: {other:?}"),
                }
            }
            let (r, _) = respond(n.handle(
                &request(9, RESERVED_TAG, FLAG_FINAL, b"SendTargets=All\0"),
                &c,
            ));
            assert_eq!(r.flags(), FLAG_FINAL);
            assert_eq!(
                pairs(&r.data)[..2],
                [
                    ("TargetName".into(), "iqn.2024-01.org.example:a".into()),
                    ("TargetAddress".into(), "192.0.2.10:3260,1".into()),
                ]
            );
        }
    }

    /// A request with something the target understands gets a Text Response whatever else it
    /// carries: unknown keys are answered NotUnderstood, a bad SendTargets value Reject (§6.2);
    /// so are extension keys (§13.22) even alone.
    #[test]
    fn not_understood_and_reject_in_a_text_response() {
        let t = targets();
        let params = SessionParams::default();
        let c = ctx(&t, &[], SessionType::Normal, &params);
        let mut n = TextNegotiation::new();
        let (r, _) = respond(n.handle(
            &request(
                1,
                RESERVED_TAG,
                FLAG_FINAL,
                b"SendTargets=Alle\0SendTargetsPlease=All\0MaxRecvDataSegmentLength=8192\0",
            ),
            &c,
        ));
        assert_eq!(r.flags(), FLAG_FINAL);
        assert_eq!(
            pairs(&r.data),
            vec![
                ("SendTargets".into(), "Reject".into()),
                ("SendTargetsPlease".into(), "NotUnderstood".into()),
                ("MaxRecvDataSegmentLength".into(), "8192".into()),
            ]
        );
        for text in [&b"X-com.example.Foo=1\0"[..], b"X#Bar=1\0"] {
            let (r, _) = respond(n.handle(&request(2, RESERVED_TAG, FLAG_FINAL, text), &c));
            assert_eq!(r.flags(), FLAG_FINAL);
            let (k, v) = &pairs(&r.data)[0];
            assert_eq!(v, "NotUnderstood", "{k}");
        }
        // An empty request is answered (empty).
        let (r, _) = respond(n.handle(&request(3, RESERVED_TAG, FLAG_FINAL, b""), &c));
        assert_eq!((r.flags(), r.data.len()), (FLAG_FINAL, 0));
    }

    #[test]
    fn ffp_keys() {
        let t = targets();
        let params = SessionParams {
            max_recv_data_segment_length: 65536,
            ..SessionParams::default()
        };
        let c = ctx(&t, &[], SessionType::Normal, &params);
        let mut n = TextNegotiation::new();
        let text = b"MaxRecvDataSegmentLength=16384\0HeaderDigest=CRC32C\0X#Thing=1\0InitiatorAlias=x\0MaxBurstLength=Irrelevant\0";
        let (r, update) = respond(n.handle(&request(1, RESERVED_TAG, FLAG_FINAL, text), &c));
        assert_eq!(update.max_xmit_data_segment_length, Some(16384));
        assert_eq!(
            pairs(&r.data),
            vec![
                ("MaxRecvDataSegmentLength".into(), "65536".into()),
                ("HeaderDigest".into(), "Irrelevant".into()),
                ("X#Thing".into(), "NotUnderstood".into()),
            ]
        );
        let (r, update) = respond(n.handle(
            &request(
                2,
                RESERVED_TAG,
                FLAG_FINAL,
                b"MaxRecvDataSegmentLength=100\0",
            ),
            &c,
        ));
        assert_eq!(update.max_xmit_data_segment_length, None);
        assert_eq!(
            pairs(&r.data),
            vec![("MaxRecvDataSegmentLength".into(), "Reject".into())]
        );
    }

    #[test]
    fn malformed_requests_are_rejected() {
        let t = targets();
        let params = SessionParams::default();
        let c = ctx(&t, &[], SessionType::Discovery, &params);
        let mut n = TextNegotiation::new();
        let cases: Vec<(Pdu, RejectReason)> = vec![
            (
                request(
                    1,
                    RESERVED_TAG,
                    FLAG_FINAL | FLAG_CONTINUE,
                    b"SendTargets=All\0",
                ),
                RejectReason::ProtocolError,
            ),
            (
                request(1, RESERVED_TAG, FLAG_FINAL, b"SendTargets\0"),
                RejectReason::ProtocolError,
            ),
            (
                request(1, RESERVED_TAG, FLAG_FINAL, b"A=1\0A=2\0"),
                RejectReason::ProtocolError,
            ),
            (
                request(1, RESERVED_TAG, FLAG_FINAL, b"A=\xff\0"),
                RejectReason::ProtocolError,
            ),
            (
                request(1, 77, FLAG_FINAL, b""),
                RejectReason::InvalidPduField,
            ),
            (
                request(RESERVED_TAG, RESERVED_TAG, FLAG_FINAL, b""),
                RejectReason::InvalidPduField,
            ),
            (Pdu::new(Opcode::NopOut), RejectReason::ProtocolError),
        ];
        for (p, want) in cases {
            match n.handle(&p, &c) {
                TextOutcome::Reject { reason, .. } => assert_eq!(reason, want),
                other => panic!("{other:?}"),
            }
        }
        // Too much continued text.
        let mut ttt = RESERVED_TAG;
        let mut rejected = false;
        for _ in 0..20 {
            match n.handle(&request(8, ttt, FLAG_CONTINUE, &vec![b'a'; 8192]), &c) {
                TextOutcome::Respond { response, .. } => {
                    ttt = TextResponse(&response).target_transfer_tag()
                }
                TextOutcome::Reject { .. } => {
                    rejected = true;
                    break;
                }
            }
        }
        assert!(rejected);
        // Random PDUs never panic.
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let mut p = Pdu::new(Opcode::TextRequest);
            for b in p.bhs.iter_mut().skip(1) {
                *b = next() as u8;
            }
            let len = (next() % 300) as usize;
            let data: Vec<u8> = (0..len)
                .map(|_| match next() % 5 {
                    0 => 0,
                    1 => b'=',
                    _ => next() as u8,
                })
                .collect();
            p.set_data(Bytes::from(data));
            let _ = n.handle(&p, &c);
        }
    }

    #[test]
    fn stamping() {
        let mut p = text_response(1, RESERVED_TAG, FLAG_FINAL, Vec::new());
        stamp_sequence_numbers(&mut p, 10, 20, 30);
        let r = TextResponse(&p);
        assert_eq!((r.stat_sn(), r.exp_cmd_sn(), r.max_cmd_sn()), (10, 20, 30));
    }
}
