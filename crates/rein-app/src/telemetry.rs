//! Trace export over OTLP/HTTP (protobuf), off unless an endpoint is configured: by the standard
//! OpenTelemetry environment variables (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`,
//! `OTEL_SERVICE_NAME`, `OTEL_SDK_DISABLED`) or by `[telemetry] otlp_endpoint`.
//!
//! The spans are `rein_core::spans`' (made from a run's log once it ends); this module only
//! converts them and hands them to the SDK's batch processor, which exports from a thread of
//! its own. [`shutdown`] flushes what is queued: every command calls it before the process
//! exits.

use crate::config::{LogFormat, Telemetry};
use crate::error::{Error, Result};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, StringValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use rein_core::spans::{self, Span, SpanSink};
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The process's exporter, once [`exporter`] has made one.
static EXPORTER: OnceLock<Option<Arc<Otlp>>> = OnceLock::new();

/// The process's OTLP exporter, made on first use from the environment and `config`; `None`
/// when export is off.
pub fn exporter(config: &Telemetry) -> Result<Option<Arc<Otlp>>> {
    if let Some(made) = EXPORTER.get() {
        return Ok(made.clone());
    }
    let made = Otlp::from_env(config)?.map(Arc::new);
    Ok(EXPORTER.get_or_init(|| made).clone())
}

/// Exports every span still queued, then stops the exporter (the process is about to exit).
pub fn shutdown() {
    if let Some(Some(otlp)) = EXPORTER.get() {
        let _ = otlp.processor.force_flush();
        let _ = otlp.processor.shutdown();
    }
}

/// Sends the process's log lines to standard error, as text or JSON (`[telemetry] log_format`,
/// or `REIN_LOG_FORMAT=json|text`, which wins), filtered by `REIN_LOG` (`info` by default; the
/// `tracing` filter syntax, such as `rein_runtime=debug,warn`). Once per process.
pub fn init_logs(config: &Telemetry) -> Result<()> {
    let format = match env("REIN_LOG_FORMAT").as_deref() {
        None => config.log_format,
        Some("json") => LogFormat::Json,
        Some("text") => LogFormat::Text,
        Some(other) => {
            return Err(Error::BadInput(format!(
                "REIN_LOG_FORMAT={other}: the log format is `text` or `json`"
            )));
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(env("REIN_LOG").unwrap_or("info".into()))
        .map_err(|e| Error::BadInput(format!("REIN_LOG: {e}")))?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    // A second call (a test running two servers in one process) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => logs.try_init(),
    };
    Ok(())
}

/// Spans of ended runs, exported over OTLP/HTTP.
pub struct Otlp {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Otlp {
    fn from_env(config: &Telemetry) -> Result<Option<Otlp>> {
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let from_env = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .is_some();
        if !from_env && config.otlp_endpoint.is_none() {
            return Ok(None);
        }
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(protocol) = env(name).filter(|p| p != "http/protobuf") {
                return Err(Error::BadInput(format!(
                    "{name}={protocol}: Rein exports traces over OTLP/HTTP with protobuf only; set it to http/protobuf or unset it"
                )));
            }
        }
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(Duration::from_secs(10));
        if let (false, Some(base)) = (from_env, &config.otlp_endpoint) {
            builder = builder.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
        }
        let exporter = builder
            .build()
            .map_err(|e| Error::unavailable("cannot set up the OTLP trace exporter", e))?;
        let mut processor = BatchSpanProcessor::builder(exporter).build();
        let resource = match env("OTEL_SERVICE_NAME") {
            Some(_) => Resource::builder().build(),
            None => Resource::builder().with_service_name("rein").build(),
        };
        processor.set_resource(&resource);
        Ok(Some(Otlp {
            processor,
            scope: InstrumentationScope::builder("rein")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }))
    }

    fn span_data(&self, span: Span) -> SpanData {
        let context = |span_id: [u8; 8]| {
            SpanContext::new(
                TraceId::from_bytes(span.trace_id),
                SpanId::from_bytes(span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            )
        };
        let mut events = SpanEvents::default();
        events.events = span
            .events
            .iter()
            .map(|e| {
                opentelemetry::trace::Event::new(
                    e.name,
                    at(e.at_ms),
                    e.attributes.iter().map(key_value).collect(),
                    0,
                )
            })
            .collect();
        SpanData {
            span_context: context(span.span_id),
            parent_span_id: span.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: span.remote_parent,
            span_kind: match span.kind {
                spans::Kind::Internal => SpanKind::Internal,
                spans::Kind::Client => SpanKind::Client,
            },
            name: Cow::Owned(span.name.clone()),
            start_time: at(span.start_ms),
            end_time: at(span.end_ms.max(span.start_ms)),
            attributes: span.attributes.iter().map(key_value).collect(),
            dropped_attributes_count: 0,
            events,
            links: SpanLinks::default(),
            status: match &span.status {
                spans::Status::Ok => Status::Ok,
                spans::Status::Error(why) => Status::error(why.clone()),
            },
            instrumentation_scope: self.scope.clone(),
        }
    }
}

impl SpanSink for Otlp {
    fn export(&self, spans: Vec<Span>) {
        for span in spans {
            self.processor.on_end(self.span_data(span));
        }
    }
}

fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn key_value((key, value): &(&'static str, spans::Value)) -> KeyValue {
    let key = *key;
    match value {
        spans::Value::Str(s) => KeyValue::new(key, s.clone()),
        spans::Value::Int(i) => KeyValue::new(key, *i),
        spans::Value::Float(f) => KeyValue::new(key, *f),
        spans::Value::Bool(b) => KeyValue::new(key, *b),
        spans::Value::StrList(list) => KeyValue::new(
            key,
            opentelemetry::Value::Array(opentelemetry::Array::String(
                list.iter().map(|s| StringValue::from(s.clone())).collect(),
            )),
        ),
    }
}
