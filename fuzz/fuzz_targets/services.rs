//! Services, EndpointSlices (and the other documents of the local
//! datastore) as YAML files, read into a snapshot, first alone and then as
//! an update of the snapshot they produced.
#![no_main]

use sinew_model::Snapshot;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let first = Snapshot::from_documents([("fuzz.yaml".to_owned(), text)]);
    let _ = Snapshot::from_documents_after([("fuzz.yaml".to_owned(), text)], Some(&first));
});
