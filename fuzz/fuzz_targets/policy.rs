//! Policy documents (NetworkPolicy, SinewNetworkPolicy, ...) as users apply
//! them: multi-document YAML.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (policies, errors) = sinew_policy::model::parse_all("fuzz.yaml", text);
    if errors.is_empty() {
        assert_eq!(
            sinew_policy::model::parse("fuzz.yaml", text).map(|p| p.len()).ok(),
            Some(policies.len()),
            "parse and parse_all disagree"
        );
    }
    let _ = sinew_policy::resolve::cidr_prefixes(&policies);
});
