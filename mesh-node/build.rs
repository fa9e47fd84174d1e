//! Embeds the kernel object that `cargo xtask build-ebpf` produced.
//!
//! The object is built by a separate toolchain (Debian's rustc-web + bpf-linker), so a plain
//! `cargo build`/`cargo test` must work without it: when it is missing we embed an empty stub
//! and `datapath::Datapath::load` fails at run time with a message naming the command to run.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let object = env::var_os("MESH_EBPF_OBJECT").map_or_else(
        || manifest.join("../target/ebpf/bpfel-unknown-none/release/mesh-ebpf"),
        PathBuf::from,
    );
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it")).join("mesh-ebpf.o");
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    // Watch the directory too, so the first build-ebpf after a stub build is picked up.
    if let Some(dir) = object.parent() {
        let _ = fs::create_dir_all(dir);
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!("cargo:rerun-if-changed={}", object.display());
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).expect("write embedded object"),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not built: embedding an empty stub (run `cargo xtask build-ebpf`)",
                object.display()
            );
            fs::write(&out, []).expect("write stub object");
        }
    }
}
