//! `--log-format json`: one JSON object per line, with the fields a log
//! pipeline indexes at the top level (docs/operations.md): `time`, `level`,
//! `component`, `formation`, `node`, `client` where a span carries them,
//! `message`, then the event's own fields and `target`. Span fields are
//! recorded by tracing-subscriber's `JsonFields`; the line is written by
//! serde_json.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// How `hapg` writes its log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: time, level, spans and message on one line.
    #[default]
    Text,
    /// For log pipelines: one JSON object per line.
    Json,
}

impl LogFormat {
    /// The name `--log-format` and `HAPG_LOG_FORMAT` take.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The event formatter of `--log-format json`.
pub struct JsonLines;

/// An event's fields as JSON values.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), Value::from(format!("{value:?}")));
    }
}

/// The component an event comes from when no span names it: its crate.
fn component_of(target: &str) -> &str {
    let krate = target.split("::").next().unwrap_or(target);
    krate.strip_prefix("hapg_").unwrap_or(krate)
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        line.insert("time".into(), Value::from(time));
        line.insert(
            "level".into(),
            Value::from(event.metadata().level().as_str().to_ascii_lowercase()),
        );
        // Span fields, outermost first, so an inner span's value wins.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                // A span without fields records an empty string.
                if let Ok(map) = serde_json::from_str::<Map<String, Value>>(fields) {
                    line.extend(map);
                }
            }
        }
        let mut fields = Map::new();
        event.record(&mut Fields(&mut fields));
        line.extend(fields);
        let target = event.metadata().target();
        line.entry("component")
            .or_insert_with(|| Value::from(component_of(target)));
        line.entry("message").or_insert_with(|| Value::from(""));
        line.insert("target".into(), Value::from(target));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_from_targets() {
        assert_eq!(component_of("hapg_keeper::keeper"), "keeper");
        assert_eq!(component_of("hapg_router"), "router");
        assert_eq!(component_of("hapg::commands"), "hapg");
    }
}
