//! Prometheus metrics, named as the seeds name them.
//!
//! Every metric is `{namespace}_cache_{name}`; the default namespace `cache`
//! gives `cache_{name}` (not `cache_cache_…`), while `brain` gives
//! `brain_cache_hits_total` and `neuralblitz` gives `neuralblitz_cache_hits_total`.
//! Counting is a relaxed atomic add; gauges that need Redis (keys, memory) are
//! set by [`Cache::refresh_gauges`](crate::Cache::refresh_gauges), off the hit path.

use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::CacheError;

/// Operations measured by `*_cache_operations_total` and `*_cache_operation_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A read.
    Get,
    /// A write.
    Set,
    /// A key deletion.
    Delete,
    /// A glob deletion.
    DeletePattern,
    /// A tag invalidation.
    InvalidateTags,
    /// Everything under the prefix.
    Clear,
}

impl Op {
    const ALL: [Op; 6] = [Op::Get, Op::Set, Op::Delete, Op::DeletePattern, Op::InvalidateTags, Op::Clear];

    /// The `operation` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Delete => "delete",
            Op::DeletePattern => "delete_pattern",
            Op::InvalidateTags => "invalidate_tags",
            Op::Clear => "clear",
        }
    }
}

/// One cache's metrics; register them with [`Metrics::register`] to expose them.
pub struct Metrics {
    namespace: String,
    pub(crate) hits: IntCounter,
    pub(crate) misses: IntCounter,
    pub(crate) errors: IntCounter,
    pub(crate) config_errors: IntCounter,
    operations: IntCounterVec,
    // Label lookups resolved once: the hot path indexes an array.
    op_ok: Vec<IntCounter>,
    op_err: Vec<IntCounter>,
    op_duration: Vec<Histogram>,
    durations: HistogramVec,
    pub(crate) keys: IntGauge,
    pub(crate) memory_bytes: IntGauge,
    pub(crate) size_bytes: IntGauge,
    pub(crate) warmup_duration: Histogram,
    pub(crate) ttl_seconds: IntGaugeVec,
    pub(crate) breaker_state: IntGauge,
    pub(crate) write_behind: WriteBehindMetrics,
    hit_rate: HitRate,
    registry: Registry,
}

/// The write-behind queue's figures: the gauges are the queue's in Redis
/// (every instance sees the same), the counters this process's flusher's.
#[derive(Clone)]
pub(crate) struct WriteBehindMetrics {
    pub(crate) queue_length: IntGauge,
    pub(crate) oldest_job_age: Gauge,
    pub(crate) applied: IntCounter,
    pub(crate) retries: IntCounter,
    pub(crate) dead_letters: IntCounter,
}

/// `*_cache_hit_rate`, worked out from the two counters when scraped: always
/// current, and nothing added to the hit path.
#[derive(Clone)]
struct HitRate {
    hits: IntCounter,
    misses: IntCounter,
    gauge: Gauge,
}

impl HitRate {
    fn get(&self) -> f64 {
        crate::stats::hit_rate(self.hits.get(), self.misses.get())
    }
}

impl Collector for HitRate {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.gauge.set(self.get());
        self.gauge.collect()
    }
}

impl Metrics {
    pub(crate) fn new(namespace: &str) -> Result<Metrics, CacheError> {
        let name = |metric: &str| match namespace {
            "" | "cache" => format!("cache_{metric}"),
            ns => format!("{ns}_cache_{metric}"),
        };
        let err = |e: prometheus::Error| CacheError::config("metrics_namespace", namespace, e.to_string());
        let counter =
            |metric: &str, help: &str| IntCounter::with_opts(Opts::new(name(metric), help)).map_err(err);
        let gauge =
            |metric: &str, help: &str| IntGauge::with_opts(Opts::new(name(metric), help)).map_err(err);
        let operations = IntCounterVec::new(
            Opts::new(name("operations_total"), "Cache operations by operation and status"),
            &["operation", "status"],
        )
        .map_err(err)?;
        let durations = HistogramVec::new(
            HistogramOpts::new(name("operation_duration_seconds"), "Cache operation latency").buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            &["operation"],
        )
        .map_err(err)?;
        let hits = counter("hits_total", "Cache hits")?;
        let misses = counter("misses_total", "Cache misses")?;
        let hit_rate = HitRate {
            hits: hits.clone(),
            misses: misses.clone(),
            gauge: Gauge::with_opts(Opts::new(
                name("hit_rate"),
                "Hits over lookups since the cache started, 0 before any lookup",
            ))
            .map_err(err)?,
        };
        let metrics = Metrics {
            namespace: namespace.to_owned(),
            hits,
            misses,
            errors: counter("errors_total", "Cache faults absorbed by falling back to the function")?,
            config_errors: counter(
                "config_errors_total",
                "Redis calls refused for the cache's credentials or ACL permissions",
            )?,
            op_ok: Op::ALL.iter().map(|op| operations.with_label_values(&[op.as_str(), "success"])).collect(),
            op_err: Op::ALL.iter().map(|op| operations.with_label_values(&[op.as_str(), "error"])).collect(),
            op_duration: Op::ALL.iter().map(|op| durations.with_label_values(&[op.as_str()])).collect(),
            operations,
            durations,
            keys: gauge("keys_total", "Keys under the cache's prefix")?,
            memory_bytes: gauge("memory_bytes", "Memory used by Redis")?,
            size_bytes: gauge("size_bytes", "Bytes held by the local tier")?,
            warmup_duration: Histogram::with_opts(
                HistogramOpts::new(name("warmup_duration_seconds"), "Cache warm-up duration")
                    .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0]),
            )
            .map_err(err)?,
            ttl_seconds: IntGaugeVec::new(
                Opts::new(name("ttl_seconds"), "Configured TTL by key type"),
                &["key_type"],
            )
            .map_err(err)?,
            breaker_state: gauge("circuit_breaker_state", "0 closed, 1 open, 2 half-open")?,
            write_behind: WriteBehindMetrics {
                queue_length: gauge(
                    "write_behind_queue_length",
                    "Write-behind jobs queued and not yet acknowledged",
                )?,
                oldest_job_age: Gauge::with_opts(Opts::new(
                    name("write_behind_oldest_job_age_seconds"),
                    "Age of the oldest write-behind job not yet acknowledged, 0 with none",
                ))
                .map_err(err)?,
                applied: counter(
                    "write_behind_applied_total",
                    "Write-behind jobs this process's flusher applied and acknowledged",
                )?,
                retries: counter(
                    "write_behind_retries_total",
                    "Write-behind job attempts that failed and were retried",
                )?,
                dead_letters: counter(
                    "write_behind_dead_letters_total",
                    "Write-behind jobs moved to the dead-letter stream",
                )?,
            },
            hit_rate,
            registry: Registry::new(),
        };
        metrics.register(&metrics.registry)?;
        Ok(metrics)
    }

    /// The metrics of a cache built from `config`, with its named TTLs set.
    pub(crate) fn for_config(config: &crate::CacheConfig) -> Metrics {
        // Checked when the config was built; a hand-assembled bad namespace degrades to the default.
        let metrics = Metrics::new(&config.metrics_namespace).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "bad metrics namespace: using `cache`");
            Metrics::new("cache").expect("the default namespace is valid")
        });
        for (name, ttl) in &config.named_ttls {
            metrics.ttl_seconds.with_label_values(&[name]).set(ttl.as_secs() as i64);
        }
        metrics
    }

    /// The namespace the names were built with.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Registers every metric with `registry` (for example `prometheus::default_registry()`).
    pub fn register(&self, registry: &Registry) -> Result<(), CacheError> {
        let wb = &self.write_behind;
        let collectors: [Box<dyn Collector>; 18] = [
            Box::new(self.hits.clone()),
            Box::new(self.misses.clone()),
            Box::new(self.errors.clone()),
            Box::new(self.config_errors.clone()),
            Box::new(self.operations.clone()),
            Box::new(self.durations.clone()),
            Box::new(self.keys.clone()),
            Box::new(self.memory_bytes.clone()),
            Box::new(self.size_bytes.clone()),
            Box::new(self.warmup_duration.clone()),
            Box::new(self.ttl_seconds.clone()),
            Box::new(self.breaker_state.clone()),
            Box::new(self.hit_rate.clone()),
            Box::new(wb.queue_length.clone()),
            Box::new(wb.oldest_job_age.clone()),
            Box::new(wb.applied.clone()),
            Box::new(wb.retries.clone()),
            Box::new(wb.dead_letters.clone()),
        ];
        for c in collectors {
            registry
                .register(c)
                .map_err(|e| CacheError::InvalidArgument(format!("metrics registration failed: {e}")))?;
        }
        Ok(())
    }

    /// Records how long a warm-up took (`*_cache_warmup_duration_seconds`).
    pub fn observe_warmup(&self, took: Duration) {
        self.warmup_duration.observe(took.as_secs_f64());
    }

    /// Cache faults absorbed so far (`*_cache_errors_total`).
    pub fn errors_total(&self) -> u64 {
        self.errors.get()
    }

    /// Hits so far (`*_cache_hits_total`).
    pub fn hits_total(&self) -> u64 {
        self.hits.get()
    }

    /// Misses so far (`*_cache_misses_total`).
    pub fn misses_total(&self) -> u64 {
        self.misses.get()
    }

    /// Hits over lookups since the cache started (`*_cache_hit_rate`), 0 before any lookup.
    pub fn hit_rate(&self) -> f64 {
        self.hit_rate.get()
    }

    /// This cache's metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Counts one operation and observes its latency: what every cache call pays.
    #[inline]
    pub fn record(&self, op: Op, ok: bool, took: Duration) {
        self.count(op, ok);
        self.op_duration[op as usize].observe(took.as_secs_f64());
    }

    /// Counts an operation without timing it: a read the in-process tier
    /// answered takes a fraction of a microsecond, less than timing it costs.
    pub(crate) fn count(&self, op: Op, ok: bool) {
        let i = op as usize;
        if ok { &self.op_ok[i] } else { &self.op_err[i] }.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_namespace() {
        let brain = Metrics::new("brain").unwrap();
        brain.hits.inc();
        brain.record(Op::Get, true, Duration::from_micros(300));
        let text = brain.render();
        for name in [
            "brain_cache_hits_total 1",
            "brain_cache_misses_total 0",
            "brain_cache_operations_total{operation=\"get\",status=\"success\"} 1",
            "brain_cache_operation_duration_seconds_bucket{operation=\"get\",le=\"0.0005\"} 1",
            "brain_cache_keys_total",
            "brain_cache_memory_bytes",
            "brain_cache_circuit_breaker_state",
            "brain_cache_hit_rate 1",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        let default = Metrics::new("cache").unwrap();
        let text = default.render();
        assert!(text.contains("\ncache_hits_total 0"));
        assert!(text.contains("\ncache_hit_rate 0\n"), "0 before any lookup:\n{text}");
        default.hits.inc();
        default.misses.inc_by(3);
        assert!(default.render().contains("\ncache_hit_rate 0.25\n"));
        assert_eq!(default.hit_rate(), 0.25);
        let nb = Metrics::new("neuralblitz").unwrap();
        nb.size_bytes.set(5);
        assert!(nb.render().contains("neuralblitz_cache_size_bytes 5"));
    }

    #[test]
    fn a_bad_namespace_is_a_config_error() {
        assert!(matches!(Metrics::new("no spaces"), Err(CacheError::Config { .. })));
    }

    #[test]
    fn registering_twice_in_one_registry_fails_cleanly() {
        let m = Metrics::new("svc").unwrap();
        let registry = Registry::new();
        m.register(&registry).unwrap();
        assert!(m.register(&registry).is_err());
    }
}
