//! HBONE CONNECT request validation: `<method> <uri>` as the HTTP/2 pseudo-headers carry them.
#![no_main]

use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use mesh_core::hbone::connect_target;

fuzz_target!(|data: &[u8]| {
    let (method, uri) = match data.iter().position(|b| *b == b' ') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let (Ok(method), Ok(uri)) = (Method::from_bytes(method), Uri::try_from(uri)) else {
        return;
    };
    if let Some(target) = connect_target(&method, &uri) {
        // Only a CONNECT to exactly `ip:port` is a target.
        assert_eq!(method, Method::CONNECT);
        assert_eq!(uri.authority().map(|a| a.as_str().parse().ok()), Some(Some(target)));
    }
});
