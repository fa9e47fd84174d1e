//! Prints the CRDs of mesh-control as one multi-document YAML stream. The committed copy is
//! `deploy/10-crds.yaml` (`cargo xtask crds` rewrites it); mesh-control's `deploy` test fails when it differs.

fn main() -> anyhow::Result<()> {
    print!("{}", mesh_control::crd::yaml()?);
    Ok(())
}
