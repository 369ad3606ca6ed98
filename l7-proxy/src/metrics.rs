//! Counters of the proxy, rendered as Prometheus text on the admin port.
//! Plain atomics: the data plane only ever adds, the admin handler reads.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::state::Direction;

/// Why a connection or request was refused before or instead of being
/// judged. Stable snake_case names: metrics labels and flow events use them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The first bytes on an L7 port were neither HTTP/1 nor the HTTP/2
    /// preface.
    NotHttp,
    /// An HTTP/1 request the parser refused (bad request line, bad header,
    /// obs-fold, conflicting Content-Length, bad Transfer-Encoding).
    MalformedRequest,
    /// The request head exceeded the header limits (431).
    HeaderTooLarge,
    /// The client did not send a complete request head in time.
    HeaderTimeout,
    /// The request target was not a path (authority or asterisk form, or
    /// an absolute form naming another scheme).
    InvalidTarget,
    /// The path is ambiguous (encoded slash, backslash, NUL, control
    /// characters) and is refused rather than guessed.
    AmbiguousPath,
    /// Content-Length together with Transfer-Encoding, or several
    /// Content-Lengths.
    Smuggling,
    /// No L7 rule matched (403 / PERMISSION_DENIED).
    PolicyDenied,
    /// The proxy has no rules for this endpoint, direction and port (no
    /// snapshot yet, or the datapath and the proxy disagree): fail closed.
    NoRules,
    /// HTTP/2 protocol abuse or error (rapid reset, flood, bad frames):
    /// the connection ended with GOAWAY or an error; or one stream was
    /// reset for the client's error (malformed headers, content-length
    /// mismatch, a stream past the concurrency limit).
    H2Protocol,
    /// The source identity does not fit the upstream mark.
    UnmarkableIdentity,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::NotHttp,
        DropReason::MalformedRequest,
        DropReason::HeaderTooLarge,
        DropReason::HeaderTimeout,
        DropReason::InvalidTarget,
        DropReason::AmbiguousPath,
        DropReason::Smuggling,
        DropReason::PolicyDenied,
        DropReason::NoRules,
        DropReason::H2Protocol,
        DropReason::UnmarkableIdentity,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::NotHttp => "not_http",
            DropReason::MalformedRequest => "malformed_request",
            DropReason::HeaderTooLarge => "header_too_large",
            DropReason::HeaderTimeout => "header_timeout",
            DropReason::InvalidTarget => "invalid_target",
            DropReason::AmbiguousPath => "ambiguous_path",
            DropReason::Smuggling => "smuggling",
            DropReason::PolicyDenied => "policy_denied",
            DropReason::NoRules => "no_rules",
            DropReason::H2Protocol => "h2_protocol",
            DropReason::UnmarkableIdentity => "unmarkable_identity",
        }
    }
}

/// Why forwarding failed after the request was allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamError {
    ConnectFailed,
    ConnectTimeout,
    Handshake,
    Request,
    /// The upstream refused the HTTP/2 stream unprocessed (GOAWAY below
    /// its id, or RST_STREAM REFUSED_STREAM) and it could not go again:
    /// part of its body had already left, or it was refused on every try.
    Refused,
}

impl UpstreamError {
    pub const ALL: [UpstreamError; 5] = [
        UpstreamError::ConnectFailed,
        UpstreamError::ConnectTimeout,
        UpstreamError::Handshake,
        UpstreamError::Request,
        UpstreamError::Refused,
    ];
    pub fn name(self) -> &'static str {
        match self {
            UpstreamError::ConnectFailed => "connect_failed",
            UpstreamError::ConnectTimeout => "connect_timeout",
            UpstreamError::Handshake => "handshake",
            UpstreamError::Request => "request",
            UpstreamError::Refused => "refused",
        }
    }
}

/// The request's outcome as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Forwarded,
    Denied,
    Error,
}

impl Verdict {
    const ALL: [Verdict; 3] = [Verdict::Forwarded, Verdict::Denied, Verdict::Error];
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Forwarded => "forwarded",
            Verdict::Denied => "denied",
            Verdict::Error => "error",
        }
    }

    /// The name the flow proto gives this verdict.
    pub fn proto_name(self) -> &'static str {
        match self {
            Verdict::Forwarded => sinew_proto::proxy_v1::L7Verdict::Forwarded.as_str_name(),
            Verdict::Denied => sinew_proto::proxy_v1::L7Verdict::Denied.as_str_name(),
            Verdict::Error => sinew_proto::proxy_v1::L7Verdict::Error.as_str_name(),
        }
    }
}

const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
pub struct Metrics {
    // [direction][verdict][status class 1..=5 -> 0..=4]
    requests: [[[AtomicU64; 5]; 3]; 2],
    /// Requests per latency bucket, not cumulative (the last is +Inf):
    /// one add per request; `render` sums them up.
    latency_buckets: [AtomicU64; BUCKETS.len() + 1],
    latency_sum_micros: AtomicU64,
    active_connections: [AtomicI64; 2],
    connections: [AtomicU64; 2],
    drops: [AtomicU64; DropReason::ALL.len()],
    upstream_errors: [AtomicU64; UpstreamError::ALL.len()],
    pub snapshot_version: AtomicU64,
    pub snapshots_refused: AtomicU64,
    pub agent_connected: AtomicU64,
    pub events_lost: AtomicU64,
    /// HTTP/2 requests sent again on another upstream stream because the
    /// upstream refused them unprocessed (RFC 9113 6.8, 8.7).
    pub upstream_retries: AtomicU64,
    pub draining: AtomicU64,
    /// 1 once the listeners take connections.
    pub listening: AtomicU64,
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

impl Metrics {
    pub fn request(&self, dir: Direction, verdict: Verdict, status: u16, latency: Duration) {
        let v = Verdict::ALL.iter().position(|x| *x == verdict).unwrap_or(0);
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.requests[dir_index(dir)][v][class].fetch_add(1, Relaxed);
        let secs = latency.as_secs_f64();
        let bucket = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.latency_buckets[bucket].fetch_add(1, Relaxed);
        self.latency_sum_micros
            .fetch_add(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn dropped(&self, reason: DropReason) {
        let i = DropReason::ALL.iter().position(|x| *x == reason).unwrap_or(0);
        self.drops[i].fetch_add(1, Relaxed);
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        let i = DropReason::ALL.iter().position(|x| *x == reason).unwrap_or(0);
        self.drops[i].load(Relaxed)
    }

    pub fn upstream_error(&self, e: UpstreamError) {
        let i = UpstreamError::ALL.iter().position(|x| *x == e).unwrap_or(0);
        self.upstream_errors[i].fetch_add(1, Relaxed);
    }

    pub fn upstream_retried(&self) {
        self.upstream_retries.fetch_add(1, Relaxed);
    }

    pub fn upstream_errors(&self, e: UpstreamError) -> u64 {
        let i = UpstreamError::ALL.iter().position(|x| *x == e).unwrap_or(0);
        self.upstream_errors[i].load(Relaxed)
    }

    /// Requests counted with this verdict, every direction and status.
    pub fn requests(&self, verdict: Verdict) -> u64 {
        let v = Verdict::ALL.iter().position(|x| *x == verdict).unwrap_or(0);
        self.requests
            .iter()
            .map(|d| d[v].iter().map(|c| c.load(Relaxed)).sum::<u64>())
            .sum()
    }

    pub fn connection_opened(&self, dir: Direction) {
        self.connections[dir_index(dir)].fetch_add(1, Relaxed);
        self.active_connections[dir_index(dir)].fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self, dir: Direction) {
        self.active_connections[dir_index(dir)].fetch_sub(1, Relaxed);
    }

    pub fn active_connections(&self) -> i64 {
        self.active_connections.iter().map(|a| a.load(Relaxed)).sum()
    }

    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        let dirs = ["ingress", "egress"];
        let _ = writeln!(
            s,
            "# HELP sinew_proxy_requests_total Requests judged, by direction, verdict and status class."
        );
        let _ = writeln!(s, "# TYPE sinew_proxy_requests_total counter");
        for (di, d) in dirs.iter().enumerate() {
            for (vi, v) in Verdict::ALL.iter().enumerate() {
                for c in 0..5 {
                    let _ = writeln!(
                        s,
                        "sinew_proxy_requests_total{{direction=\"{d}\",verdict=\"{}\",status_class=\"{}xx\"}} {}",
                        v.name(),
                        c + 1,
                        self.requests[di][vi][c].load(Relaxed)
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "# HELP sinew_proxy_request_duration_seconds Time from request head to response head."
        );
        let _ = writeln!(s, "# TYPE sinew_proxy_request_duration_seconds histogram");
        let mut count = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            count += self.latency_buckets[i].load(Relaxed);
            let _ = writeln!(s, "sinew_proxy_request_duration_seconds_bucket{{le=\"{b}\"}} {count}");
        }
        count += self.latency_buckets[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(s, "sinew_proxy_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            s,
            "sinew_proxy_request_duration_seconds_sum {}",
            self.latency_sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(s, "sinew_proxy_request_duration_seconds_count {count}");
        let _ = writeln!(s, "# HELP sinew_proxy_active_connections Client connections open now.");
        let _ = writeln!(s, "# TYPE sinew_proxy_active_connections gauge");
        for (di, d) in dirs.iter().enumerate() {
            let _ = writeln!(
                s,
                "sinew_proxy_active_connections{{direction=\"{d}\"}} {}",
                self.active_connections[di].load(Relaxed)
            );
        }
        let _ = writeln!(s, "# HELP sinew_proxy_connections_total Client connections accepted.");
        let _ = writeln!(s, "# TYPE sinew_proxy_connections_total counter");
        for (di, d) in dirs.iter().enumerate() {
            let _ = writeln!(
                s,
                "sinew_proxy_connections_total{{direction=\"{d}\"}} {}",
                self.connections[di].load(Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP sinew_proxy_drops_total Requests or connections refused, by reason."
        );
        let _ = writeln!(s, "# TYPE sinew_proxy_drops_total counter");
        for (i, r) in DropReason::ALL.iter().enumerate() {
            let _ = writeln!(
                s,
                "sinew_proxy_drops_total{{reason=\"{}\"}} {}",
                r.name(),
                self.drops[i].load(Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP sinew_proxy_upstream_errors_total Allowed requests that could not be forwarded."
        );
        let _ = writeln!(s, "# TYPE sinew_proxy_upstream_errors_total counter");
        for (i, r) in UpstreamError::ALL.iter().enumerate() {
            let _ = writeln!(
                s,
                "sinew_proxy_upstream_errors_total{{reason=\"{}\"}} {}",
                r.name(),
                self.upstream_errors[i].load(Relaxed)
            );
        }
        for (name, help, kind, v) in [
            (
                "sinew_proxy_snapshot_version",
                "Version of the rules in force.",
                "gauge",
                &self.snapshot_version,
            ),
            (
                "sinew_proxy_snapshots_refused_total",
                "Snapshots refused (previous rules kept).",
                "counter",
                &self.snapshots_refused,
            ),
            (
                "sinew_proxy_agent_connected",
                "1 while the control stream to the agent is up.",
                "gauge",
                &self.agent_connected,
            ),
            (
                "sinew_proxy_flow_events_lost_total",
                "L7 flow events not delivered to the agent.",
                "counter",
                &self.events_lost,
            ),
            (
                "sinew_proxy_upstream_retries_total",
                "HTTP/2 requests sent again after the upstream refused them unprocessed (GOAWAY, REFUSED_STREAM).",
                "counter",
                &self.upstream_retries,
            ),
            (
                "sinew_proxy_draining",
                "1 while this process drains after SIGTERM.",
                "gauge",
                &self.draining,
            ),
            (
                "sinew_proxy_listening",
                "1 once the listeners take connections.",
                "gauge",
                &self.listening,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} {kind}");
            let _ = writeln!(s, "{name} {}", v.load(Relaxed));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix} in\n{text}"))
    }

    /// Each request adds to one bucket; the rendered histogram is
    /// cumulative, as Prometheus reads it (`le` counts everything at or
    /// below the bound), and +Inf equals the count.
    #[test]
    fn the_latency_histogram_renders_cumulative_buckets() {
        let m = Metrics::default();
        for micros in [300, 400, 3_000, 20_000_000] {
            m.request(
                Direction::Ingress,
                Verdict::Forwarded,
                200,
                Duration::from_micros(micros),
            );
        }
        let t = m.render();
        let b = |le: &str| {
            line(
                &t,
                &format!("sinew_proxy_request_duration_seconds_bucket{{le=\"{le}\"}} "),
            )
            .to_owned()
        };
        assert!(b("0.0005").ends_with(" 2"), "{}", b("0.0005"));
        assert!(b("0.0025").ends_with(" 2"), "{}", b("0.0025"));
        assert!(b("0.005").ends_with(" 3"), "{}", b("0.005"));
        assert!(b("10").ends_with(" 3"), "{}", b("10"));
        assert!(b("+Inf").ends_with(" 4"), "{}", b("+Inf"));
        assert_eq!(
            line(&t, "sinew_proxy_request_duration_seconds_count "),
            "sinew_proxy_request_duration_seconds_count 4"
        );
        assert_eq!(
            line(&t, "sinew_proxy_request_duration_seconds_sum "),
            "sinew_proxy_request_duration_seconds_sum 20.0037"
        );
    }
}
