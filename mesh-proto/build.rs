//! Compiles `proto/**/*.proto` with protox (pure Rust, no protoc) into tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/mesh/config/v1/config.proto", "proto/mesh/ca/v1/ca.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
