//! The observer's ring-buffer records: whatever bytes the BPF side (or a
//! newer or broken producer) writes must decode or be refused, never panic.
#![no_main]

use sinew_abi::FlowEvent;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some(ev) = FlowEvent::from_bytes(data) else {
        assert!(data.len() < std::mem::size_of::<FlowEvent>());
        return;
    };
    let _ = sinew_abi::DropReason::from_code(ev.reason);
    let _ = format!("{ev:?}");
});
