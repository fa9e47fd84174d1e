//! `meshctl`: see `meshctl --help` and the README's "meshctl" section.

mod verb;

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use meshctl::{config::Section, output::Format, output::Progress, target::Choice};

#[derive(Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Inspect the mesh: status, config, kernel maps, live traffic, policy explanations"
)]
struct Cli {
    /// Use the lab (`cargo xtask lab up`; default when /run/mesh-lab exists). Needs root.
    #[arg(long, global = true, conflicts_with_all = ["kubeconfig", "context"])]
    lab: bool,
    /// The lab run to address (`mesh-<run>-...` names; an e2e test's own run is `t<pid hex>`);
    /// implies `--lab`. Default: `lab`, the run `cargo xtask lab up` starts.
    #[arg(long, global = true, value_name = "ID", conflicts_with_all = ["kubeconfig", "context"])]
    lab_run: Option<String>,
    /// Use a cluster through this kubeconfig (else KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, global = true, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (implies a cluster).
    #[arg(long, global = true)]
    context: Option<String>,
    /// The mesh's namespace on a cluster.
    #[arg(long, global = true, default_value = "mesh-system")]
    namespace: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// No progress messages on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// meshctl's version, the controller's and each node daemon's.
    Version,
    /// The controller (config version, leader, refusals, file errors), every node's acks,
    /// readiness and certificates.
    Status,
    /// A node daemon's config (from its /config_dump), with where each item came from.
    Config {
        /// The node (`n1`; on a cluster, the Kubernetes node name).
        node: String,
        #[arg(value_enum, default_value_t = Section::All)]
        section: Section,
    },
    /// The node's pinned kernel maps, decoded (needs root and the node's bpffs).
    Bpf {
        node: String,
        #[arg(value_enum)]
        what: BpfView,
        /// The pin directory (default: the lab's; needed on a cluster node:
        /// /sys/fs/bpf/mesh/<node>).
        #[arg(long, value_name = "DIR")]
        bpffs: Option<PathBuf>,
    },
    /// Requests per second, 5xx share, p50/p99 and TCP connections per destination workload,
    /// from two scrapes of every node's metrics.
    Top {
        /// Time between the two scrapes (and between tables): `2s`, `500ms`.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        interval: Duration,
        /// Print one table and exit.
        #[arg(long)]
        once: bool,
    },
    /// The service graph mesh-control draws from every node's metrics: workloads and Services,
    /// and the last window's traffic between them (rps, errors, p99, mTLS).
    Graph {
        /// `table` (edges; `-o json|yaml` works too), or the picture as `svg`, `dot`, `json`, `html`.
        #[arg(long, value_enum, default_value = "table")]
        format: verb::GraphFormat,
        /// Write to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Why a connection or request from a pod to a destination is allowed or denied, step by
    /// step, as the node daemons decide it.
    Explain {
        /// The source pod: `n1p1` (lab), `namespace/name`, a unique name, or its IP.
        source: String,
        /// A Service (`whoami.demo`), a VIP or a pod IP, with `:port` unless the Service has one.
        destination: String,
        /// An HTTP request to explain: METHOD PATH.
        #[arg(long, num_args = 2, value_names = ["METHOD", "PATH"])]
        http: Option<Vec<String>>,
        /// A request header, `name: value` (repeatable; `Host` sets the host).
        #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BpfView {
    /// Services, backends, pods, endpoints, policy entries, drop and event counters.
    Maps,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 2s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: the unit is ms, s or m")),
    };
    if !(0.05..=3600.0).contains(&secs) {
        return Err(format!("{s:?}: between 50ms and 60m"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let choice = Choice {
        lab: cli.lab || cli.lab_run.is_some(),
        lab_run: cli.lab_run.clone().unwrap_or_else(|| "lab".to_owned()),
        kubeconfig: cli.kubeconfig.clone(),
        context: cli.context.clone(),
        namespace: cli.namespace.clone(),
    };
    let ctx = verb::Ctx {
        choice,
        format: cli.output,
        progress: Progress { quiet: cli.quiet },
    };
    let result = match cli.verb {
        Verb::Version => verb::version(&ctx),
        Verb::Status => verb::status(&ctx),
        Verb::Config { node, section } => verb::config(&ctx, &node, section),
        Verb::Bpf {
            node,
            what: BpfView::Maps,
            bpffs,
        } => verb::bpf_maps(&ctx, &node, bpffs.as_deref()),
        Verb::Top { interval, once } => verb::top(&ctx, interval, once),
        Verb::Graph { format, file } => verb::graph(&ctx, format, file.as_deref()),
        Verb::Explain {
            source,
            destination,
            http,
            headers,
        } => verb::explain(&ctx, &source, &destination, http.as_deref(), &headers),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "meshctl",
            "--lab-run",
            "t1f",
            "explain",
            "n1p1",
            "whoami.demo:80",
            "--http",
            "POST",
            "/admin/x",
            "-H",
            "x-user: a",
            "-o",
            "json",
        ])
        .expect("parse");
        assert_eq!(cli.lab_run.as_deref(), Some("t1f"), "a run names the lab: no kubeconfig is looked for");
        assert_eq!(cli.output, Format::Json);
        let Verb::Explain { http, headers, .. } = cli.verb else {
            panic!("explain")
        };
        assert_eq!(http.expect("http"), ["POST", "/admin/x"]);
        assert_eq!(headers, ["x-user: a"]);
        assert!(Cli::try_parse_from(["meshctl", "--lab", "--kubeconfig", "k", "status"]).is_err());
        assert!(Cli::try_parse_from(["meshctl", "--lab-run", "t1", "--context", "c", "status"]).is_err());
        let cli = Cli::try_parse_from(["meshctl", "graph", "--format", "svg", "--file", "g.svg"])
            .expect("parse");
        let Verb::Graph { format, file } = cli.verb else {
            panic!("graph")
        };
        assert_eq!(format, verb::GraphFormat::Svg);
        assert_eq!(file, Some(PathBuf::from("g.svg")));
    }
}
