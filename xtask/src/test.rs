//! `cargo xtask test`: every test, unit and privileged, with a leftover check at the end.

use std::{process::Command, time::Instant};

use anyhow::{Result, bail};

use crate::{require_root, setup_and_build, sh, step};

/// Seconds of fuzzing per target in the test command (the long runs are `cargo xtask fuzz`).
const FUZZ_SMOKE_SECS: u64 = 10;

/// The privileged suites (test targets of `tests/` behind the `privileged` feature).
const SUITES: [&str; 5] = ["e2e", "k8s", "kernel", "node", "interop"];

pub fn run(suite: Option<&str>, filter: Option<&str>) -> Result<()> {
    require_root("test")?;
    if let Some(s) = suite.filter(|s| !SUITES.contains(s)) {
        bail!("unknown suite {s:?}: expected one of {SUITES:?}");
    }
    let everything = suite.is_none() && filter.is_none();
    let started = Instant::now();
    setup_and_build()?;
    if everything {
        // In the background (niced Go build), after setup.sh so their apt runs never overlap;
        // awaited before the apiserver suite.
        crate::k8s::start_setup()?;
    }
    let leftovers = mesh_tests::clean::clean_all();
    if !leftovers.is_empty() {
        println!("    removed leftovers of an earlier run: {}", leftovers.join(", "));
    }

    let result = run_suites(everything, suite, filter);

    step("checking that nothing was left behind");
    let left = mesh_tests::clean::clean_all();
    let stray = stray_programs()?;
    result?;
    if !left.is_empty() {
        bail!("tests left these behind (now removed): {}", left.join(", "));
    }
    if !stray.is_empty() {
        bail!("mesh programs still loaded after the tests: {stray:?}");
    }
    println!("all tests passed in {:.0?}", started.elapsed());
    Ok(())
}

fn run_suites(everything: bool, suite: Option<&str>, filter: Option<&str>) -> Result<()> {
    if everything {
        step("unit and in-process tests (unprivileged): cargo test --workspace");
        sh(Command::new("cargo").args(["test", "--workspace", "--locked"]))?;
        // A short run of each fuzz target: a crash fails the test command.
        crate::fuzz::run(&crate::fuzz::TARGETS, FUZZ_SMOKE_SECS, None)?;
        crate::k8s::run()?;
    }
    crate::lab::build_binaries(crate::lab::Profile::Debug)?;
    step("privileged suites: kernel programs and namespaces (one at a time: they share the kernel)");
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--locked", "-p", "mesh-tests", "--features", "privileged"]);
    match suite {
        Some(s) => cmd.args(["--test", s]),
        None => cmd.arg("--tests"),
    };
    if let Some(f) = filter {
        // A filter that matches nothing would run nothing and report a pass.
        let mut list = Command::new(cmd.get_program());
        list.args(cmd.get_args()).args(["--", "--list", f]);
        let listed = list.output()?;
        let found = String::from_utf8_lossy(&listed.stdout).lines().filter(|l| l.ends_with(": test")).count();
        if !listed.status.success() || found == 0 {
            bail!("no privileged test matches {f:?}{}", suite.map_or(String::new(), |s| format!(" in suite {s}")));
        }
    }
    cmd.args(["--", "--test-threads=1"]);
    if let Some(f) = filter {
        cmd.arg(f);
    }
    sh(&mut cmd)
}

/// Mesh programs still loaded. A tc program on a veth inside a deleted namespace lives until the
/// kernel's asynchronous namespace cleanup runs, so a few seconds are allowed for that.
fn stray_programs() -> Result<Vec<String>> {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let bpftool = Command::new("bpftool").args(["prog", "list"]).output()?;
        let progs = String::from_utf8_lossy(&bpftool.stdout);
        let stray: Vec<String> = progs.lines().filter(|l| l.contains(" name mesh_")).map(str::to_owned).collect();
        if stray.is_empty() || Instant::now() > deadline {
            return Ok(stray);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
