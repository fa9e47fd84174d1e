//! `meshctl status` and `meshctl version`: mesh-control's `/status` (config version, leader,
//! verdicts, file errors, nodes' acks), and each node daemon's readiness and certificates.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    dump::Certificate,
    output::{Table, or_dash, section},
    time,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mesh-control's /status is not the expected JSON: {0}")]
    Parse(#[from] serde_json::Error),
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlStatus {
    /// The config version (grows with each published change).
    pub version: u64,
    /// mesh-control's own version (absent from controllers older than meshctl).
    #[serde(default)]
    pub build_version: Option<String>,
    #[serde(default)]
    pub leader: bool,
    #[serde(default)]
    pub election: String,
    #[serde(default)]
    pub workloads: u64,
    #[serde(default)]
    pub services: u64,
    #[serde(default)]
    pub route_tables: u64,
    #[serde(default)]
    pub policies: Vec<Verdict>,
    #[serde(default)]
    pub routes: Vec<Verdict>,
    #[serde(default)]
    pub file_errors: Vec<FileError>,
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeAck>,
    /// Replicas that did not answer (meshctl's, not the controller's): the nodes they serve
    /// show no ack.
    #[serde(default, skip_deserializing)]
    pub unreached_replicas: Vec<String>,
}

/// A policy's or routing object's verdict. Routes carry conditions instead of reason/message.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub accepted: bool,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parents: Option<Value>,
}

impl Verdict {
    /// The reason and message of a refusal: the policy's own, or the first false condition's.
    pub fn why(&self) -> (String, String) {
        if let Some(reason) = &self.reason {
            return (reason.clone(), self.message.clone().unwrap_or_default());
        }
        let conditions = self.conditions.iter().chain(
            self.parents
                .iter()
                .flat_map(|ps| ps.as_array().into_iter().flatten())
                .map(|p| &p["conditions"]),
        );
        let failed = conditions
            .filter_map(Value::as_array)
            .flatten()
            .find(|c| c["status"] == "False");
        failed.map_or_else(Default::default, |c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (s("reason"), s("message"))
        })
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct FileError {
    pub file: String,
    #[serde(default)]
    pub document: Option<u64>,
    pub message: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeAck {
    #[serde(default)]
    pub connected: bool,
    #[serde(default)]
    pub sent_version: u64,
    #[serde(default)]
    pub acked_version: u64,
    #[serde(default)]
    pub last_nack: Option<Nack>,
    /// The config version of the replica serving this node, when that is not the replica
    /// whose status is shown (each replica numbers its own versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_version: Option<u64>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Nack {
    pub version: u64,
    pub error: String,
}

pub fn parse(body: &str) -> Result<ControlStatus, Error> {
    Ok(serde_json::from_str(body)?)
}

/// One status from several controller replicas: `shown` (the leader's), with the nodes that
/// another replica serves taken from that replica. A node streams its config from one replica
/// (whichever the Service picked), and only that one knows what it acked.
pub fn merge(mut shown: ControlStatus, others: Vec<ControlStatus>) -> ControlStatus {
    for other in others {
        for (name, ack) in other.nodes {
            let served_here = shown.nodes.get(&name).is_some_and(|a| a.connected);
            if ack.connected && !served_here {
                shown.nodes.insert(
                    name,
                    NodeAck {
                        replica_version: Some(other.version),
                        ..ack
                    },
                );
            }
        }
    }
    shown
}

/// What `meshctl status` shows of one node.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub name: String,
    /// The controller's view (absent: the controller does not know this node).
    pub ack: Option<NodeAck>,
    /// Acked the controller's current config version.
    pub current: bool,
    pub ready: bool,
    /// The daemon's readiness answer (what is pending when not ready), or why it was not reached.
    pub ready_detail: String,
    pub certificates: Vec<Certificate>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub control: ControlStatus,
    pub nodes: Vec<NodeReport>,
}

impl NodeReport {
    pub fn new(name: &str, control: &ControlStatus) -> Self {
        let ack = control.nodes.get(name).cloned();
        let current = ack
            .as_ref()
            .is_some_and(|a| a.acked_version == a.replica_version.unwrap_or(control.version));
        Self {
            name: name.to_owned(),
            ack,
            current,
            ready: false,
            ready_detail: String::new(),
            certificates: Vec::new(),
        }
    }
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

pub fn render(r: &Report, now_unix: u64) -> String {
    let c = &r.control;
    let mut out = format!(
        "CONTROLLER\nconfig version {}, {} ({}), {} workloads, {} services, {} route tables\n\n",
        c.version,
        if c.leader { "leader" } else { "NOT the leader" },
        c.election,
        c.workloads,
        c.services,
        c.route_tables,
    );
    for replica in &c.unreached_replicas {
        let _ = writeln!(out, "a mesh-control replica did not answer: {replica}\n");
    }
    let mut refused = Table::new(&["KIND", "NAME", "REASON", "MESSAGE"]);
    for v in c.policies.iter().chain(&c.routes).filter(|v| !v.accepted) {
        let (reason, message) = v.why();
        refused.row(vec![
            v.kind.clone(),
            format!("{}/{}", v.namespace, v.name),
            reason,
            message,
        ]);
    }
    out += &section("NOT ACCEPTED (policies and routes)", &refused);
    let mut files = Table::new(&["FILE", "DOCUMENT", "MESSAGE"]);
    for e in &c.file_errors {
        files.row(vec![e.file.clone(), or_dash(e.document), e.message.clone()]);
    }
    out.push('\n');
    out += &section("FILE ERRORS", &files);
    let mut nodes = Table::new(&[
        "NODE",
        "CONNECTED",
        "SENT",
        "ACKED",
        "CURRENT",
        "LAST NACK",
        "READY",
        "CERTS",
        "FIRST EXPIRY",
    ]);
    let mut certs = Table::new(&["NODE", "IDENTITY", "SERIAL", "EXPIRES", "REFRESH AT"]);
    for n in &r.nodes {
        let first = n.certificates.iter().map(|c| c.not_after_unix).min();
        let nack = n.ack.as_ref().and_then(|a| a.last_nack.as_ref());
        nodes.row(vec![
            n.name.clone(),
            n.ack
                .as_ref()
                .map_or("unknown to controller".into(), |a| yes(a.connected)),
            or_dash(n.ack.as_ref().map(|a| a.sent_version)),
            or_dash(n.ack.as_ref().map(|a| a.acked_version)),
            yes(n.current),
            nack.map_or("-".into(), |n| format!("v{}: {}", n.version, n.error)),
            if n.ready {
                "ready".into()
            } else {
                format!("NOT READY: {}", n.ready_detail.trim())
            },
            n.certificates.len().to_string(),
            first.map_or("-".into(), |t| time::until(t, now_unix)),
        ]);
        for cert in &n.certificates {
            certs.row(vec![
                n.name.clone(),
                cert.identity.clone(),
                format!("{:x}", cert.serial),
                format!(
                    "{} ({})",
                    time::utc(cert.not_after_unix),
                    time::until(cert.not_after_unix, now_unix)
                ),
                time::utc(cert.refresh_at_unix),
            ]);
        }
    }
    for (title, table) in [("NODES", &nodes), ("CERTIFICATES", &certs)] {
        out.push('\n');
        out += &section(title, table);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = include_str!("../testdata/status.json");

    #[test]
    fn nodes_served_by_another_replica_come_from_it_and_are_current_by_its_version() {
        let status = |version: u64, nodes: &str| {
            parse(&format!(r#"{{"version":{version},"nodes":{{{nodes}}}}}"#)).expect("status")
        };
        let leader = status(13, r#""n3":{"connected":true,"ackedVersion":13}"#);
        let other = status(
            9,
            r#""n1":{"connected":true,"ackedVersion":9},"n2":{"connected":true,"ackedVersion":8},"n3":{"connected":true,"ackedVersion":9}"#,
        );
        let merged = merge(leader, vec![other]);
        let report = |n: &str| NodeReport::new(n, &merged);
        assert!(
            report("n1").current,
            "current by the version of the replica serving it"
        );
        assert!(!report("n2").current, "behind its replica");
        assert_eq!(
            merged.nodes["n3"].replica_version, None,
            "served by the shown replica: its own entry"
        );
        assert!(report("n3").current);
        assert_eq!(merged.version, 13);
    }

    #[test]
    fn a_real_status_parses() {
        let s = parse(STATUS).expect("parse");
        assert_eq!(
            (s.version, s.leader, s.workloads, s.services),
            (5, true, 5, 4)
        );
        assert_eq!(s.nodes["n2"].acked_version, 5);
        assert!(s.policies.iter().all(|p| p.accepted));
        assert_eq!(s.routes.len(), 3);
        assert_eq!(s.build_version, None);
    }

    #[test]
    fn refusals_nacks_and_readiness_are_shown() {
        let mut s = parse(STATUS).expect("parse");
        s.policies.push(Verdict {
            kind: "AuthorizationPolicy".into(),
            namespace: "demo".into(),
            name: "ip-blocks".into(),
            accepted: false,
            reason: Some("UnsupportedValue".into()),
            message: Some("remoteIpBlocks is not supported; fails closed".into()),
            conditions: None,
            parents: None,
        });
        s.routes[0].accepted = false;
        s.routes[0].parents = Some(serde_json::json!([{"conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": ""},
            {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound", "message": "no Service demo/nope"}]}]));
        s.version = 6;
        s.nodes.get_mut("n2").expect("n2").last_nack = Some(Nack {
            version: 6,
            error: "bad route".into(),
        });
        s.file_errors.push(FileError {
            file: "policies/x.yaml".into(),
            document: Some(1),
            message: "bad YAML".into(),
        });
        s.unreached_replicas.push(
            "mesh-control's /status answered 500: dial tcp 198.18.1.20:15014: i/o timeout".into(),
        );
        let mut n1 = NodeReport::new("n1", &s);
        n1.ready = true;
        n1.certificates.push(Certificate {
            identity: "spiffe://cluster.local/ns/demo/sa/client".into(),
            serial: 255,
            not_after_unix: 7_200,
            refresh_at_unix: 3_600,
        });
        let mut n2 = NodeReport::new("n2", &s);
        n2.ready_detail = "not ready: control synced\n".into();
        assert!(!n1.current && !n2.current);
        let text = render(
            &Report {
                control: s,
                nodes: vec![n1, n2],
            },
            0,
        );
        for expected in [
            "config version 6, leader",
            "AuthorizationPolicy  demo/ip-blocks     UnsupportedValue  remoteIpBlocks is not supported; fails closed",
            "HTTPRoute            demo/whoami-split  BackendNotFound   no Service demo/nope",
            "policies/x.yaml  1         bad YAML",
            "v6: bad route",
            "a mesh-control replica did not answer: mesh-control's /status answered 500",
            "NOT READY: not ready: control synced",
            "spiffe://cluster.local/ns/demo/sa/client  ff      1970-01-01T02:00:00Z (in 2h0m)",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }
}
