//! JSON lines in the shape Cloud Logging reads from a container's stderr:
//! `severity`, `time`, `message`, the event's fields, and an `httpRequest`
//! object built from the fields named `httpRequest.<key>`.
//!
//! Written straight into the line buffer, field by field: no intermediate
//! `serde_json::Value`, no parsing back. This runs for every request (the
//! access log), so it allocates at most once per line.

use std::fmt::{self, Write};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Fields with this prefix form the `httpRequest` object
/// (Cloud Logging's `HttpRequest`), e.g. `httpRequest.status`.
pub const HTTP_REQUEST_PREFIX: &str = "httpRequest.";

pub struct CloudLogging;

impl<S, N> FormatEvent<S, N> for CloudLogging
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let severity = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            Level::DEBUG | Level::TRACE => "DEBUG",
        };
        write!(
            writer,
            r#"{{"severity":"{severity}","time":"{}","target":"#,
            humantime::format_rfc3339_micros(SystemTime::now())
        )?;
        write_json_str(&mut writer, event.metadata().target())?;
        let mut fields = Fields {
            line: &mut writer,
            http_request: String::new(),
            has_message: false,
            result: Ok(()),
        };
        event.record(&mut fields);
        let Fields {
            http_request,
            has_message,
            result,
            ..
        } = fields;
        result?;
        if !has_message {
            writer.write_str(r#","message":"""#)?;
        }
        if !http_request.is_empty() {
            write!(writer, r#","httpRequest":{{{http_request}}}"#)?;
        }
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value` into the line, or into the
/// `httpRequest` object for the prefixed ones.
struct Fields<'a, W> {
    line: &'a mut W,
    /// The members of `httpRequest`, comma-separated, without braces.
    http_request: String,
    has_message: bool,
    result: fmt::Result,
}

impl<W: Write> Fields<'_, W> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut dyn Write) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        self.has_message |= name == "message";
        self.result = match name.strip_prefix(HTTP_REQUEST_PREFIX) {
            Some(member) => {
                let out = &mut self.http_request;
                let comma = if out.is_empty() { "" } else { "," };
                write!(out, "{comma}").and_then(|()| member_to(out, member, value))
            }
            None => self
                .line
                .write_char(',')
                .and_then(|()| member_to(self.line, name, value)),
        };
    }
}

fn member_to(out: &mut dyn Write, name: &str, value: impl FnOnce(&mut dyn Write) -> fmt::Result) -> fmt::Result {
    write_json_str(out, name)?;
    out.write_char(':')?;
    value(out)
}

impl<W: Write> Visit for Fields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| write_json_str(out, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        self.field(field, |out| {
            if value.is_finite() {
                write!(out, "{value}")
            } else {
                out.write_str("null")
            }
        });
    }

    /// Also what `%value` (Display) and the message arrive through.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| {
            out.write_char('"')?;
            write!(Escaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// `value` as a JSON string, quotes included.
pub fn write_json_str(out: &mut (impl Write + ?Sized), value: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(value)?;
    out.write_char('"')
}

/// Escapes whatever is written through it for the inside of a JSON string.
struct Escaped<'a, W: ?Sized>(&'a mut W);

impl<W: Write + ?Sized> Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut clean_from = 0;
        for (i, byte) in text.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f | 0x7f => "",
                _ => continue,
            };
            self.0.write_str(&text[clean_from..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            clean_from = i + 1;
        }
        self.0.write_str(&text[clean_from..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(text: &str) -> String {
        let mut out = String::new();
        write_json_str(&mut out, text).unwrap();
        out
    }

    #[test]
    fn strings_are_escaped_as_json_requires_and_read_back_unchanged() {
        for text in [
            "plain",
            "quote \" and \\ back",
            "line\nbreak\r\ttab",
            "\u{1}\u{1f}\u{7f}",
            "ünïcødé ✓",
            "",
        ] {
            let json = escaped(text);
            let back: String = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(back, text);
        }
        assert_eq!(escaped("a\u{1}b"), r#""a\u0001b""#);
    }

    /// Renders one event through the formatter, as the subscriber would.
    fn render(emit: impl FnOnce()) -> serde_json::Value {
        use std::sync::{Arc, Mutex};
        #[derive(Clone)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer(Arc::new(Mutex::new(Vec::new())));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(CloudLogging)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buffer.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "one line: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    #[test]
    fn an_access_event_becomes_one_line_with_an_http_request_object() {
        let agent = "curl/8 \"quoted\"";
        let line = render(|| {
            tracing::event!(
                target: "access",
                Level::INFO,
                httpRequest.requestMethod = "GET",
                httpRequest.status = 200u64,
                httpRequest.responseSize = %1234,
                httpRequest.userAgent = agent,
                httpRequest.remoteIp = None::<&str>,
                kind = "proxied",
                completed = true,
                "logging.googleapis.com/trace" = "projects/p/traces/abc",
                "{} {}", "GET", "/x?y=\"z\""
            )
        });
        assert_eq!(line["severity"], "INFO");
        assert_eq!(line["target"], "access");
        assert_eq!(line["message"], "GET /x?y=\"z\"");
        assert_eq!(line["kind"], "proxied");
        assert_eq!(line["completed"], true);
        assert_eq!(line["logging.googleapis.com/trace"], "projects/p/traces/abc");
        let http = &line["httpRequest"];
        assert_eq!(http["requestMethod"], "GET");
        assert_eq!(http["status"], 200);
        assert_eq!(
            http["responseSize"], "1234",
            "sizes are strings, as Cloud Logging wants"
        );
        assert_eq!(http["userAgent"], agent);
        assert!(http.get("remoteIp").is_none(), "an absent value is left out");
        let time = line["time"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
    }

    #[test]
    fn every_line_has_a_message_and_a_severity() {
        let line = render(|| tracing::warn!(count = 3i64, ratio = f64::NAN));
        assert_eq!(line["severity"], "WARNING");
        assert_eq!(line["message"], "");
        assert_eq!(line["count"], 3);
        assert!(line["ratio"].is_null());
        assert!(line.get("httpRequest").is_none());
    }
}
