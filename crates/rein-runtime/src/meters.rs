//! Hands `rein_core::meter`'s measures to a `metrics` recorder (the `/metrics` endpoint's, in
//! `rein serve`). Without a recorder nothing is measured and no event is folded for it.

use rein_core::meter::Measure;
use std::sync::Arc;

/// Where measures go: a recorder of the `metrics` crate (such as the Prometheus exporter's).
pub type Recorder = Arc<dyn metrics::Recorder + Send + Sync>;

/// The runtime's recorder, if it has one.
#[derive(Clone, Default)]
pub(crate) struct Meters(Option<Recorder>);

impl Meters {
    pub(crate) fn new(recorder: Recorder) -> Self {
        Meters(Some(recorder))
    }

    /// Whether measures are wanted (otherwise the driver does not fold events for them).
    pub(crate) fn on(&self) -> bool {
        self.0.is_some()
    }

    /// Applies `measures` to the recorder.
    pub(crate) fn apply(&self, measures: impl IntoIterator<Item = Measure>) {
        if let Some(recorder) = &self.0 {
            record(recorder.as_ref(), measures);
        }
    }
}

/// Applies `measures` to `recorder` (the runtime's own, and the server's scrape-time gauges).
pub fn record(
    recorder: &(dyn metrics::Recorder + Send + Sync),
    measures: impl IntoIterator<Item = Measure>,
) {
    let metadata = metrics::Metadata::new("rein", metrics::Level::INFO, None);
    for measure in measures {
        match measure {
            Measure::Count { name, labels, by } => recorder
                .register_counter(&key(name, labels), &metadata)
                .increment(by),
            Measure::Observe {
                name,
                labels,
                value,
            } => recorder
                .register_histogram(&key(name, labels), &metadata)
                .record(value),
            Measure::Set {
                name,
                labels,
                value,
            } => recorder
                .register_gauge(&key(name, labels), &metadata)
                .set(value),
        }
    }
}

fn key(name: &'static str, labels: Vec<rein_core::meter::Label>) -> metrics::Key {
    metrics::Key::from_parts(
        name,
        labels
            .into_iter()
            .map(|(k, v)| metrics::Label::new(k, v))
            .collect::<Vec<_>>(),
    )
}
