//! XML-RPC wire format (as XAPI speaks it). The HTTP/1.1 under it is hyper's (see `xapi`).
//!
//! Parsing never panics on garbage: every malformed document is an [`XmlRpcError`]. An untyped
//! `<value>text</value>` is a string, as in the XML-RPC spec and XAPI's output. Documents are
//! bounded in size and nesting depth because a confused peer must not exhaust memory.

use std::collections::BTreeMap;

use quick_xml::events::Event as XmlEvent;
use quick_xml::Reader;

/// Largest accepted HTTP body (XAPI records for big pools can be several MiB).
pub const MAX_BODY: usize = 64 << 20;
const MAX_DEPTH: usize = 64;

/// Malformed XML-RPC or HTTP.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XmlRpcError {
    /// Not well-formed XML.
    #[error("bad XML: {0}")]
    Xml(String),
    /// Well-formed, but not the XML-RPC shape expected.
    #[error("bad XML-RPC: {0}")]
    Shape(String),
    /// Broken HTTP framing or an oversized body (the XAPI client's HTTP layer).
    #[error("bad HTTP: {0}")]
    Http(String),
}

/// An XML-RPC value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `<string>` or untyped text.
    String(String),
    /// `<int>` / `<i4>` / `<i8>`.
    Int(i64),
    /// `<boolean>`.
    Bool(bool),
    /// `<double>`.
    Double(f64),
    /// `<dateTime.iso8601>`, kept as text.
    DateTime(String),
    /// `<base64>`, kept as text.
    Base64(String),
    /// `<array>`.
    Array(Vec<Value>),
    /// `<struct>`.
    Struct(BTreeMap<String, Value>),
    /// `<nil/>`.
    Nil,
}

impl Value {
    /// String content (also of untyped values).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Integer content; XAPI often sends integers as strings, so those are accepted too.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// Array content.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Struct member.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Struct(m) => m.get(key),
            _ => None,
        }
    }

    /// Builds a struct from pairs.
    pub fn structure<I, K>(pairs: I) -> Value
    where
        I: IntoIterator<Item = (K, Value)>,
        K: Into<String>,
    {
        Value::Struct(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// Builds an array of strings.
    pub fn strings<I, S>(items: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Value::Array(items.into_iter().map(|s| Value::String(s.into())).collect())
    }

    fn encode(&self, out: &mut String) {
        out.push_str("<value>");
        match self {
            Value::String(s) => {
                out.push_str("<string>");
                escape(s, out);
                out.push_str("</string>");
            }
            Value::Int(i) => out.push_str(&format!("<int>{i}</int>")),
            Value::Bool(b) => out.push_str(&format!("<boolean>{}</boolean>", u8::from(*b))),
            Value::Double(d) => out.push_str(&format!("<double>{d:?}</double>")),
            Value::DateTime(s) => {
                out.push_str("<dateTime.iso8601>");
                escape(s, out);
                out.push_str("</dateTime.iso8601>");
            }
            Value::Base64(s) => {
                out.push_str("<base64>");
                escape(s, out);
                out.push_str("</base64>");
            }
            Value::Array(items) => {
                out.push_str("<array><data>");
                for v in items {
                    v.encode(out);
                }
                out.push_str("</data></array>");
            }
            Value::Struct(m) => {
                out.push_str("<struct>");
                for (k, v) in m {
                    out.push_str("<member><name>");
                    escape(k, out);
                    out.push_str("</name>");
                    v.encode(out);
                    out.push_str("</member>");
                }
                out.push_str("</struct>");
            }
            Value::Nil => out.push_str("<nil/>"),
        }
        out.push_str("</value>");
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}

fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

/// Encodes a `<methodCall>`.
pub fn encode_call(method: &str, params: &[Value]) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?><methodCall><methodName>");
    escape(method, &mut out);
    out.push_str("</methodName><params>");
    for p in params {
        out.push_str("<param>");
        p.encode(&mut out);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>");
    out
}

/// Encodes a successful `<methodResponse>` carrying one value.
pub fn encode_response(v: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?><methodResponse><params><param>");
    v.encode(&mut out);
    out.push_str("</param></params></methodResponse>");
    out
}

/// Encodes an XML-RPC `<fault>` (XAPI reports errors in-band instead, but clients must cope).
pub fn encode_fault(code: i64, text: &str) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?><methodResponse><fault>");
    Value::structure([
        ("faultCode", Value::Int(code)),
        ("faultString", Value::from(text)),
    ])
    .encode(&mut out);
    out.push_str("</fault></methodResponse>");
    out
}

/// A parsed response: a value, or an XML-RPC fault (code, text).
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `<params><param>`.
    Value(Value),
    /// `<fault>`.
    Fault(i64, String),
}

#[derive(Debug, Default)]
struct Node {
    name: String,
    text: String,
    children: Vec<Node>,
}

impl Node {
    fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    fn elems(&self, name: &str) -> impl Iterator<Item = &Node> {
        let name = name.to_string();
        self.children.iter().filter(move |c| c.name == name)
    }
}

fn resolve_entity(name: &str) -> Option<char> {
    match name {
        "lt" => Some('<'),
        "gt" => Some('>'),
        "amp" => Some('&'),
        "quot" => Some('"'),
        "apos" => Some('\''),
        _ => None,
    }
}

/// Parses a document into a small element tree.
fn parse_tree(xml: &str) -> Result<Node, XmlRpcError> {
    let bad = |e: &dyn std::fmt::Display| XmlRpcError::Xml(e.to_string());
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Node> = vec![Node::default()];
    loop {
        match reader.read_event().map_err(|e| bad(&e))? {
            XmlEvent::Start(e) => {
                if stack.len() > MAX_DEPTH {
                    return Err(XmlRpcError::Xml("nesting too deep".into()));
                }
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                stack.push(Node {
                    name,
                    ..Node::default()
                });
            }
            XmlEvent::Empty(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                let top = stack.last_mut().ok_or_else(|| bad(&"unbalanced"))?;
                top.children.push(Node {
                    name,
                    ..Node::default()
                });
            }
            XmlEvent::End(_) => {
                let node = stack.pop().ok_or_else(|| bad(&"unbalanced"))?;
                let parent = stack.last_mut().ok_or_else(|| bad(&"unbalanced end tag"))?;
                parent.children.push(node);
            }
            XmlEvent::Text(t) => {
                let s = t.decode().map_err(|e| bad(&e))?;
                stack
                    .last_mut()
                    .ok_or_else(|| bad(&"unbalanced"))?
                    .text
                    .push_str(&s);
            }
            XmlEvent::CData(t) => {
                let s = t.decode().map_err(|e| bad(&e))?;
                stack
                    .last_mut()
                    .ok_or_else(|| bad(&"unbalanced"))?
                    .text
                    .push_str(&s);
            }
            XmlEvent::GeneralRef(r) => {
                let c = match r.resolve_char_ref().map_err(|e| bad(&e))? {
                    Some(c) => c,
                    None => {
                        let name = r.decode().map_err(|e| bad(&e))?;
                        resolve_entity(&name)
                            .ok_or_else(|| XmlRpcError::Xml(format!("unknown entity &{name};")))?
                    }
                };
                stack
                    .last_mut()
                    .ok_or_else(|| bad(&"unbalanced"))?
                    .text
                    .push(c);
            }
            XmlEvent::Eof => break,
            _ => {}
        }
    }
    if stack.len() != 1 {
        return Err(XmlRpcError::Xml("unclosed element".into()));
    }
    let mut root = stack.pop().unwrap_or_default();
    if root.children.len() != 1 {
        return Err(XmlRpcError::Xml("expected exactly one root element".into()));
    }
    Ok(root.children.remove(0))
}

fn shape(msg: impl Into<String>) -> XmlRpcError {
    XmlRpcError::Shape(msg.into())
}

fn parse_value(node: &Node) -> Result<Value, XmlRpcError> {
    if node.name != "value" {
        return Err(shape(format!("expected <value>, got <{}>", node.name)));
    }
    let Some(inner) = node.children.first() else {
        return Ok(Value::String(node.text.clone()));
    };
    let text = inner.text.trim();
    Ok(match inner.name.as_str() {
        "string" => Value::String(inner.text.clone()),
        "int" | "i4" | "i8" => Value::Int(
            text.parse()
                .map_err(|_| shape(format!("bad integer {text:?}")))?,
        ),
        "boolean" => match text {
            "1" | "true" => Value::Bool(true),
            "0" | "false" => Value::Bool(false),
            _ => return Err(shape(format!("bad boolean {text:?}"))),
        },
        "double" => Value::Double(
            text.parse()
                .map_err(|_| shape(format!("bad double {text:?}")))?,
        ),
        "dateTime.iso8601" => Value::DateTime(text.to_string()),
        "base64" => Value::Base64(text.to_string()),
        "nil" => Value::Nil,
        "array" => {
            let data = inner
                .child("data")
                .ok_or_else(|| shape("array without <data>"))?;
            Value::Array(
                data.elems("value")
                    .map(parse_value)
                    .collect::<Result<_, _>>()?,
            )
        }
        "struct" => {
            let mut m = BTreeMap::new();
            for member in inner.elems("member") {
                let name = member
                    .child("name")
                    .ok_or_else(|| shape("member without <name>"))?;
                let v = member
                    .child("value")
                    .ok_or_else(|| shape("member without <value>"))?;
                m.insert(name.text.clone(), parse_value(v)?);
            }
            Value::Struct(m)
        }
        other => return Err(shape(format!("unknown value type <{other}>"))),
    })
}

/// Parses a `<methodResponse>`.
pub fn parse_response(xml: &str) -> Result<Response, XmlRpcError> {
    let root = parse_tree(xml)?;
    if root.name != "methodResponse" {
        return Err(shape(format!(
            "expected <methodResponse>, got <{}>",
            root.name
        )));
    }
    if let Some(fault) = root.child("fault") {
        let v = parse_value(
            fault
                .child("value")
                .ok_or_else(|| shape("fault without value"))?,
        )?;
        let code = v.get("faultCode").and_then(Value::as_i64).unwrap_or(0);
        let text = v
            .get("faultString")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        return Ok(Response::Fault(code, text));
    }
    let v = root
        .child("params")
        .and_then(|p| p.child("param"))
        .and_then(|p| p.child("value"))
        .ok_or_else(|| shape("response without params/param/value"))?;
    Ok(Response::Value(parse_value(v)?))
}

/// Parses a `<methodCall>` into method name and parameters.
pub fn parse_call(xml: &str) -> Result<(String, Vec<Value>), XmlRpcError> {
    let root = parse_tree(xml)?;
    if root.name != "methodCall" {
        return Err(shape(format!("expected <methodCall>, got <{}>", root.name)));
    }
    let name = root
        .child("methodName")
        .ok_or_else(|| shape("call without <methodName>"))?;
    let mut params = Vec::new();
    if let Some(ps) = root.child("params") {
        for p in ps.elems("param") {
            params.push(parse_value(
                p.child("value")
                    .ok_or_else(|| shape("param without value"))?,
            )?);
        }
    }
    Ok((name.text.trim().to_string(), params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_call() {
        let params = vec![
            Value::from("a<b>&c\"'"),
            Value::Int(-5),
            Value::Bool(true),
            Value::Double(30.0),
            Value::strings(["pool", "host"]),
            Value::structure([("x", Value::Nil), ("y", Value::Array(vec![]))]),
        ];
        let xml = encode_call("event.from", &params);
        let (m, p) = parse_call(&xml).unwrap();
        assert_eq!(m, "event.from");
        assert_eq!(p, params);
    }

    #[test]
    fn untyped_values_are_strings_and_ints_may_be_strings() {
        let xml = "<?xml version=\"1.0\"?>\n<methodResponse><params><param><value><struct>\
            <member><name>Status</name><value>Success</value></member>\
            <member><name>Value</name><value><array><data><value>OpaqueRef:1</value>\
            <value> spaced &amp; </value><value><i4>7</i4></value><value>42</value>\
            </data></array></value></member></struct></value></param></params></methodResponse>";
        let Response::Value(v) = parse_response(xml).unwrap() else {
            panic!()
        };
        assert_eq!(v.get("Status").and_then(Value::as_str), Some("Success"));
        let arr = v.get("Value").and_then(Value::as_array).unwrap();
        assert_eq!(arr[0].as_str(), Some("OpaqueRef:1"));
        assert_eq!(arr[1].as_str(), Some(" spaced & "));
        assert_eq!(arr[2].as_i64(), Some(7));
        assert_eq!(arr[3].as_i64(), Some(42));
        assert_eq!(Value::Bool(true).as_i64(), None);
    }

    #[test]
    fn faults_and_entities() {
        let xml = encode_fault(3, "boom <x>");
        assert_eq!(
            parse_response(&xml).unwrap(),
            Response::Fault(3, "boom <x>".into())
        );
        let xml = "<methodResponse><params><param><value>&#65;&#x42;&lt;</value></param></params></methodResponse>";
        assert_eq!(
            parse_response(xml).unwrap(),
            Response::Value(Value::from("AB<"))
        );
        let xml = "<methodResponse><params><param><value><string><![CDATA[<raw>]]></string></value></param></params></methodResponse>";
        assert_eq!(
            parse_response(xml).unwrap(),
            Response::Value(Value::from("<raw>"))
        );
        let xml = "<methodResponse><params><param><value><string/></value></param></params></methodResponse>";
        assert_eq!(
            parse_response(xml).unwrap(),
            Response::Value(Value::from(""))
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let cases = [
            "",
            "garbage",
            "<methodResponse>",
            "<methodResponse></wrong>",
            "<a/><b/>",
            "<methodCall/>",
            "<methodResponse><params/></methodResponse>",
            "<methodResponse><params><param><value><int>x</int></value></param></params></methodResponse>",
            "<methodResponse><params><param><value><boolean>2</boolean></value></param></params></methodResponse>",
            "<methodResponse><params><param><value><double>z</double></value></param></params></methodResponse>",
            "<methodResponse><params><param><value><array/></value></param></params></methodResponse>",
            "<methodResponse><params><param><value><struct><member/></struct></value></param></params></methodResponse>",
            "<methodResponse><params><param><value><foo/></value></param></params></methodResponse>",
            "<methodResponse><params><param><notvalue/></param></params></methodResponse>",
            "<methodResponse><params><param><value>&bogus;</value></param></params></methodResponse>",
            "<methodResponse><params><param><value>&#xFFFFFFFF;</value></param></params></methodResponse>",
        ];
        for c in cases {
            assert!(parse_response(c).is_err(), "accepted {c:?}");
        }
        let deep = "<value><array><data>".repeat(200);
        assert!(parse_response(&format!("<methodResponse><params><param>{deep}")).is_err());
        assert!(parse_call("<methodResponse/>").is_err());
        assert!(parse_call("<methodCall><params/></methodCall>").is_err());
    }
}
