//! Prints the CRDs of mesh-control as one multi-document YAML stream: ours (security and
//! networking; committed as `deploy/10-crds.yaml`) or, with `--gateway-api`, the Gateway API kinds
//! we read (committed as `deploy/11-gateway-api-crds.yaml`). `cargo xtask crds` rewrites both;
//! mesh-control's `deploy` test fails when they differ.

fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        None => print!("{}", mesh_control::crd::yaml()?),
        Some("--gateway-api") => print!("{}", mesh_control::crd::gateway_api_yaml()?),
        Some(other) => anyhow::bail!("unknown argument {other:?} (expected nothing or --gateway-api)"),
    }
    Ok(())
}
