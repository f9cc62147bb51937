//! Requests refused before any handler sees them.
//!
//! hyper already answers 400 for conflicting `Content-Length`s, a signed or
//! non-numeric one, bad chunk sizes and spaces before a colon, and 431 for a
//! head over `max_header_bytes`; `connection` makes it refuse bare LFs and
//! heads framed by both `Content-Length` and `Transfer-Encoding`. What is left
//! is a URI longer than `max_uri_bytes` (414); the framing check here is a
//! second line in case a head with both ever reaches a handler.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};

use crate::error::RouterError;

pub async fn refuse_malformed(State(max_uri_bytes): State<usize>, request: Request, next: Next) -> Response {
    let uri_len = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > max_uri_bytes {
        return RouterError::UriTooLong(uri_len).into_response();
    }
    let headers = request.headers();
    if headers.contains_key(CONTENT_LENGTH) && headers.contains_key(TRANSFER_ENCODING) {
        return RouterError::Malformed("both Content-Length and Transfer-Encoding").into_response();
    }
    next.run(request).await
}
