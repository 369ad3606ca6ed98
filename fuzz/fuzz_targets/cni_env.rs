//! The CNI_* environment a runtime gives sinew-cni. The input is
//! `NAME=VALUE` lines; a name may repeat (the last one wins).
#![no_main]

use std::collections::HashMap;

use sinew_cni::env;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    if let Ok(e) = env::CniEnv::from_lookup(|k| vars.get(k).map(|v| (*v).to_owned())) {
        let _ = e.require_attachment();
        let _ = e.require_netns();
    }
    let _ = env::parse_cni_args(&text);
    let _ = env::validate_ifname("CNI_IFNAME", &text);
});
