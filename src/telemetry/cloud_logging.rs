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
        write_preamble(&mut writer, *event.metadata().level(), event.metadata().target())?;
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

/// The start of every line, up to the target:
/// `{"severity":"INFO","time":"2026-12-01T08:20:12.679809Z","target":"access"`.
pub fn write_preamble(out: &mut (impl Write + ?Sized), level: Level, target: &str) -> fmt::Result {
    let severity = match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    };
    out.write_str(r#"{"severity":""#)?;
    out.write_str(severity)?;
    out.write_str(r#"","time":""#)?;
    write_rfc3339_micros(out, SystemTime::now())?;
    out.write_str(r#"","target":"#)?;
    write_json_str(out, target)
}

/// `at` as RFC 3339 UTC with microseconds (`2026-12-01T08:20:12.679809Z`),
/// without going through `fmt` machinery for each part: this runs for
/// every access-log line.
pub fn write_rfc3339_micros(out: &mut (impl Write + ?Sized), at: SystemTime) -> fmt::Result {
    let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (year, month, day) = civil_date((seconds / 86_400) as i64);
    let of_day = seconds % 86_400;
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    put(20, 6, u64::from(since_epoch.subsec_micros()));
    out.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
}

/// Year, month and day of the `days`th day after 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_date(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u64;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u64;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `value` as a JSON string, quotes included.
pub fn write_json_str(out: &mut (impl Write + ?Sized), value: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(value)?;
    out.write_char('"')
}

/// Escapes whatever is written through it for the inside of a JSON string.
pub struct Escaped<'a, W: ?Sized>(pub &'a mut W);

impl<W: Write + ?Sized> Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        if !text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f) {
            return self.0.write_str(text);
        }
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

    #[test]
    fn times_are_written_as_humantime_writes_them() {
        let samples = [
            0,
            951_782_400,     // 2000-02-29
            1_798_761_599,   // 2026-12-31T23:59:59
            4_102_444_800,   // 2100-01-01 (not a leap year)
            253_402_300_799, // 9999-12-31T23:59:59
        ];
        for seconds in samples
            .into_iter()
            .chain((0..2000).map(|i| 1_700_000_000 + i * 86_399 * 17))
        {
            for micros in [0, 1, 999_999, 123_456] {
                let at = std::time::UNIX_EPOCH + std::time::Duration::new(seconds, micros * 1000);
                let mut ours = String::new();
                write_rfc3339_micros(&mut ours, at).unwrap();
                assert_eq!(ours, humantime::format_rfc3339_micros(at).to_string());
            }
        }
    }

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

    use super::super::render_with_cloud_logging as render;

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
