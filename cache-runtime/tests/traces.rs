//! Spans: one per cached call with how it ended, one per invalidation with
//! counts and never names, and none of the call spans at INFO.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_runtime::cached;
use support::{both_modes, Redis, CURRENT};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// A span as it closed: its name and every field it was given.
#[derive(Debug, Clone)]
struct Closed {
    name: &'static str,
    fields: BTreeMap<String, String>,
}

impl Closed {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// Collects the spans that closed.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<Closed>>>);

impl Spans {
    fn take(&self) -> Vec<Closed> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        ctx.span(id).unwrap().extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        let mut extensions = span.extensions_mut();
        values.record(extensions.get_mut::<Fields>().unwrap());
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).unwrap();
        let fields = span.extensions_mut().remove::<Fields>().unwrap_or_default();
        self.0.lock().unwrap().push(Closed { name: span.name(), fields: fields.0 });
    }
}

#[cached(cache = support::current(), ttl = 60, prefix = "traced")]
async fn traced(id: u32) -> u32 {
    id * 2
}

/// The `outcome` of each `cache.call` span, in the order they closed.
fn outcomes(spans: &[Closed]) -> Vec<&str> {
    spans.iter().filter(|s| s.name == "cache.call").map(|s| s.field("outcome").unwrap_or("none")).collect()
}

#[tokio::test]
async fn each_call_has_a_span_saying_how_it_ended() {
    let redis = Redis::start();
    for cache in both_modes(&redis, "spans").await {
        let spans = Spans::default();
        let subscriber = tracing_subscriber::registry().with(LevelFilter::DEBUG).with(spans.clone());
        let _guard = tracing::subscriber::set_default(subscriber);

        assert_eq!(cache.get_with("mission:7", async { 7u64 }).await, 7);
        assert_eq!(cache.get_with("mission:7", async { 8u64 }).await, 7);
        let calls = spans.take();
        assert_eq!(outcomes(&calls), ["filled", "hit"], "{calls:?}");
        assert!(
            calls
                .iter()
                .all(|s| s.field("function") == Some("get_with") && s.field("key") == Some("mission:7")),
            "{calls:?}"
        );

        // Invalidated while the body ran: the fence refuses the fill.
        let invalidating = async {
            cache.delete("raced").await.unwrap();
            1u64
        };
        assert_eq!(cache.get_with("raced", invalidating).await, 1);
        assert_eq!(outcomes(&spans.take()), ["refused"]);

        // The second caller waits for the first one's flight.
        let slow = |n: u64| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            n
        };
        let (a, b) = tokio::join!(cache.get_with("joined", slow(3)), cache.get_with("joined", slow(4)));
        assert_eq!(a, b, "one body ran for both");
        let mut joined = outcomes(&spans.take()).into_iter().map(str::to_owned).collect::<Vec<_>>();
        joined.sort();
        assert_eq!(joined, ["filled", "shared"]);

        // Not cached: an `Err` runs the body and stores nothing.
        let failed: Result<u64, Arc<String>> =
            cache.try_get_with("failing", async { Err("down".to_owned()) }).await;
        assert!(failed.is_err());
        assert_eq!(outcomes(&spans.take()), ["miss"]);

        CURRENT
            .scope(cache.clone(), async {
                assert_eq!(traced(4).await, 8);
                assert_eq!(traced_refresh(4).await, 8);
            })
            .await;
        let macro_spans = spans.take();
        let call = macro_spans.iter().find(|s| s.name == "cache.call").expect("the macro's call span");
        assert_eq!(call.field("function"), Some("traced"));
        let key = call.field("key").unwrap();
        assert!(key.starts_with("traced:") && key.ends_with(":4"), "the relative key, not {key}");
        let refresh = macro_spans.iter().find(|s| s.name == "cache.refresh").expect("the refresh span");
        assert_eq!((refresh.field("function"), refresh.field("outcome")), (Some("traced"), Some("filled")));
    }
}

#[tokio::test]
async fn invalidations_name_counts_never_keys_and_call_spans_stay_below_info() {
    let redis = Redis::start();
    for cache in both_modes(&redis, "info_spans").await {
        let spans = Spans::default();
        let subscriber = tracing_subscriber::registry().with(LevelFilter::INFO).with(spans.clone());
        let _guard = tracing::subscriber::set_default(subscriber);

        cache.set("user:alice", &1u32).tags(["team:red"]).await.unwrap();
        cache.set("user:bob", &2u32).tags(["team:blue"]).await.unwrap();
        assert_eq!(cache.get_with("user:carol", async { 3u32 }).await, 3);
        assert!(cache.delete("user:alice").await.unwrap());
        assert_eq!(cache.invalidate_tags(["team:blue", "team:green"]).await.unwrap(), 1);
        assert_eq!(cache.delete_pattern("user:*").await.unwrap(), 1);
        cache.clear().await.unwrap();

        let closed = spans.take();
        assert!(
            closed.iter().all(|s| s.name == "cache.invalidate"),
            "only the invalidations at INFO: {closed:?}"
        );
        let seen: Vec<(&str, &str, &str)> = closed
            .iter()
            .map(|s| {
                (s.field("operation").unwrap(), s.field("arguments").unwrap(), s.field("deleted").unwrap())
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("delete", "1", "1"),
                ("invalidate_tags", "2", "1"),
                ("delete_pattern", "1", "1"),
                ("clear", "0", "0")
            ]
        );
        for span in &closed {
            assert!(span.fields.values().all(|v| !v.contains("user") && !v.contains("team")), "{span:?}");
        }
    }
}
