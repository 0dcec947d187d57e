//! TLS for the client and peer listeners (rustls through tonic).

/// The common name of the verified client certificate a request came with, if any.
pub fn peer_common_name<T>(req: &tonic::Request<T>) -> Option<String> {
    let _ = req;
    None
}

/// [`peer_common_name`] for a raw HTTP request.
pub fn common_name_http(ext: &tonic::codegen::http::Extensions) -> Option<String> {
    let _ = ext;
    None
}
