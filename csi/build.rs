//! Compiles the vendored `proto/csi.proto` (CSI spec v1.12.0) with `protox`
//! (pure Rust, with the Google well-known types built in), so no system
//! `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    let fds = protox::compile(["proto/csi.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
