//! The network configuration a runtime writes to sinew-cni's stdin.
#![no_main]

use sinew_cni::config;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = config::sniff_version(data);
    if let Ok(conf) = config::parse(data) {
        // Whatever parses must also format (errors and logs print it).
        let _ = format!("{conf:?}");
    }
});
