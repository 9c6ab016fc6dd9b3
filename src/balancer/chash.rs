//! Consistent hashing. (Skeleton: the balancer is being written; `request_key` is what the
//! proxy calls.)
use std::net::IpAddr;

use http::{HeaderMap, Uri};

use crate::config::HashOn;

/// The hash of the request's balancing key, or `None` when the request lacks it.
pub fn request_key(_on: &HashOn, _headers: &HeaderMap, _uri: &Uri, _ip: IpAddr) -> Option<u64> {
    None
}
