//! `cpu_affinity: true` pins workers among the CPUs the process may use (`taskset`, cgroup
//! cpusets, systemd's `CPUAffinity=`), never to CPUs outside that set.

mod common;

use std::process::Command;

use common::*;

/// `Cpus_allowed_list` of every thread of `pid` named `llmproxy-w*` (the workers).
fn worker_cpus(pid: u32) -> Vec<String> {
    let mut lists = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        if field("Name:").is_some_and(|n| n.starts_with("llmproxy-w")) {
            lists.push(field("Cpus_allowed_list:").unwrap_or_default());
        }
    }
    lists
}

/// The gateway under `taskset`, killed with the test.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn workers_are_pinned_inside_the_allowed_cpu_set() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("SKIPPED workers_are_pinned_inside_the_allowed_cpu_set: needs 2 CPUs, this machine has {cpus}");
        return;
    }
    let last = (cpus - 1).to_string();
    let sim = spawn_mock(&[]);
    let path = unique_path("llmproxy-affinity").with_extension("yaml");
    std::fs::write(
        &path,
        format!(
            "listen: \"127.0.0.1:0\"\nworkers: 2\ncpu_affinity: true\nbackends: [{{url: \"http://{}\"}}]\n",
            sim.addr
        ),
    )
    .unwrap();
    let ready = unique_path("llmproxy-affinity-ready");
    let child = Command::new("taskset")
        .args([
            "-c",
            &last,
            env!("CARGO_BIN_EXE_llmproxy"),
            "serve",
            "--config",
        ])
        .arg(&path)
        .arg("--ready-file")
        .arg(&ready)
        .spawn()
        .expect("spawn taskset llmproxy");
    let mut gw = Killed(child);
    wait_ready(&mut gw.0, &ready);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&ready);
    let pid = gw.0.id();
    // Each worker pins itself first thing, before it listens.
    assert!(
        wait_until(std::time::Duration::from_secs(10), || worker_cpus(pid)
            .len()
            == 2),
        "two worker threads: {:?}",
        worker_cpus(pid)
    );
    let lists = worker_cpus(pid);
    // Pinned by `worker % cpus` they would sit on CPUs 0 and 1, outside the set `taskset` gave.
    assert!(
        lists.iter().all(|l| *l == last),
        "workers on {lists:?}, allowed {last}"
    );
}
