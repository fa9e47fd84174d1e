//! The verbs: fetch from the mesh (through `target`), decode, render. Errors are `anyhow` here
//! (the binary), with context naming what was being fetched.

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use meshctl::{
    bpf, config, dump,
    explain::{self, HttpRequest},
    metrics,
    output::{self, Format, Progress, Table, or_dash, section},
    status,
    target::{Choice, Port, Target},
    time,
};
use serde::Serialize;

pub struct Ctx {
    pub choice: Choice,
    pub format: Format,
    pub progress: Progress,
}

impl Ctx {
    fn connect(&self) -> Result<Target> {
        let target = Target::connect(&self.choice)?;
        self.progress.say(&format!("using {}", target.describe()));
        Ok(target)
    }

    fn print<T: Serialize>(&self, value: &T, table: impl FnOnce(&T) -> String) -> Result<()> {
        print!("{}", output::render(self.format, value, table)?);
        Ok(())
    }
}

/// `GET path` that must answer 2xx; the body.
fn ok_body(answer: meshctl::http::Response, what: &str) -> Result<String> {
    if !answer.is_success() {
        bail!("{what} answered {}: {}", answer.status, answer.body.trim());
    }
    Ok(answer.body)
}

/// mesh-control's status: the leader's, with each node's ack from the replica serving it.
fn control_status(target: &Target) -> Result<status::ControlStatus> {
    let mut all = Vec::new();
    let mut unreached = Vec::new();
    for answer in target
        .control_get_all("/status")
        .context("mesh-control's /status")?
    {
        // A replica going away (a rolling update) may not answer: the others still do.
        match ok_body(answer, "mesh-control's /status") {
            Ok(body) => all.push(status::parse(&body)?),
            Err(e) => unreached.push(format!("{e:#}")),
        }
    }
    // The leader's first (`control_get_all`'s order).
    let mut all = all.into_iter();
    let Some(shown) = all.next() else {
        bail!("no mesh-control replica answered: {}", unreached.join("; "));
    };
    let mut merged = status::merge(shown, all.collect());
    merged.unreached_replicas = unreached;
    Ok(merged)
}

fn config_dump(target: &Target, node: &str) -> Result<dump::ConfigDump> {
    let what = format!("node {node}'s /config_dump");
    let body = ok_body(
        target
            .node_get(node, Port::Admin, "/config_dump")
            .with_context(|| what.clone())?,
        &what,
    )?;
    Ok(dump::parse(node, &body)?)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Versions {
    meshctl: String,
    control: Option<String>,
    nodes: Vec<(String, Option<String>)>,
    /// Why a component could not be asked (the rest is still shown).
    errors: Vec<String>,
}

pub fn version(ctx: &Ctx) -> Result<()> {
    let mut v = Versions {
        meshctl: env!("CARGO_PKG_VERSION").into(),
        control: None,
        nodes: Vec::new(),
        errors: Vec::new(),
    };
    match ctx.connect() {
        Err(e) => v.errors.push(format!("{e:#}")),
        Ok(target) => {
            match control_status(&target) {
                Ok(s) => {
                    let version = s.build_version.unwrap_or_else(|| "unknown".into());
                    v.control = Some(version);
                }
                Err(e) => v.errors.push(format!("{e:#}")),
            }
            for node in target.nodes()? {
                match config_dump(&target, &node) {
                    Ok(d) => v.nodes.push((
                        node,
                        Some(d.build_version.unwrap_or_else(|| "unknown".into())),
                    )),
                    Err(e) => {
                        v.errors.push(format!("{e:#}"));
                        v.nodes.push((node, None));
                    }
                }
            }
        }
    }
    ctx.print(&v, |v| {
        let mut t = Table::new(&["COMPONENT", "VERSION"]);
        t.row(vec!["meshctl".into(), v.meshctl.clone()]);
        t.row(vec!["mesh-control".into(), or_dash(v.control.as_ref())]);
        for (node, version) in &v.nodes {
            t.row(vec![format!("mesh-node {node}"), or_dash(version.as_ref())]);
        }
        let mut out = t.render();
        for e in &v.errors {
            let _ = writeln!(out, "error: {e}");
        }
        out
    })
}

pub fn status(ctx: &Ctx) -> Result<()> {
    let target = ctx.connect()?;
    let control = control_status(&target)?;
    let mut names: Vec<String> = control.nodes.keys().cloned().collect();
    for n in target.nodes()? {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names.sort();
    let mut nodes = Vec::new();
    for name in names {
        ctx.progress.say(&format!("asking node {name}'s daemon"));
        let mut report = status::NodeReport::new(&name, &control);
        match target.node_get(&name, Port::Admin, "/ready") {
            Ok(answer) => {
                report.ready = answer.is_success();
                report.ready_detail = answer.body;
            }
            Err(e) => report.ready_detail = format!("not reached: {e}"),
        }
        match config_dump(&target, &name) {
            Ok(d) => report.certificates = d.certificates,
            Err(e) => {
                let _ = write!(report.ready_detail, " (config dump: {e:#})");
            }
        }
        nodes.push(report);
    }
    let now = time::now_unix();
    ctx.print(&status::Report { control, nodes }, |r| {
        status::render(r, now)
    })
}

pub fn config(ctx: &Ctx, node: &str, which: config::Section) -> Result<()> {
    let target = ctx.connect()?;
    target.check_node(node)?;
    let dump = config_dump(&target, node)?;
    match ctx.format {
        Format::Table => ctx.print(&(), |()| config::render(&dump.config, which)),
        _ => ctx.print(&config::select(&dump.config, which), |_| String::new()),
    }
}

pub fn bpf_maps(ctx: &Ctx, node: &str, explicit: Option<&Path>) -> Result<()> {
    // On a cluster node there is no lab or kubeconfig to consult: read the given directory.
    let dir = if let Some(dir) = explicit {
        dir.to_path_buf()
    } else {
        let target = ctx.connect()?;
        target.check_node(node)?;
        target.bpffs(node, None)?
    };
    ctx.progress
        .say(&format!("reading the maps pinned in {}", dir.display()));
    let maps = bpf::read(&dir)?;
    ctx.print(&maps, render_maps)
}

fn render_maps(m: &bpf::Maps) -> String {
    let mut services = Table::new(&[
        "SERVICE",
        "PROTO",
        "ID",
        "SLOTS",
        "FLAGS",
        "BACKENDS (slots = weight)",
    ]);
    for s in &m.services {
        let backends = s
            .backends
            .iter()
            .map(|b| format!("{} ×{}", b.address, b.slots))
            .collect::<Vec<_>>()
            .join(", ");
        let mut flags = s.flags.join(",");
        if s.affinity_timeout_s > 0 {
            let _ = write!(flags, " {}s", s.affinity_timeout_s);
        }
        services.row(vec![
            s.service.clone(),
            s.protocol.clone(),
            s.id.to_string(),
            s.slots.to_string(),
            flags,
            format!("{}: {backends}", s.backends.len()),
        ]);
    }
    let mut backends = Table::new(&["BACKEND ID", "ADDRESS"]);
    for b in &m.backends {
        backends.row(vec![b.id.to_string(), b.address.clone()]);
    }
    let mut pods = Table::new(&["POD (cgroup id)", "ADDRESS", "IDENTITY ID", "FLAGS"]);
    for p in &m.pods {
        pods.row(vec![
            p.cgroup_id.to_string(),
            p.address.to_string(),
            p.identity.to_string(),
            p.flags.join(","),
        ]);
    }
    let mut endpoints = Table::new(&["ENDPOINT", "IDENTITY ID", "FLAGS"]);
    for e in &m.endpoints {
        endpoints.row(vec![
            e.address.to_string(),
            e.identity.to_string(),
            e.flags.join(","),
        ]);
    }
    let mut policy = Table::new(&["SRC IDENTITY", "DST IDENTITY", "PORT", "PROTO", "VERDICT"]);
    for p in &m.policy {
        policy.row(vec![
            p.src_identity.to_string(),
            p.dst_identity.to_string(),
            p.port.to_string(),
            p.protocol.clone(),
            p.verdict.into(),
        ]);
    }
    let mut trusted = Table::new(&["TRUSTED SENDER (cgroup id)", "PID", "PROCESS"]);
    for t in &m.trusted {
        trusted.row(vec![
            t.cgroup_id.to_string(),
            t.pid.to_string(),
            t.process.clone(),
        ]);
    }
    let counters = |cs: &[bpf::Counter], title: &str| {
        let mut t = Table::new(&[title, "CODE", "COUNT"]);
        for c in cs {
            t.row(vec![c.name.into(), c.code.to_string(), c.count.to_string()]);
        }
        t
    };
    [
        section(&format!("SERVICES ({})", m.services.len()), &services),
        section("BACKENDS", &backends),
        section("PODS (captured by this node's datapath)", &pods),
        section("ENDPOINTS", &endpoints),
        section("POLICY (the kernel's L4 deny fast path)", &policy),
        section(
            "TRUSTED (node processes STRICT pods admit: the kubelets' probes)",
            &trusted,
        ),
        section("DROPS (by reason, all CPUs)", &counters(&m.drops, "REASON")),
        section("EVENTS", &counters(&m.events, "EVENT")),
        format!("RAW\n{}\n", m.commands.join("\n")),
    ]
    .join("\n")
}

fn scrape(ctx: &Ctx, target: &Target, nodes: &[String]) -> Result<Vec<metrics::Sample>> {
    let mut all = Vec::new();
    for node in nodes {
        ctx.progress.say(&format!("scraping node {node}'s metrics"));
        let what = format!("node {node}'s /metrics");
        let body = ok_body(
            target
                .node_get(node, Port::Metrics, "/metrics")
                .with_context(|| what.clone())?,
            &what,
        )?;
        let mut samples = metrics::parse(&body);
        metrics::tag_node(&mut samples, node);
        all.extend(samples);
    }
    Ok(all)
}

pub fn top(ctx: &Ctx, interval: Duration, once: bool) -> Result<()> {
    let target = ctx.connect()?;
    let nodes = target.nodes()?;
    let mut before = scrape(ctx, &target, &nodes)?;
    let mut taken = Instant::now();
    loop {
        ctx.progress
            .say(&format!("waiting {interval:?} for the second scrape"));
        std::thread::sleep(interval);
        let after = scrape(ctx, &target, &nodes)?;
        let seconds = taken.elapsed().as_secs_f64();
        taken = Instant::now();
        let rows = metrics::top(&before, &after, seconds);
        ctx.print(&rows, |rows| render_top(rows, seconds))?;
        if once {
            return Ok(());
        }
        println!();
        before = after;
    }
}

fn render_top(rows: &[metrics::TopRow], seconds: f64) -> String {
    let mut t = Table::new(&[
        "DESTINATION WORKLOAD",
        "RPS",
        "ERRORS (5xx)",
        "P50",
        "P99",
        "TCP OPENED/S",
    ]);
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}ms"));
    for r in rows {
        t.row(vec![
            r.workload.clone(),
            format!("{:.1}", r.rps),
            format!("{:.1}%", r.error_percent),
            ms(r.p50_ms),
            ms(r.p99_ms),
            format!("{:.1}", r.tcp_opened_per_second),
        ]);
    }
    format!(
        "over {seconds:.1}s, reporter=destination\n{}",
        if t.is_empty() {
            "(no traffic)\n".into()
        } else {
            t.render()
        }
    )
}

/// What `meshctl graph` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    /// A table of edges (or `-o json|yaml` of the graph).
    Table,
    /// The SVG picture the controller's page shows.
    Svg,
    /// Graphviz DOT (`dot -Tpng`).
    Dot,
    /// The controller's `/graph.json`, as served.
    Json,
    /// The self-refreshing page (useful only where it can reach the controller).
    Html,
}

/// The controller's service graph (`/graph*` on its status port), so `meshctl graph` shows the
/// same picture as the page; written to `file` when given.
pub fn graph(ctx: &Ctx, format: GraphFormat, file: Option<&Path>) -> Result<()> {
    let target = ctx.connect()?;
    let path = match format {
        GraphFormat::Table | GraphFormat::Json => "/graph.json",
        GraphFormat::Svg => "/graph.svg",
        GraphFormat::Dot => "/graph.dot",
        GraphFormat::Html => "/graph",
    };
    let what = format!("mesh-control's {path}");
    let body = ok_body(
        target.control_get(path).with_context(|| what.clone())?,
        &what,
    )?;
    let text = if format == GraphFormat::Table {
        let graph: mesh_graph::Graph =
            serde_json::from_str(&body).with_context(|| format!("decoding {what}"))?;
        output::render(ctx.format, &graph, render_graph)?
    } else {
        body
    };
    match file {
        Some(file) => {
            std::fs::write(file, &text).with_context(|| format!("writing {}", file.display()))?;
            ctx.progress.say(&format!("wrote {}", file.display()));
        }
        None => print!("{text}"),
    }
    Ok(())
}

fn render_graph(g: &mesh_graph::Graph) -> String {
    let mut t = Table::new(&["FROM", "TO", "PROTO", "RPS", "ERRORS", "P99", "TCP", "MTLS"]);
    let name = |id: &str| id.split_once(':').map_or(id, |(_, n)| n).to_owned();
    for e in &g.edges {
        let tcp = if e.protocol == "tcp" {
            format!(
                "{:.1} conn/s, {:.0} B/s",
                e.connections_per_second, e.bytes_per_second
            )
        } else {
            "-".into()
        };
        t.row(vec![
            name(&e.source),
            name(&e.target),
            e.protocol.clone(),
            format!("{:.1}", e.rps),
            format!("{:.1}%", e.error_percent),
            e.p99_ms.map_or("-".into(), |v| format!("{v:.1}ms")),
            tcp,
            if e.mtls { "yes" } else { "no" }.into(),
        ]);
    }
    format!(
        "over {:.1}s, from the metrics of {}\n{}",
        g.window_seconds,
        if g.reporters.is_empty() {
            "no node yet".into()
        } else {
            g.reporters.join(", ")
        },
        if t.is_empty() {
            "(no traffic)\n".into()
        } else {
            t.render()
        }
    )
}

pub fn explain(
    ctx: &Ctx,
    source: &str,
    destination: &str,
    http: Option<&[String]>,
    headers: &[String],
) -> Result<()> {
    let target = ctx.connect()?;
    let nodes = target.nodes()?;
    let first = nodes.first().context("the mesh has no node daemon")?;
    ctx.progress
        .say(&format!("resolving names from node {first}'s config"));
    let config = config_dump(&target, first)?.config;
    let src = explain::resolve_source(source, &config.workloads, target.lab_pod_ip(source))?;
    let dst = explain::resolve_destination(destination, &config.services, &config.workloads)?;
    ctx.progress.say(&format!(
        "{source} is {} ({}) on {}; {destination} is {} ({})",
        src.name, src.ip, src.node, dst.addr, dst.what
    ));
    if !headers.is_empty() && http.is_none() {
        bail!("-H needs --http METHOD PATH");
    }
    let request = match http {
        Some([method, path]) => Some(HttpRequest::new(method, path, &dst.host, headers)?),
        _ => None,
    };
    let ask = |node: &str, path: &str| -> Result<explain::Explanation> {
        ctx.progress.say(&format!("asking node {node}: {path}"));
        let what = format!("node {node}'s /debug/explain");
        let body = ok_body(
            target
                .node_get(node, Port::Admin, path)
                .with_context(|| what.clone())?,
            &what,
        )?;
        Ok(explain::parse(node, &body)?)
    };
    let source_stage = ask(
        &src.node,
        &explain::source_path(src.ip, dst.addr, request.as_ref()),
    )?;
    let destination_stage = match (&source_stage.next, source_stage.verdict.as_str()) {
        (Some(next), "allowed") => Some(ask(
            &next.node,
            &explain::destination_path(src.ip, next, request.as_ref()),
        )?),
        _ => None,
    };
    let report = explain::Report {
        source: source_stage,
        destination: destination_stage,
    };
    ctx.print(&report, explain::render)
}
