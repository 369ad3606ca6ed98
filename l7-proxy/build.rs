fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Only the integration tests use this service (a real tonic client and
    // server on either side of the proxy); building it here keeps the test
    // free of a second build script.
    println!("cargo:rerun-if-changed=tests/proto");
    tonic_prost_build::configure().compile_protos(&["tests/proto/echo.proto"], &["tests/proto"])?;
    Ok(())
}
