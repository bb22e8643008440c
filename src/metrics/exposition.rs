//! The Prometheus text exposition format, version 0.0.4 (prometheus.io "Exposition
//! formats"): `# HELP` and `# TYPE` lines, then the family's samples, every sample of a
//! family together; label values escaped (`\\`, `\"`, `\n`); histograms as cumulative
//! `_bucket{le=...}` samples ending in `le="+Inf"`, then `_sum` and `_count`.

use std::fmt::Write;
use twinsan_replication::latency::HistogramSnapshot;

/// The content type of a scrape answer in this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Builds one exposition. Call [`Exposition::family`] once per metric name, then add that
/// family's samples before starting the next.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// Label value escaping of the text format.
fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text escaping (backslash and line feed only).
fn escape_help(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample value: integers exactly, the special floats as the format spells them.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

fn write_value(v: Value, out: &mut String) {
    match v {
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float(f) if f.is_nan() => out.push_str("NaN"),
        Value::Float(f) if f == f64::INFINITY => out.push_str("+Inf"),
        Value::Float(f) if f == f64::NEG_INFINITY => out.push_str("-Inf"),
        Value::Float(f) => {
            let _ = write!(out, "{f}");
        }
    }
}

impl Exposition {
    /// Starts the family `name`.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        escape_help(help, &mut self.out);
        self.out.push('\n');
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.name());
    }

    fn labels(&mut self, labels: &[(&str, &str)], extra: Option<(&str, &str)>) {
        if labels.is_empty() && extra.is_none() {
            return;
        }
        self.out.push('{');
        for (i, (k, v)) in labels.iter().chain(extra.iter()).enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_label_value(v, &mut self.out);
            self.out.push('"');
        }
        self.out.push('}');
    }

    /// One sample of the current family (`name` is the family's name, or for a histogram
    /// one of its `_bucket`/`_sum`/`_count` names).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) {
        self.sample_with(name, labels, None, value.into());
    }

    fn sample_with(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        extra: Option<(&str, &str)>,
        value: Value,
    ) {
        self.out.push_str(name);
        self.labels(labels, extra);
        self.out.push(' ');
        write_value(value, &mut self.out);
        self.out.push('\n');
    }

    /// One gauge sample per possible state, 1 for `current` and 0 for the others (the
    /// "enum" style drbd-reactor uses: `drbd_resource_role{name="r0",drbd_resource_role="Primary"} 1`).
    pub fn states(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        state_label: &str,
        states: &[&str],
        current: &str,
    ) {
        for s in states {
            self.sample_with(
                name,
                labels,
                Some((state_label, s)),
                Value::from(*s == current),
            );
        }
    }

    /// A latency histogram in seconds (`name` is the family name; `_bucket`, `_sum` and
    /// `_count` are appended).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        for (bound_ns, n) in &h.cumulative {
            let le = format!("{}", *bound_ns as f64 / 1e9);
            self.sample_with(&bucket, labels, Some(("le", &le)), Value::Int(*n));
        }
        self.sample_with(&bucket, labels, Some(("le", "+Inf")), Value::Int(h.count));
        self.sample_with(
            &format!("{name}_sum"),
            labels,
            None,
            Value::Float(h.sum_ns as f64 / 1e9),
        );
        self.sample_with(&format!("{name}_count"), labels, None, Value::Int(h.count));
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaping() {
        let mut e = Exposition::default();
        e.family(
            "twinsan_x_total",
            Kind::Counter,
            "A help\\text\nover two lines",
        );
        e.sample("twinsan_x_total", &[], 7u64);
        e.sample(
            "twinsan_x_total",
            &[("initiator", "iqn.a\"b\\c\nd"), ("lun", "0")],
            1.5f64,
        );
        e.family("twinsan_y", Kind::Gauge, "y");
        e.sample("twinsan_y", &[], f64::INFINITY);
        e.sample("twinsan_y", &[], f64::NAN);
        e.sample("twinsan_y", &[], true);
        assert_eq!(
            e.finish(),
            "# HELP twinsan_x_total A help\\\\text\\nover two lines\n\
             # TYPE twinsan_x_total counter\n\
             twinsan_x_total 7\n\
             twinsan_x_total{initiator=\"iqn.a\\\"b\\\\c\\nd\",lun=\"0\"} 1.5\n\
             # HELP twinsan_y y\n\
             # TYPE twinsan_y gauge\n\
             twinsan_y +Inf\n\
             twinsan_y NaN\n\
             twinsan_y 1\n"
        );
    }

    #[test]
    fn states_mark_exactly_the_current_one() {
        let mut e = Exposition::default();
        e.states(
            "drbd_resource_role",
            &[("name", "r0")],
            "drbd_resource_role",
            &["Primary", "Secondary"],
            "Secondary",
        );
        assert_eq!(
            e.finish(),
            "drbd_resource_role{name=\"r0\",drbd_resource_role=\"Primary\"} 0\n\
             drbd_resource_role{name=\"r0\",drbd_resource_role=\"Secondary\"} 1\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let h = twinsan_replication::latency::LatencyHistogram::default();
        h.observe(std::time::Duration::from_micros(50));
        h.observe(std::time::Duration::from_millis(2));
        h.observe(std::time::Duration::from_secs(30));
        let mut e = Exposition::default();
        e.histogram("t_seconds", &[("lun", "0")], &h.snapshot());
        let out = e.finish();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "t_seconds_bucket{lun=\"0\",le=\"0.0001\"} 1");
        assert!(lines.contains(&"t_seconds_bucket{lun=\"0\",le=\"0.0025\"} 2"));
        assert!(lines.contains(&"t_seconds_bucket{lun=\"0\",le=\"10\"} 2"));
        assert!(lines.contains(&"t_seconds_bucket{lun=\"0\",le=\"+Inf\"} 3"));
        assert!(lines.contains(&"t_seconds_sum{lun=\"0\"} 30.00205"));
        assert_eq!(lines.last(), Some(&"t_seconds_count{lun=\"0\"} 3"));
    }
}
