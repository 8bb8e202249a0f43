//! Multi-node training on loopback: `dtopp orchestrate` and one `dtopp train --nodes`
//! process per node, on CPU ranks, over burn-collective's global level.
//!
//! - 2 nodes x 1 rank follow 1 process x 2 ranks bit for bit in p and a_t (and losses),
//!   and 1 rank with the doubled batch within `data_parallel.rs`'s tolerances;
//! - 2 nodes x 2 ranks follow 1 process x 4 ranks;
//! - a node killed with SIGKILL ends the run on the other node within the stated bound,
//!   naming it, and both resume to the end of the uninterrupted run;
//! - a node with another config or another binary is refused by name.
//!
//! Every wait is bounded: a process that outlives its limit is killed and the test fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dtopp::metrics::StepMetrics;
use dtopp::train::SILENCE_LIMIT;
use dtopp_tests::{CPU_DATA_PARALLEL as CPU_TOL, batch_config, dtopp_binary, read_metrics};

/// The longest any process of these tests may run.
const LIMIT: Duration = Duration::from_secs(300);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dtopp-mn-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A free port `p` whose `p + 1` is free too (the orchestrator's supervision), below
/// Linux's ephemeral range (32768 and up): the global all-reduce opens a connection per
/// operation, and a port that some connection took as its source port cannot be bound.
fn free_ports() -> u16 {
    // Tests of this binary run in parallel: hand out ports one test at a time.
    static NEXT: Mutex<u16> = Mutex::new(0);
    let mut next = NEXT.lock().unwrap_or_else(|p| p.into_inner());
    if *next == 0 {
        // Spread over runs, so a port a previous run left in TIME_WAIT is not the first.
        *next = 20000 + (std::process::id() % 500) as u16 * 20;
    }
    loop {
        let port = *next;
        *next += 2;
        assert!(port < 32000, "no free port pair below 32000");
        if TcpListener::bind(("0.0.0.0", port)).is_ok()
            && TcpListener::bind(("0.0.0.0", port + 1)).is_ok()
        {
            return port;
        }
    }
}

/// How a process ended: its status, its stderr, when.
type Ended = (ExitStatus, String, Instant);

/// A running dtopp process; its stderr goes to a file (a pipe nobody reads could fill
/// and stop it).
struct Proc {
    child: Child,
    log: PathBuf,
}

fn spawn(args: &[String], env: &[(&str, &str)]) -> Proc {
    static SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = std::env::temp_dir().join(format!("dtopp-mn-{}-{n}.log", std::process::id()));
    let mut command = Command::new(dtopp_binary());
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        command.env(k, v);
    }
    Proc {
        child: command.spawn().expect("dtopp starts"),
        log,
    }
}

/// Waits at most [`LIMIT`] for every process, noting when each ended; returns their
/// status, stderr and end time.
fn finish_all(mut procs: Vec<Proc>) -> Vec<Ended> {
    let started = Instant::now();
    let mut ended: Vec<Option<(ExitStatus, Instant)>> = vec![None; procs.len()];
    while ended.iter().any(Option::is_none) {
        for (proc, end) in procs.iter_mut().zip(&mut ended) {
            if end.is_none()
                && let Some(status) = proc.child.try_wait().unwrap()
            {
                *end = Some((status, Instant::now()));
            }
        }
        if started.elapsed() > LIMIT {
            for proc in &mut procs {
                let _ = proc.child.kill();
            }
            panic!("a dtopp process ran past {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    procs
        .into_iter()
        .zip(ended)
        .map(|(proc, end)| {
            let (status, at) = end.unwrap();
            let err = std::fs::read_to_string(&proc.log).unwrap_or_default();
            let _ = std::fs::remove_file(&proc.log);
            (status, err, at)
        })
        .collect()
}

fn finish(proc: Proc) -> Ended {
    finish_all(vec![proc]).remove(0)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// One multi-node run: the orchestrator and `nodes` train processes, node `n` given
/// `node_args(n)` (after `train`) and `node_env(n)`.
struct Cluster {
    orchestrator: Proc,
    nodes: Vec<Proc>,
}

impl Cluster {
    fn start(
        nodes: usize,
        node_args: impl Fn(usize) -> Vec<String>,
        node_env: impl Fn(usize) -> Vec<(&'static str, &'static str)>,
    ) -> Self {
        let port = free_ports();
        let orchestrator = spawn(
            &strings(&["orchestrate", "--port", &port.to_string(), "--quiet"]),
            &[],
        );
        let nodes = (0..nodes)
            .map(|n| {
                let data_port = free_ports().to_string();
                let mut args = strings(&["train"]);
                args.extend(node_args(n));
                args.extend(strings(&[
                    "--nodes",
                    &nodes.to_string(),
                    "--node-rank",
                    &n.to_string(),
                    "--orchestrator",
                    &format!("ws://127.0.0.1:{port}"),
                    "--node-address",
                    "127.0.0.1",
                    "--data-port",
                    &data_port,
                    "--join-timeout",
                    "120",
                ]));
                spawn(&args, &node_env(n))
            })
            .collect();
        Self {
            orchestrator,
            nodes,
        }
    }

    /// Every node's and then the orchestrator's (status, stderr, end).
    fn wait(self) -> (Vec<Ended>, Ended) {
        let mut procs = self.nodes;
        procs.push(self.orchestrator);
        let mut ended = finish_all(procs);
        let orchestrator = ended.pop().unwrap();
        (ended, orchestrator)
    }
}

fn train_args(out: &Path, config: &str, steps: usize, extra: &[&str]) -> Vec<String> {
    let mut args = strings(&[
        "--preset",
        "tiny",
        "--config",
        config,
        "--steps",
        &steps.to_string(),
        "--quiet",
        "--out",
        &out.display().to_string(),
    ]);
    args.extend(strings(extra));
    args
}

/// One process (`dtopp train … extra`), waited for.
fn train_here(out: &Path, config: &str, steps: usize, extra: &[&str]) {
    let mut args = strings(&["train"]);
    args.extend(train_args(out, config, steps, extra));
    let (status, err, _) = finish(spawn(&args, &[]));
    assert!(status.success(), "{err}");
}

fn all_succeeded(nodes: &[Ended], orchestrator: &Ended) {
    for (n, (status, err, _)) in nodes.iter().enumerate() {
        assert!(status.success(), "node {n}: {err}");
    }
    assert!(orchestrator.0.success(), "orchestrator: {}", orchestrator.1);
}

/// The largest step-by-step differences in losses, p and a_t.
fn max_differences(a: &[StepMetrics], b: &[StepMetrics]) -> (f64, f64, f64) {
    assert_eq!(a.len(), b.len(), "steps");
    let mut d = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.step, x.tokens), (y.step, y.tokens));
        d.0 =
            d.0.max((x.loss - y.loss).abs())
                .max((x.ce_loss - y.ce_loss).abs());
        if let (Some(u), Some(v)) = (x.val_loss, y.val_loss) {
            d.0 = d.0.max((u - v).abs());
        }
        d.1 = d.1.max((x.threshold.unwrap() - y.threshold.unwrap()).abs());
        d.2 = d.2.max((x.active_experts - y.active_experts).abs());
    }
    d
}

/// The bits a resumed or redistributed run must repeat.
fn trajectory(metrics: &[StepMetrics]) -> Vec<(u64, Option<u64>, u64, u64)> {
    metrics
        .iter()
        .map(|m| {
            (
                m.loss.to_bits(),
                m.threshold.map(f64::to_bits),
                m.active_experts.to_bits(),
                m.grad_norm.to_bits(),
            )
        })
        .collect()
}

#[test]
fn two_nodes_follow_one_process_with_two_ranks_and_one_rank_with_the_doubled_batch() {
    let root = scratch("equivalence");
    let (b8, b16) = (batch_config(&root, 8), batch_config(&root, 16));
    let steps = 8;
    let nodes_run = root.join("nodes");
    let elsewhere = root.join("node1-out");
    let started = Instant::now();
    let cluster = Cluster::start(
        2,
        |n| {
            let out = if n == 0 { &nodes_run } else { &elsewhere };
            train_args(out, &b8, steps, &[])
        },
        |_| vec![],
    );
    let (nodes, orchestrator) = cluster.wait();
    let nodes_s = started.elapsed().as_secs_f64();
    all_succeeded(&nodes, &orchestrator);
    assert!(!elsewhere.exists(), "node 1 writes nothing");
    let config = std::fs::read_to_string(nodes_run.join("config.toml")).unwrap();
    assert!(
        config.contains("devices = 2") && config.contains("nodes = 2"),
        "{config}"
    );

    let ranks = root.join("ranks");
    let started = Instant::now();
    train_here(&ranks, &b8, steps, &["--devices", "cpu:0,cpu:1"]);
    let ranks_s = started.elapsed().as_secs_f64();
    let single = root.join("single");
    train_here(&single, &b16, steps, &[]);

    let (on_nodes, in_ranks, alone) = (
        read_metrics(&nodes_run),
        read_metrics(&ranks),
        read_metrics(&single),
    );
    let d_ranks = max_differences(&on_nodes, &in_ranks);
    let d_single = max_differences(&on_nodes, &alone);
    println!(
        "2 nodes x 1 rank vs 1 process x 2 ranks, {steps} steps: max |d loss| {:.2e}, |d p| {:.2e}, |d a_t| {:.2e} ({nodes_s:.1} s vs {ranks_s:.1} s, whole processes)",
        d_ranks.0, d_ranks.1, d_ranks.2
    );
    println!(
        "2 nodes x batch 8 vs 1 rank x batch 16: max |d loss| {:.2e}, |d p| {:.2e}, |d a_t| {:.2e}",
        d_single.0, d_single.1, d_single.2
    );
    // The same sums in the same order: two values summed either way are the same bits.
    assert_eq!(trajectory(&on_nodes), trajectory(&in_ranks));
    assert!(
        d_single.0 <= CPU_TOL.loss
            && d_single.1 <= CPU_TOL.threshold
            && d_single.2 <= CPU_TOL.active,
        "{d_single:?}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn two_nodes_of_two_ranks_follow_one_process_with_four_ranks() {
    let root = scratch("two-by-two");
    let b4 = batch_config(&root, 4);
    let steps = 8;
    let nodes_run = root.join("nodes");
    let cluster = Cluster::start(
        2,
        |_| train_args(&nodes_run, &b4, steps, &["--devices", "cpu:0,cpu:1"]),
        |_| vec![],
    );
    let (nodes, orchestrator) = cluster.wait();
    all_succeeded(&nodes, &orchestrator);
    let ranks = root.join("ranks");
    train_here(
        &ranks,
        &b4,
        steps,
        &["--devices", "cpu:0,cpu:1,cpu:2,cpu:3"],
    );
    let d = max_differences(&read_metrics(&nodes_run), &read_metrics(&ranks));
    println!(
        "2 nodes x 2 ranks vs 1 process x 4 ranks, {steps} steps: max |d loss| {:.2e}, |d p| {:.2e}, |d a_t| {:.2e}",
        d.0, d.1, d.2
    );
    assert!(
        d.0 <= CPU_TOL.loss && d.1 <= CPU_TOL.threshold && d.2 <= CPU_TOL.active,
        "{d:?}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_killed_node_ends_the_run_by_name_and_the_nodes_resume_to_the_same_end() {
    let root = scratch("kill");
    let b8 = batch_config(&root, 8);
    let steps = 8;
    let run = root.join("run");
    let every = ["--checkpoint-every", "2"];
    // Node 1 (global rank 1) kills itself with SIGKILL as step 4 starts.
    let cluster = Cluster::start(
        2,
        |_| train_args(&run, &b8, steps, &every),
        |n| {
            if n == 1 {
                vec![("DTOPP_TEST_FAIL_RANK", "1:4:kill")]
            } else {
                vec![]
            }
        },
    );
    let (nodes, orchestrator) = cluster.wait();
    let (killed, survivor) = (&nodes[1], &nodes[0]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        killed.0.signal(),
        Some(9),
        "node 1 was killed: {}",
        killed.1
    );
    assert!(!survivor.0.success());
    assert!(
        survivor.1.contains("node 1") && survivor.1.contains("disconnected"),
        "node 0 names node 1: {}",
        survivor.1
    );
    let detected = survivor.2.duration_since(killed.2).as_secs_f64();
    println!(
        "node 0 exited {:.0} ms after node 1 was killed (polled every 10 ms)",
        detected * 1e3
    );
    // The stated bound: a killed process is noticed at once (its kernel closes the
    // connection); [`SILENCE_LIMIT`] covers a connection that drops silently.
    assert!(detected < SILENCE_LIMIT.as_secs_f64(), "{detected} s");
    assert!(
        !orchestrator.0.success() && orchestrator.1.contains("node 1"),
        "{}",
        orchestrator.1
    );
    let written = read_metrics(&run).len();
    assert!((2..steps).contains(&written), "{written} steps written");

    // Both nodes resume from node 0's newest checkpoint to the end.
    let dir = run.display().to_string();
    let cluster = Cluster::start(
        2,
        |_| strings(&["--resume", &dir, "--steps", "8", "--quiet"]),
        |_| vec![],
    );
    let (nodes, orchestrator) = cluster.wait();
    all_succeeded(&nodes, &orchestrator);

    let reference = root.join("reference");
    train_here(&reference, &b8, steps, &["--devices", "cpu:0,cpu:1"]);
    assert_eq!(
        trajectory(&read_metrics(&run)),
        trajectory(&read_metrics(&reference))
    );

    // A resume on another node count is refused by name.
    let out = Command::new(dtopp_binary())
        .args([
            "train",
            "--resume",
            &dir,
            "--steps",
            "9",
            "--devices",
            "cpu:0,cpu:1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--nodes"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_node_with_another_config_or_binary_is_refused_by_name() {
    let root = scratch("refuse");
    let b8 = batch_config(&root, 8);
    for (what, env, seed) in [
        ("config", None, "7"),
        (
            "binary",
            Some(("DTOPP_TEST_BINARY_ID", "dtopp-0.0.0-0000000000000000")),
            "0",
        ),
    ] {
        let run = root.join(what);
        let cluster = Cluster::start(
            2,
            |n| {
                let seed = if n == 1 { seed } else { "0" };
                train_args(&run, &b8, 4, &["--seed", seed])
            },
            |n| match (n, env) {
                (1, Some(pair)) => vec![pair],
                _ => vec![],
            },
        );
        let (nodes, orchestrator) = cluster.wait();
        let expected = if what == "config" {
            "different config"
        } else {
            "another dtopp binary"
        };
        for (n, (status, err, _)) in nodes.iter().enumerate() {
            assert!(!status.success(), "node {n} must not train");
            assert!(
                err.contains("node 1") && err.contains(expected),
                "node {n}: {err}"
            );
        }
        assert!(!orchestrator.0.success() && orchestrator.1.contains(expected));
        assert!(!run.join("metrics.jsonl").exists(), "nothing trained");
    }
    std::fs::remove_dir_all(&root).unwrap();
}
