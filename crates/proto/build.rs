fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/sinew/agent/v1/agent.proto",
            "proto/sinew/observer/v1/observer.proto",
            "proto/sinew/proxy/v1/proxy.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
