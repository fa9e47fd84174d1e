//! The mesh as users receive it, on a real two-node Kubernetes (`mesh_tests::k8s`).
//! Root only; `cargo xtask test` builds the binaries and Kubernetes first.

use std::path::PathBuf;

use mesh_tests::{image, k8s::KubeCluster, require_root};

fn bin_dir() -> PathBuf {
    // target/<profile>/ is the parent of this test's deps/ directory.
    let exe = std::env::current_exe().expect("test executable");
    exe.parent().and_then(std::path::Path::parent).expect("target dir").to_path_buf()
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn images() -> Vec<PathBuf> {
    let out = bin_dir().join("images");
    image::project_images(&bin_dir(), VERSION).iter().map(|s| image::build(s, &out).expect("image")).collect()
}

#[test]
fn smoke_cluster() {
    require_root();
    let imgs = images();
    let run = format!("k{:x}", std::process::id());
    let c = KubeCluster::start(&run, 2, &imgs, &image::full_name(&format!("mesh-pause:{VERSION}"))).expect("cluster");
    eprintln!("ready in {:?}", c.time_to_ready);
    c.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: w1, namespace: default}\nspec: {nodeName: n1, automountServiceAccountToken: false, containers: [{name: w, image: mesh-whoami:0.1.0, imagePullPolicy: Never, args: [serve, --name, w1, --tcp, '8080']}]}\n").expect("pod");
    let out = c.kubectl_ok(&["wait", "--for=condition=Ready", "pod/w1", "--timeout=60s"]);
    eprintln!("{out:?}");
    eprintln!("{}", c.kubectl_ok(&["get", "pods", "-A", "-o", "wide"]).unwrap_or_default());
}
