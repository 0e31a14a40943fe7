//! Generates the gRPC code with `protox`, a pure-Rust protobuf compiler, so building needs no
//! system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not baked in when it is compiled: a build script compiled in
    // one checkout (a copied or shared target directory) must read this checkout's protos.
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is unset")?;
    let root = std::path::Path::new(&manifest_dir).join("../../proto");
    let files = ["mesh/admin/v1/admin.proto", "mesh/reapi/v1/claims.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let descriptors = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        // Tools print any message as JSON (`meshctl --json`).
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}
