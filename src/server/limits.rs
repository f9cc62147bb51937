//! Requests refused before any handler sees them.
//!
//! hyper already answers 400 for conflicting `Content-Length`s, a signed or
//! non-numeric one, bad chunk sizes and spaces before a colon, and 431 for a
//! head over `max_header_bytes`; `connection` makes it refuse bare LFs and
//! heads framed by both `Content-Length` and `Transfer-Encoding` (hyper drops
//! one of the two before any handler could see them). What is left is a URI
//! longer than `max_uri_bytes`: 414.

use http::Uri;

use crate::error::RouterError;

pub fn check_uri(uri: &Uri, max_uri_bytes: usize) -> Result<(), RouterError> {
    let uri_len = uri.path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > max_uri_bytes {
        return Err(RouterError::UriTooLong(uri_len));
    }
    Ok(())
}
