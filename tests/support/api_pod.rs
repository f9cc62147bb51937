//! A stand-in WebUI started with `--api`, for the busy probe.

/// `/whoami` for routing, and `/sdapi/v1/progress` answering with the job count the test sets
/// (`None`: the endpoint is missing, 404).
pub struct ApiPod {
    pub url: String,
    pub addr: std::net::SocketAddr,
    jobs: std::sync::Arc<std::sync::Mutex<Option<i64>>>,
    probes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiPod {
    pub async fn start(jobs: Option<i64>) -> ApiPod {
        use axum::{extract::State, routing::get, Json, Router};
        type Shared = (
            std::sync::Arc<std::sync::Mutex<Option<i64>>>,
            std::sync::Arc<std::sync::atomic::AtomicUsize>,
        );
        let shared: Shared = (Default::default(), Default::default());
        *shared.0.lock().unwrap() = jobs;
        let app = Router::new()
            .route("/whoami", get(|| async { Json(serde_json::json!({"pod": "api-pod"})) }))
            .route(
                "/sdapi/v1/progress",
                get(|State((jobs, probes)): State<Shared>| async move {
                    probes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let jobs = *jobs.lock().unwrap();
                    match jobs {
                        Some(n) => Ok(Json(serde_json::json!({
                            "progress": 0.0, "eta_relative": 0.0, "textinfo": null,
                            "state": {"skipped": false, "interrupted": false, "job": "", "job_count": n, "job_no": 0},
                        }))),
                        None => Err(axum::http::StatusCode::NOT_FOUND),
                    }
                }),
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        ApiPod {
            url,
            addr,
            jobs: shared.0,
            probes: shared.1,
            task,
        }
    }

    pub fn set_jobs(&self, jobs: Option<i64>) {
        *self.jobs.lock().unwrap() = jobs;
    }

    pub fn probes(&self) -> usize {
        self.probes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for ApiPod {
    fn drop(&mut self) {
        self.task.abort();
    }
}
