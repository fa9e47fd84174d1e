//! Fuzzing (`fuzz/`, cargo-fuzz on rustup's nightly): a short run of every target in
//! `cargo xtask test`, and long runs whose numbers go to `bench/results/fuzz.md`.
//!
//! Targets run without a sanitizer (`-s none`): the code under test is safe Rust, so a
//! sanitizer would find little and halve the executions. Runs start from a copy of the
//! committed corpus, so the test command never changes the repository; a crash fails the run
//! and leaves its input under `fuzz/artifacts/<target>/`.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::{root_dir, sh, step, target_dir};

/// Every target, in `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 5] = ["config_chain", "hbone_connect", "hbone_forwarded", "cert_identity", "route_path"];

fn cargo_fuzz(args: &[&str]) -> Command {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let mut cmd = Command::new(format!("{home}/.cargo/bin/cargo"));
    cmd.arg("+nightly").arg("fuzz").args(args).current_dir(root_dir().join("fuzz"));
    cmd.env_remove("RUSTC").env_remove("RUSTC_WRAPPER").env_remove("RUSTFLAGS");
    cmd
}

/// A copy of `target`'s committed corpus to fuzz from.
fn corpus_copy(target: &str) -> Result<PathBuf> {
    let from = root_dir().join("fuzz/corpus").join(target);
    let to = target_dir().join("fuzz/corpus-run").join(target);
    let _ = std::fs::remove_dir_all(&to);
    std::fs::create_dir_all(&to)?;
    for entry in std::fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(to)
}

/// Runs each of `targets` for `seconds` (or `runs` executions), from the committed corpus.
pub fn run(targets: &[&str], seconds: u64, runs: Option<u64>) -> Result<()> {
    let dir = target_dir().join("fuzz");
    let dir = dir.to_str().context("target dir is not UTF-8")?.to_owned();
    step("fuzz: building the targets (cargo +nightly fuzz build -s none)");
    sh(&mut cargo_fuzz(&["build", "-s", "none", "--target-dir", &dir]))?;
    for target in targets {
        step(&format!("fuzz: {target}"));
        let corpus = corpus_copy(target)?;
        let limit = match runs {
            Some(n) => format!("-runs={n}"),
            None => format!("-max_total_time={seconds}"),
        };
        let corpus = corpus.to_str().context("corpus path is not UTF-8")?.to_owned();
        sh(&mut cargo_fuzz(&["run", "-s", "none", "--target-dir", &dir, target, &corpus, "--", &limit, "-print_final_stats=1"]))?;
    }
    Ok(())
}
