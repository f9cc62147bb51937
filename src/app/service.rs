//! What hyper calls for each request on a connection: the router's request
//! path as one function, in this order:
//!
//! 1. the connection's [`Phase`] follows the request and response bodies
//!    (time limits, see [`connection`](crate::net::connection));
//! 2. the access log and request metrics observe the request and its final
//!    response ([`access`]);
//! 3. over-long URIs are refused (`check_uri`; a request line too long
//!    to buffer was answered 414 on the socket already, in `net`);
//! 4. the router's own endpoints go to their axum routes; everything else
//!    is proxied to the user's backend ([`routes::proxy`]);
//! 5. a failure becomes its page in one place ([`error::render`]).
//!
//! Written out rather than stacked as tower layers: this runs for every
//! proxied request, and each layer would box its future, its body and
//! clone its state again.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::ServiceExt;

use super::error::{self, ErrorPages, RouterError};
use super::{routes, AppState};
use crate::body::Watched;
use crate::net::connection::{ConnState, Phase, RequestPhase, ResponsePhase};
use crate::proxy::{BoxError, UpstreamBody};
use crate::telemetry::access::{self, Counted, Kind, Logged, Peer};

/// The body of every response the router sends.
pub type ResponseBody = Watched<Logged<Answer>, ResponsePhase>;
/// A request body as the handlers receive it.
type RequestBody = Counted<Watched<Incoming, RequestPhase>>;

/// One connection's request handler. Cloned into every request's future:
/// it is the connection's own `Arc`, so the clone touches nothing another
/// core's requests touch.
#[derive(Clone)]
pub struct Handler(Arc<Connection>);

struct Connection {
    state: Arc<AppState>,
    /// The router's own endpoints (`/_router/*`, `/healthz`, `/readyz`).
    endpoints: Router,
    peer: Arc<Peer>,
    conn: Arc<ConnState>,
}

impl Handler {
    pub fn new(state: Arc<AppState>, endpoints: Router, peer: Arc<Peer>, conn: Arc<ConnState>) -> Self {
        Handler(Arc::new(Connection {
            state,
            endpoints,
            peer,
            conn,
        }))
    }
}

impl hyper::service::Service<Request<Incoming>> for Handler {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let connection = self.0.clone();
        let reading_body = !request.body().is_end_stream();
        connection
            .conn
            .enter(if reading_body { Phase::Body } else { Phase::Busy });
        let request = request.map(|body| Watched::new(body, RequestPhase(connection.conn.clone())));
        let (observed, request) = access::observe(request, &connection.peer);
        Box::pin(async move {
            let (response, user) = access::noting_user(connection.dispatch(observed.kind(), request)).await;
            let response = observed.finish(response, user);
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                connection.conn.enter(Phase::Upgraded);
            }
            Ok(response.map(|body| Watched::new(body, ResponsePhase(connection.conn.clone()))))
        })
    }
}

impl Connection {
    async fn dispatch(&self, kind: Kind, request: Request<RequestBody>) -> Response<Answer> {
        let state = &*self.state;
        let wants_html = crate::util::wants_html(request.headers());
        let uri = request.uri().clone();
        let result = match check_uri(&uri, state.config.server.max_uri_bytes) {
            Err(refused) => Err(refused),
            Ok(()) if kind == Kind::Proxied => routes::proxy(state, request, &self.peer.ip)
                .await
                .map(|response| response.map(Answer::Upstream)),
            Ok(()) => {
                let request = request.map(axum::body::Body::new);
                // Boxed: axum's future is large, and every proxied request's
                // future would be as large if it were inline here.
                let Ok(response) = Box::pin(self.endpoints.clone().oneshot(request)).await;
                Ok(response.map(Answer::Local))
            }
        };
        result.unwrap_or_else(|failure| {
            let settings = ErrorPages {
                retry_after: state.config.session.retry_after,
            };
            error::render(&failure, wants_html, &uri, &settings).map(Answer::Local)
        })
    }
}

/// Refuses a URI longer than `max_uri_bytes`: 414.
fn check_uri(uri: &Uri, max_uri_bytes: usize) -> Result<(), RouterError> {
    let uri_len = uri.path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > max_uri_bytes {
        return Err(RouterError::UriTooLong(uri_len));
    }
    Ok(())
}

/// A response body: streamed from the user's backend, or made here.
pub enum Answer {
    Upstream(UpstreamBody),
    Local(axum::body::Body),
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Answer::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Answer::Local(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Answer::Upstream(body) => body.is_end_stream(),
            Answer::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Answer::Upstream(body) => body.size_hint(),
            Answer::Local(body) => body.size_hint(),
        }
    }
}
