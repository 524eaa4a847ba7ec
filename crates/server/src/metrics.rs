//! Prometheus metrics: jobs by state, queue depth, sandbox start latency,
//! job duration, HTTP requests by route and status.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

pub struct Metrics {
    pub registry: Registry,
    pub jobs: Family<StateLabel, Gauge>,
    pub queue_depth: Gauge,
    pub sandbox_start: Histogram,
    pub job_duration: Histogram,
    pub http: Family<HttpLabels, Counter>,
    /// Refused requests without a valid key past the audit budget.
    pub unaudited_refusals: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("agentvm");
        let jobs = Family::<StateLabel, Gauge>::default();
        let queue_depth = Gauge::default();
        let sandbox_start =
            Histogram::new([0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0].into_iter());
        let job_duration = Histogram::new(
            [
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
            ]
            .into_iter(),
        );
        let http = Family::<HttpLabels, Counter>::default();
        registry.register("jobs", "Jobs by state", jobs.clone());
        registry.register("queue_depth", "Jobs waiting to run", queue_depth.clone());
        registry.register(
            "sandbox_start_seconds",
            "From starting a sandbox to the command's exec",
            sandbox_start.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Wall time of a job from start to end",
            job_duration.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            http.clone(),
        );
        let unaudited_refusals = Counter::default();
        registry.register(
            "unaudited_refusals",
            "Refused requests without a valid API key that were not audited one by one (past the audit budget)",
            unaudited_refusals.clone(),
        );
        Metrics {
            unaudited_refusals,
            registry,
            jobs,
            queue_depth,
            sandbox_start,
            job_duration,
            http,
        }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
