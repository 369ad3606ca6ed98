//! sinew-l7's path entry point (see `sinew_l7::fuzz::path`): what the proxy
//! and the policy crate feed it comes from users and from the network.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sinew_l7::fuzz::path(data));
