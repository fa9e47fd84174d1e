//! The test cluster's credentials, made with the openssl CLI: a CA, the API server's serving
//! certificate (its underlay address and the `kubernetes` Service's ClusterIP), the
//! ServiceAccount signing key, and static bearer tokens (admin, one per kubelet, kube-proxy).

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use crate::sys::{self, Error};

/// Token of the cluster admin (`system:masters`): kubectl, controller-manager, scheduler.
pub const ADMIN_TOKEN: &str = "mesh-test-admin";
/// Token of kube-proxy (user `system:kube-proxy`, bound to `system:node-proxier` by default).
pub const PROXY_TOKEN: &str = "mesh-test-kube-proxy";

/// Token of node `name`'s kubelet (user `system:node:<name>`, group `system:nodes`: the Node
/// authorizer and NodeRestriction apply to it as in a real cluster).
pub fn kubelet_token(name: &str) -> String {
    format!("mesh-test-kubelet-{name}")
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), Error> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|source| Error::Spawn { program: "openssl".into(), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command { command: format!("openssl {}", args.join(" ")), status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).into() })
    }
}

/// Writes `ca.crt`, `server.{crt,key}`, `sa.{key,pub}` and `tokens.csv` into `dir`.
pub fn write(dir: &Path, api_ip: Ipv4Addr, service_ip: Ipv4Addr, nodes: &[String]) -> Result<(), Error> {
    sys::mkdir(dir)?;
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(dir, &[&["req", "-x509"], &ec[..], &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=mesh-test-cluster-ca"]].concat())?;
    openssl(dir, &[&["req"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=kube-apiserver"]].concat())?;
    sys::write(
        &dir.join("ext"),
        &format!("subjectAltName=IP:{api_ip},IP:{service_ip},IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n"),
    )?;
    openssl(dir, &["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext"])?;
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"])?;
    openssl(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    let mut tokens = format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n{PROXY_TOKEN},system:kube-proxy,kube-proxy\n");
    for n in nodes {
        let _ = writeln!(tokens, "{},system:node:{n},kubelet-{n},\"system:nodes\"", kubelet_token(n));
    }
    sys::write(&dir.join("tokens.csv"), &tokens)
}

/// A kubeconfig for `server` that authenticates with `token`.
pub fn kubeconfig(server: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"{server}\", certificate-authority: \"{}\"}}}}]\nusers: [{{name: u, user: {{token: \"{token}\"}}}}]\ncontexts: [{{name: t, context: {{cluster: t, user: u}}}}]\ncurrent-context: t\n",
        ca.display()
    )
}
