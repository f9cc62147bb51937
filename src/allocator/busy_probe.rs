//! Asks a user's backend whether it is still working for them, so a user
//! who closed the tab during a long batch does not lose it to an idle
//! release (the reaper's, or another replica's sweep). The WebUI answers on `/sdapi/v1/progress` when started with
//! `--api`: `state.job_count` is the number of queued and running jobs,
//! `progress` the running one's fraction done.

use std::time::Duration;

use http::uri::Authority;
use serde_json::Value;

/// A probe that takes longer than this counts as "not busy": a backend that
/// cannot answer is no reason to hold a GPU.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct BusyProbe {
    http: reqwest::Client,
    path: String,
}

impl BusyProbe {
    pub fn new(path: &str) -> BusyProbe {
        let http = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a plain HTTP client always builds");
        BusyProbe {
            http,
            path: path.to_string(),
        }
    }

    /// Whether the backend at `upstream` reports a job in progress. Any
    /// failure (refused, timed out, not 200, not the expected JSON) is `false`.
    pub async fn is_busy(&self, upstream: &Authority) -> bool {
        let url = format!("http://{upstream}{}", self.path);
        let answer = async {
            let response = self.http.get(&url).send().await?.error_for_status()?;
            response.json::<Value>().await
        };
        match answer.await {
            Ok(progress) => reports_job(&progress),
            Err(e) => {
                tracing::debug!(%upstream, error = %e, "busy probe failed; not postponing");
                false
            }
        }
    }
}

/// A1111's progress answer: a job is queued or running.
fn reports_job(progress: &Value) -> bool {
    let job_count = progress["state"]["job_count"].as_i64().unwrap_or(0);
    let fraction = progress["progress"].as_f64().unwrap_or(0.0);
    job_count > 0 || fraction > 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_or_running_job_is_busy_and_an_idle_webui_is_not() {
        let idle = serde_json::json!({"progress": 0.0, "eta_relative": 0.0,
            "state": {"skipped": false, "interrupted": false, "job": "", "job_count": 0, "job_no": 0}});
        assert!(!reports_job(&idle));
        let queued = serde_json::json!({"progress": 0.0, "state": {"job_count": 2}});
        assert!(reports_job(&queued));
        let running = serde_json::json!({"progress": 0.42, "state": {"job_count": 0}});
        assert!(reports_job(&running));
        assert!(!reports_job(&serde_json::json!({"detail": "Not Found"})));
    }
}
