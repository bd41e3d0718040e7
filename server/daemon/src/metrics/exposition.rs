//! The two text formats a scrape can ask for, and the choice between them
//! by the `Accept` header.

use prometheus_client::registry::Registry;

/// A text exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4: what `curl` and most
    /// tools get.
    Prometheus,
    /// OpenMetrics 1.0 text (`# UNIT` lines, `# EOF`): what Prometheus
    /// itself asks for first.
    OpenMetrics,
}

const OPENMETRICS_TYPE: &str = "application/openmetrics-text";
const TEXT_TYPE: &str = "text/plain";

impl Format {
    /// The format a client's `Accept` header prefers: OpenMetrics when it
    /// lists `application/openmetrics-text` with a quality at least that
    /// of `text/plain` (and of `*/*`), else the Prometheus text format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let (mut openmetrics, mut text) = (None::<f32>, None::<f32>);
        for range in accept.split(',') {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or_default().to_ascii_lowercase();
            let q = params
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            let best = |slot: &mut Option<f32>| *slot = Some(slot.map_or(q, |s| s.max(q)));
            match media.as_str() {
                OPENMETRICS_TYPE => best(&mut openmetrics),
                TEXT_TYPE | "text/*" | "*/*" => best(&mut text),
                _ => {}
            }
        }
        match openmetrics {
            Some(om) if om > 0.0 && om >= text.unwrap_or(0.0) => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// Every metric of `registry`, in this format.
    pub fn encode(self, registry: &Registry) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        match self {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?
            }
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry)?,
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        use Format::*;
        assert_eq!(Format::negotiate(None), Prometheus);
        assert_eq!(Format::negotiate(Some("*/*")), Prometheus);
        assert_eq!(Format::negotiate(Some("text/plain")), Prometheus);
        assert_eq!(Format::negotiate(Some("application/json")), Prometheus);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text")),
            OpenMetrics
        );
        // What Prometheus 3 sends by default.
        let prometheus = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,\
                          application/openmetrics-text;version=0.0.1;q=0.5,\
                          text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,\
                          text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(Format::negotiate(Some(prometheus)), OpenMetrics);
        // A scraper configured to prefer the classic format.
        assert_eq!(
            Format::negotiate(Some(
                "text/plain;version=0.0.4;q=0.9, application/openmetrics-text;q=0.5"
            )),
            Prometheus
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Prometheus
        );
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text; version=1.0.0")),
            OpenMetrics
        );
    }

    #[test]
    fn both_formats_encode() {
        use prometheus_client::metrics::counter::Counter;
        let mut registry = Registry::with_prefix("forkd");
        let c: Counter = Counter::default();
        c.inc_by(3);
        registry.register("things", "Things", c);
        let text = Format::Prometheus.encode(&registry).unwrap();
        assert_eq!(
            text,
            "# HELP forkd_things_total Things.\n# TYPE forkd_things_total counter\n\
             forkd_things_total 3\n"
        );
        let om = Format::OpenMetrics.encode(&registry).unwrap();
        assert!(
            om.contains("# TYPE forkd_things counter\nforkd_things_total 3\n"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(Format::Prometheus
            .content_type()
            .starts_with("text/plain; version=0.0.4"));
    }
}
