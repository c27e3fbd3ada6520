//! Hostile task programs (`workers/hostile/`): each is contained and ends
//! with its own clear outcome, and the worker and other jobs go on.
//!
//! Most tests run `run_process_in` under a sandbox of their own (a private
//! cgroup parent, removed at the end). They assert the cgroup behaviour
//! where this machine offers writable cgroups (memory + pids), else the
//! rlimit fallback's behaviour, so every test asserts something either way.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agentq::executor::cgroup::Cgroups;
use agentq::executor::owner::Owner;
use agentq::executor::sandbox::Mode;
use agentq::executor::*;
use common::*;
use serde_json::json;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

fn hostile_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workers/hostile")
}

fn kind(name: &str) -> Manifest {
    Registry::load(&hostile_dir())
        .expect("workers/hostile loads")
        .get(name)
        .unwrap_or_else(|| panic!("hostile kind {name}"))
        .clone()
}

fn input(kind: &str, tenant: &str, payload: serde_json::Value) -> TaskInput {
    TaskInput {
        id: format!("job-{kind}"),
        tenant: tenant.into(),
        queue: "default".into(),
        kind: kind.into(),
        attempt: 1,
        payload: RawValue::from_string(payload.to_string()).unwrap(),
    }
}

fn caps(timeout: Duration) -> Caps {
    Caps {
        timeout,
        memory: Some(256 << 20),
        kill_grace: Duration::from_millis(500),
    }
}

/// A sandbox with its own cgroup parent; `Drop` removes the parent.
struct TestSandbox {
    sb: Sandbox,
    parent: String,
}

impl TestSandbox {
    fn new(tag: &str, pids_max: u64, task_user: Option<TaskUser>) -> TestSandbox {
        let parent = format!("agentq-test-{tag}-{:08x}", rand::random::<u32>());
        let sb = Sandbox::new(SandboxConfig {
            cgroup_parent: Some(parent.clone()),
            worker_id: "w".into(),
            pids_max,
            task_user,
        });
        TestSandbox { sb, parent }
    }

    fn cgroup(&self) -> bool {
        matches!(self.sb.mode(), Mode::Cgroup(_))
    }

    async fn run(&self, m: &Manifest, i: &TaskInput, lim: &Caps) -> Report {
        run_process_in(&self.sb, m, i, lim, CancellationToken::new()).await
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        remove_cgroup_parent(&self.parent);
    }
}

/// Removes its cgroup parent (see [`remove_cgroup_parent`]) when dropped.
struct CgroupParent(String);

impl Drop for CgroupParent {
    fn drop(&mut self) {
        remove_cgroup_parent(&self.0);
    }
}

/// Removes `<mount>/<parent>` in every v1 hierarchy and on v2 (empty dirs only).
fn remove_cgroup_parent(parent: &str) {
    for base in ["memory", "pids", "freezer", "unified", ""] {
        let dir = Path::new("/sys/fs/cgroup").join(base).join(parent);
        if let Ok(workers) = std::fs::read_dir(&dir) {
            for w in workers.flatten().filter(|e| e.path().is_dir()) {
                for a in std::fs::read_dir(w.path()).into_iter().flatten().flatten() {
                    let _ = std::fs::remove_dir(a.path());
                }
                let _ = std::fs::remove_dir(w.path());
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

/// Pids whose command line mentions `needle`.
fn processes_running(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) && !is_dead(pid) {
            out.push(pid);
        }
    }
    out
}

fn nobody() -> TaskUser {
    "nobody".parse().expect("user nobody exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_hits_the_process_cap_and_is_killed() {
    // As root RLIMIT_NPROC does not bind, so the fallback runs it as nobody.
    let ts = TestSandbox::new("bomb", 32, None);
    let ts = if ts.cgroup() {
        ts
    } else {
        TestSandbox::new("bomb", 32, Some(nobody()))
    };
    let m = kind("forkbomb");
    let r = ts
        .run(
            &m,
            &input("forkbomb", "evil", json!({})),
            &caps(Duration::from_secs(3)),
        )
        .await;
    assert_eq!(r.outcome, Outcome::TimedOut, "{r:?}");
    let e = r.error.clone().unwrap();
    assert!(e.starts_with("timed out after 3s"), "{e}");
    if ts.cgroup() {
        assert!(e.contains("process cap 32 reached"), "{e}");
    }
    let needle = m.dir.join("run").display().to_string();
    eventually(
        Duration::from_secs(20),
        "no fork bomb process left",
        || async { processes_running(&needle).is_empty().then_some(()) },
    )
    .await;
    // The same sandbox runs the next job normally.
    let echo = Registry::load(&workers_dir()).unwrap();
    let r = ts
        .run(
            echo.get("echo").unwrap(),
            &input("echo", "good", json!({"after": "bomb"})),
            &caps(Duration::from_secs(30)),
        )
        .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
}

#[tokio::test]
async fn huge_stdout_is_bounded() {
    let ts = TestSandbox::new("bigout", 64, None);
    let m = kind("bigout");
    // 128 MiB on one line, then the result: only the tail is kept, the
    // result line is still found.
    let r = ts
        .run(
            &m,
            &input("bigout", "evil", json!({"mib": 128})),
            &caps(Duration::from_secs(60)),
        )
        .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert_eq!(r.output, Some(json!("end")));
    // Writing forever: stopped at the timeout, nothing unbounded kept.
    let r = ts
        .run(
            &m,
            &input("bigout", "evil", json!({"forever": true})),
            &caps(Duration::from_secs(2)),
        )
        .await;
    assert_eq!(r.outcome, Outcome::TimedOut, "{r:?}");
    let e = r.error.unwrap();
    assert!(e.starts_with("timed out after 2s"), "{e}");
    assert!(e.len() < 4096, "error is {} bytes", e.len());
    if ts.cgroup() {
        // The cgroup's peak is the program's own, with no floor from this
        // (large) test process; python plus a 1 MiB buffer stays far below.
        assert!(r.peak_rss_bytes < 128 << 20, "{}", r.peak_rss_bytes);
    }
}

#[tokio::test]
async fn closing_stdout_early_is_a_plain_failure() {
    let ts = TestSandbox::new("closeout", 64, None);
    let started = Instant::now();
    let r = ts
        .run(
            &kind("closeout"),
            &input("closeout", "evil", json!({})),
            &caps(Duration::from_secs(30)),
        )
        .await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.error_summary(), Some("task program exited with code 3"));
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn ignoring_sigterm_gets_sigkill_after_the_grace() {
    let ts = TestSandbox::new("noterm", 64, None);
    let lim = Caps {
        timeout: Duration::from_secs(1),
        memory: None,
        kill_grace: Duration::from_millis(500),
    };
    let r = ts
        .run(&kind("noterm"), &input("noterm", "evil", json!({})), &lim)
        .await;
    assert_eq!(r.outcome, Outcome::TimedOut, "{r:?}");
    assert_eq!(r.signal, Some(libc::SIGKILL));
    assert!(r.wall_ms >= 1500, "{}", r.wall_ms);
    // The child that ignores TERM as well died with the group.
    let child = r
        .output
        .as_ref()
        .and_then(|o| o["child"].as_i64())
        .expect("child pid") as i32;
    assert!(
        wait_dead(child, Duration::from_secs(10)).await,
        "{child} alive"
    );
}

#[tokio::test]
async fn grandchildren_that_leave_the_group_are_killed() {
    let ts = TestSandbox::new("escape", 64, None);
    let r = ts
        .run(
            &kind("escape"),
            &input("escape", "evil", json!({})),
            &caps(Duration::from_secs(30)),
        )
        .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    let out = r.output.unwrap();
    let grouped = out["grouped"].as_i64().unwrap() as i32;
    let escaped: Vec<i32> = serde_json::from_value(out["escaped"].clone()).unwrap();
    assert_eq!(escaped.len(), 2);
    assert!(wait_dead(grouped, Duration::from_secs(10)).await);
    if ts.cgroup() {
        for pid in &escaped {
            assert!(
                wait_dead(*pid, Duration::from_secs(10)).await,
                "setsid daemon {pid} survived"
            );
        }
    } else {
        // Known limit of the fallback: a new session escapes killpg.
        for pid in &escaped {
            assert!(!is_dead(*pid), "{pid}");
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_with_their_own_uids_cannot_read_each_other() {
    let ts = TestSandbox::new("snoop", 64, Some("2000000-2000003".parse().unwrap()));
    let notes = tempfile::tempdir().unwrap();
    set_mode(notes.path(), 0o777);
    let note = notes.path().join("a.json");
    let m = kind("snoop");
    // Tenant A keeps a secret in its working directory and stays a while.
    let a_input = input(
        "snoop",
        "acme",
        json!({"secret": "acme-private", "note": note, "hold_ms": 4000}),
    );
    let lim = caps(Duration::from_secs(30));
    let ts = std::sync::Arc::new(ts);
    let a_task = {
        let (ts, m, lim) = (ts.clone(), m.clone(), lim.clone());
        tokio::spawn(async move { ts.run(&m, &a_input, &lim).await })
    };
    let a_seen: serde_json::Value =
        eventually(Duration::from_secs(20), "tenant A running", || async {
            let text = std::fs::read_to_string(&note).ok()?;
            serde_json::from_str(&text).ok()
        })
        .await;
    let a_cwd = a_seen["cwd"].as_str().unwrap().to_string();
    let a_pid = a_seen["pid"].as_i64().unwrap();
    let worker_environ = format!("/proc/{}/environ", std::process::id());
    let targets = [
        format!("{a_cwd}/secret.txt"),
        a_cwd.clone(),
        format!("/proc/{a_pid}/environ"),
        format!("/proc/{a_pid}/cwd/secret.txt"),
        worker_environ.clone(),
    ];
    let b = ts
        .run(
            &m,
            &input("snoop", "globex", json!({"paths": targets})),
            &lim,
        )
        .await;
    assert_eq!(b.outcome, Outcome::Succeeded, "{b:?}");
    let out = b.output.unwrap();
    for t in &targets {
        assert_eq!(
            out["readable"][t],
            json!(false),
            "tenant B could read {t}: {out}"
        );
    }
    let a = a_task.await.unwrap();
    assert_eq!(a.outcome, Outcome::Succeeded, "{a:?}");
    let a_uid = a.output.unwrap()["uid"].as_u64().unwrap();
    let b_uid = out["uid"].as_u64().unwrap();
    assert!((2000000..=2000003).contains(&a_uid) && (2000000..=2000003).contains(&b_uid));
    assert_ne!(a_uid, b_uid);
    // A's working directory is gone once A ended.
    assert!(!Path::new(&a_cwd).exists(), "{a_cwd} left behind");
}

#[tokio::test]
async fn tasks_as_nobody_cannot_read_the_workers_secrets() {
    let ts = TestSandbox::new("nobody", 64, Some(nobody()));
    let secrets = tempfile::tempdir().unwrap();
    set_mode(secrets.path(), 0o755);
    let file = secrets.path().join("agentq.toml");
    std::fs::write(&file, "redis_url = \"redis://:hunter2@127.0.0.1:6379\"\n").unwrap();
    set_mode(&file, 0o600);
    let targets = [
        file.display().to_string(),
        format!("/proc/{}/environ", std::process::id()),
        "/root".to_string(),
    ];
    let r = ts
        .run(
            &kind("snoop"),
            &input("snoop", "evil", json!({"paths": targets})),
            &caps(Duration::from_secs(30)),
        )
        .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    let out = r.output.unwrap();
    assert_eq!(out["uid"], json!(65534), "{out}");
    for t in &targets {
        assert_eq!(
            out["readable"][t],
            json!(false),
            "nobody could read {t}: {out}"
        );
    }
    // Its own working directory is its own.
    assert!(!out["cwd"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn cgroup_mode_is_used_where_cgroups_are_writable() {
    let ts = TestSandbox::new("mode", 64, None);
    let writable = ["memory", "pids"].iter().all(|c| {
        Path::new("/sys/fs/cgroup")
            .join(c)
            .join("cgroup.procs")
            .exists()
    }) && unsafe { libc::geteuid() } == 0;
    if writable {
        assert!(ts.cgroup(), "{}", ts.sb.describe());
        let dirs: Vec<PathBuf> = ["memory", "pids"]
            .iter()
            .map(|c| {
                Path::new("/sys/fs/cgroup")
                    .join(c)
                    .join(&ts.parent)
                    .join("w")
            })
            .collect();
        for d in &dirs {
            assert!(d.is_dir(), "{}", d.display());
        }
        // Attempt cgroups are removed after each attempt.
        let r = ts
            .run(
                &kind("closeout"),
                &input("closeout", "t", json!({})),
                &caps(Duration::from_secs(30)),
            )
            .await;
        assert_eq!(r.exit_code, Some(3));
        for d in &dirs {
            let left: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .flatten()
                .filter(|e| e.path().is_dir())
                .collect();
            assert!(left.is_empty(), "{left:?}");
        }
    } else {
        assert_eq!(ts.sb.mode(), Mode::Rlimit, "{}", ts.sb.describe());
    }
    // "off" always means the rlimit path, and says why.
    let off = Sandbox::rlimit_only();
    assert_eq!(off.mode(), Mode::Rlimit);
    assert!(off.describe().contains("disabled"), "{}", off.describe());
}

/// A worker process started with `args` running an `escape` job that
/// waits; returns once the job wrote its note (in `notes`): the worker,
/// and the pids of the grandchildren that left the process group.
async fn run_an_escape(tq: &TestQueue, args: &[&str], notes: &Path) -> (Proc, Vec<i32>) {
    let note = notes.join("escape.json");
    let worker = Proc(tq.spawn_worker(args));
    let mut spec = agentq::queue::job::JobSpec::new("evil", "default", "escape");
    spec.payload = json!({"note": note, "wait": true}).to_string();
    tq.queue.enqueue(&spec).await.expect("enqueue");
    let seen: serde_json::Value = eventually(Duration::from_secs(30), "escape running", || async {
        serde_json::from_str(&std::fs::read_to_string(&note).ok()?).ok()
    })
    .await;
    let escaped: Vec<i32> = serde_json::from_value(seen["escaped"].clone()).unwrap();
    (worker, escaped)
}

/// `agentq worker` SIGKILLed alone mid-attempt: its lease guard sees the
/// worker's end of the pipe close and kills what it watched at once, the
/// attempt's cgroup included, so even grandchildren that left the process
/// group with `setsid` do not outlive the worker.
#[tokio::test]
async fn the_lease_guard_kills_a_killed_workers_escaped_processes() {
    let tq = TestQueue::new("hostile-guard").await;
    let parent = format!("agentq-test-guard-{:08x}", rand::random::<u32>());
    let notes = tempfile::tempdir().unwrap();
    let hostile = hostile_dir().display().to_string();
    let args = [
        "--workers-dir",
        hostile.as_str(),
        "--cgroup-parent",
        parent.as_str(),
    ];
    let (mut worker, escaped) = run_an_escape(&tq, &args, notes.path()).await;
    assert!(
        Path::new("/sys/fs/cgroup/memory").exists(),
        "this test needs cgroups (v1 memory hierarchy): the guard finds setsid'd processes by cgroup"
    );
    worker.kill().expect("SIGKILL worker");
    worker.wait().expect("reap worker");
    for pid in &escaped {
        assert!(
            wait_dead(*pid, Duration::from_secs(5)).await,
            "{pid} outlived its SIGKILLed worker: the lease guard did not kill it"
        );
    }
    tq.cleanup().await;
}

/// `agentq worker` and its lease guard SIGKILLed mid-attempt (the whole
/// process tree lost, as when a container is OOM-killed): the attempt's
/// daemonized grandchildren outlive them (PDEATHSIG reaches only the direct
/// child), and the next worker's startup sweep of dead workers' cgroups
/// kills them.
#[tokio::test]
async fn stale_attempts_of_a_killed_worker_are_swept_at_startup() {
    let tq = TestQueue::new("hostile-sweep").await;
    let parent = format!("agentq-test-sweep-{:08x}", rand::random::<u32>());
    let notes = tempfile::tempdir().unwrap();
    let hostile = hostile_dir().display().to_string();
    let args = [
        "--workers-dir",
        hostile.as_str(),
        "--cgroup-parent",
        parent.as_str(),
        "--lease",
        "2s",
        "--shutdown-grace",
        "1s",
    ];
    let (mut first, escaped) = run_an_escape(&tq, &args, notes.path()).await;
    let guard = common::lease_guard_of(first.id()).expect("the worker's lease guard");
    // SAFETY: signalling a process of this test's worker.
    unsafe { libc::kill(guard as libc::pid_t, libc::SIGKILL) };
    first.kill().expect("SIGKILL worker");
    first.wait().expect("reap worker");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for pid in &escaped {
        assert!(
            !is_dead(*pid),
            "{pid} died with the worker; the gap this test covers is gone"
        );
    }
    let mut second = Proc(tq.spawn_worker(&args));
    let cgroups = Path::new("/sys/fs/cgroup/memory").exists();
    for pid in &escaped {
        if cgroups {
            assert!(
                wait_dead(*pid, Duration::from_secs(30)).await,
                "{pid} survived the sweep"
            );
        } else {
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }
    // The job itself is re-run after the lease expires (and killed with
    // the second worker below).
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    second.wait().expect("worker exits");
    remove_cgroup_parent(&parent);
    tq.cleanup().await;
}

/// Each hostile kind of the end-to-end test: its payload, the outcome its
/// job must end with, and a piece of its last error ("" for none).
fn hostile_jobs() -> [(&'static str, serde_json::Value, &'static str, &'static str); 5] {
    [
        ("forkbomb", json!({}), "timed_out", "process cap"),
        ("bigout", json!({"mib": 32}), "succeeded", ""),
        ("closeout", json!({}), "failed", "exited with code 3"),
        ("noterm", json!({}), "timed_out", "timed out after 1s"),
        ("escape", json!({}), "succeeded", ""),
    ]
}

/// One workers folder with the hostile kinds and echo.
fn hostile_and_echo_kinds() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    for k in ["forkbomb", "bigout", "closeout", "noterm", "escape"] {
        std::os::unix::fs::symlink(hostile_dir().join(k), dir.path().join(k)).unwrap();
    }
    std::os::unix::fs::symlink(workers_dir().join("echo"), dir.path().join("echo")).unwrap();
    dir
}

/// Enqueue each hostile job of tenant evil (one attempt) and six echo jobs
/// of tenant good; the ids of both.
async fn enqueue_hostile_beside_good(tq: &TestQueue) -> (Vec<String>, Vec<String>) {
    let mut ids = Vec::new();
    for (k, payload, _, _) in &hostile_jobs() {
        let mut spec = agentq::queue::job::JobSpec::new("evil", "default", *k);
        spec.payload = payload.to_string();
        spec.max_attempts = Some(1);
        ids.push(tq.enqueue(&spec).await);
    }
    let mut good = Vec::new();
    for i in 0..6 {
        let mut spec = agentq::queue::job::JobSpec::new("good", "default", "echo");
        spec.payload = json!({"i": i}).to_string();
        good.push(tq.enqueue(&spec).await);
    }
    (ids, good)
}

/// Each hostile job ends with its own outcome (and error), every good job
/// succeeds, and the ledger holds one row per attempt with the same
/// outcomes.
async fn assert_each_job_has_its_own_outcome(
    tq: &TestQueue,
    db: &TestDb,
    ids: &[String],
    good: &[String],
) {
    for (id, (k, _, outcome, needle)) in ids.iter().zip(&hostile_jobs()) {
        let info = job_in_state(tq, id, &["succeeded", "dead"]).await;
        assert_eq!(info.outcome.as_deref(), Some(*outcome), "{k}: {info:?}");
        if !needle.is_empty() {
            let e = info.last_error.clone().unwrap_or_default();
            assert!(e.contains(needle), "{k}: {e}");
        }
    }
    for id in good {
        let info = job_in_state(tq, id, &["succeeded", "dead"]).await;
        assert_eq!(info.state, "succeeded", "{info:?}");
    }
    // One ledger row per attempt, with the same outcomes.
    let rows = eventually(Duration::from_secs(60), "ledger rows", || async {
        let rows = db.rows().await;
        (rows.len() == ids.len() + good.len()).then_some(rows)
    })
    .await;
    for (id, (k, _, outcome, _)) in ids.iter().zip(&hostile_jobs()) {
        let row = rows.iter().find(|r| &r.0 == id).expect("row");
        assert_eq!(row.2, *outcome, "{k}");
    }
}

/// The whole pipeline: a worker process runs every hostile kind beside a
/// well-behaved tenant; each hostile job ends with its own outcome in the
/// job record and the ledger, every good job succeeds, the worker lives on.
#[tokio::test]
async fn hostile_jobs_get_their_own_outcomes_and_the_rest_goes_on() {
    let tq = TestQueue::new("hostile-e2e").await;
    let db = TestDb::new("hostile_e2e").await;
    let parent = format!("agentq-test-e2e-{:08x}", rand::random::<u32>());
    let dir = hostile_and_echo_kinds();
    let workers = dir.path().display().to_string();
    let how = WorkerProc {
        database_url: Some(db.url()),
        ..Default::default()
    };
    let mut worker = Proc(tq.spawn_worker_with(
        &[
            "--concurrency",
            "4",
            "--workers-dir",
            &workers,
            "--cgroup-parent",
            &parent,
            "--task-pids-max",
            "32",
            "--kill-grace",
            "500ms",
            "--task-user",
            "nobody",
            "--backoff-base",
            "50ms",
        ],
        &how,
    ));
    let (ids, good) = enqueue_hostile_beside_good(&tq).await;
    assert_each_job_has_its_own_outcome(&tq, &db, &ids, &good).await;
    assert!(worker.try_wait().unwrap().is_none(), "the worker died");
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    assert!(worker.wait().unwrap().success());
    remove_cgroup_parent(&parent);
    db.cleanup().await;
    tq.cleanup().await;
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A pid above the kernel's maximum: no process here has it.
fn no_such_pid() -> u32 {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("pid_max is a number");
    max + 1
}

/// Makes `<parent dir>/<worker>/<attempt>` in each of `cg`'s hierarchies,
/// as a worker named `worker` would for its attempt `attempt`, and starts a
/// `sleep 30` in it. The sleep is killed when the returned guard drops.
fn attempt_with_a_process(cg: &Cgroups, worker: &str, attempt: &str) -> (Vec<PathBuf>, Proc) {
    let dirs: Vec<PathBuf> = cg
        .worker_dirs()
        .iter()
        .map(|w| w.parent().expect("parent dir").join(worker).join(attempt))
        .collect();
    let sleep = Proc(
        die_with_test(Command::new("sleep").arg("30"))
            .spawn()
            .expect("spawn sleep"),
    );
    for d in &dirs {
        std::fs::create_dir_all(d).expect("mkdir attempt cgroup");
        std::fs::write(d.join("cgroup.procs"), sleep.id().to_string()).expect("join cgroup");
    }
    (dirs, sleep)
}

/// Workers in other pid namespaces (containers) may share the cgroup tree:
/// their pids mean nothing here, so the sweep must leave their attempts and
/// processes alone, and still sweep those of dead workers of its own.
#[tokio::test]
async fn sweep_leaves_attempts_of_other_pid_namespaces_alone() {
    let parent = format!("agentq-test-ns-{:08x}", rand::random::<u32>());
    // Dropped after the processes below: removes the test's cgroups even
    // when an assertion fails.
    let _cleanup = CgroupParent(parent.clone());
    let cg = Cgroups::open(&parent, "w").unwrap_or_else(|e| {
        panic!(
            "this test needs writable cgroups (memory and pids) and they are not usable here: {e}"
        )
    });
    let me = Owner::me();
    let foreign = Owner {
        pid_ns: me.pid_ns + 1,
        pid: no_such_pid(),
        start: 12345,
    };
    let dead_here = Owner {
        pid: no_such_pid(),
        ..me
    };
    let (foreign_dirs, mut foreign_sleep) =
        attempt_with_a_process(&cg, "in-a-container", &format!("{foreign}.0"));
    let (dead_dirs, mut dead_sleep) =
        attempt_with_a_process(&cg, "dead-here", &format!("{dead_here}.0"));
    // The older name without a namespace is read as ours, as it was.
    let (old_dirs, mut old_sleep) =
        attempt_with_a_process(&cg, "dead-old", &format!("{}.1.0", no_such_pid()));

    cg.sweep_stale();

    for d in &foreign_dirs {
        assert!(
            d.is_dir(),
            "{} of a live foreign worker was swept",
            d.display()
        );
    }
    assert!(
        matches!(foreign_sleep.try_wait(), Ok(None)),
        "the sweep killed a process of a worker in another pid namespace"
    );
    for (dirs, sleep, what) in [
        (
            &dead_dirs,
            &mut dead_sleep,
            "a dead worker of this namespace",
        ),
        (
            &old_dirs,
            &mut old_sleep,
            "a dead worker (name without namespace)",
        ),
    ] {
        for d in dirs {
            assert!(!d.exists(), "{} of {what} was not swept", d.display());
        }
        assert!(
            sleep.wait().expect("wait").signal() == Some(libc::SIGKILL),
            "the process of {what} was killed"
        );
    }
    foreign_sleep.kill().expect("kill");
    foreign_sleep.wait().expect("reap");
    let parents: Vec<PathBuf> = cg
        .worker_dirs()
        .iter()
        .map(|w| w.parent().expect("parent dir").to_path_buf())
        .collect();
    drop(cg);
    remove_cgroup_parent(&parent);
    for p in parents {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

/// `agentq-task-*` working directories under `tmp`, directly or one level
/// down (inside a worker's directory).
fn task_dirs(tmp: &Path) -> Vec<PathBuf> {
    let list = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && !p.is_symlink())
            .collect()
    };
    let named = |p: &PathBuf, prefix: &str| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix))
    };
    let top = list(tmp);
    let mut out: Vec<PathBuf> = top
        .iter()
        .filter(|p| named(p, "agentq-task-"))
        .cloned()
        .collect();
    for d in top.iter().filter(|p| !named(p, "agentq-task-")) {
        out.extend(list(d).into_iter().filter(|p| named(p, "agentq-task-")));
    }
    out
}

/// Worker flags of the working-directory sweep test: no cgroups, 2 s
/// leases.
const SWEEP_ARGS: [&str; 6] = [
    "--cgroup-parent",
    "off",
    "--lease",
    "2s",
    "--shutdown-grace",
    "1s",
];

/// A worker on `tmp` SIGKILLed while it runs a 10-minute sleep: the
/// attempt's working directory it leaves behind.
async fn kill_a_worker_mid_attempt(tq: &TestQueue, how: &WorkerProc, tmp: &Path) -> PathBuf {
    let mut first = Proc(tq.spawn_worker_with(&SWEEP_ARGS, how));
    let spec =
        agentq::queue::job::JobSpec::new("t", "default", "sleep").payload(&json!({"ms": 600_000}));
    tq.queue.enqueue(&spec).await.expect("enqueue");
    let leaked = eventually(
        Duration::from_secs(30),
        "the attempt's working directory",
        || async { task_dirs(tmp).pop() },
    )
    .await;
    first.kill().expect("SIGKILL worker");
    first.wait().expect("reap worker");
    assert!(
        leaked.is_dir(),
        "{} is gone without a sweep; the leak this test covers is gone",
        leaked.display()
    );
    leaked
}

/// The next worker removes the dead worker's attempt directory, and the
/// dead worker's directory around it, at startup.
async fn assert_swept_at_startup(leaked: &Path, tmp: &Path) {
    eventually(
        Duration::from_secs(30),
        &format!("{} removed by the next worker", leaked.display()),
        || async { (!leaked.exists()).then_some(()) },
    )
    .await;
    let dead = leaked.parent().expect("parent").to_path_buf();
    assert_ne!(dead, tmp, "attempt directories are grouped per worker");
    assert!(!dead.exists(), "{} left behind", dead.display());
}

/// The second worker runs the job again once the lease expired, in a
/// directory of its own named after its owner identity (mode 0711), the
/// only thing in `tmp`.
async fn assert_rerun_in_its_own_directory(second: &Proc, tmp: &Path) {
    let me = Owner::of(second.id()).expect("second worker's identity");
    let own = tmp.join(format!("agentq-w-{me}"));
    let running = eventually(
        Duration::from_secs(60),
        "the job running again in the second worker's directory",
        || async { task_dirs(tmp).pop() },
    )
    .await;
    assert_eq!(running.parent(), Some(own.as_path()));
    let names: Vec<_> = std::fs::read_dir(tmp)
        .expect("list tmp")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, vec![own.file_name().expect("name").to_owned()]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&own).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o711, "reachable by task users, not listable");
}

/// A worker SIGKILLed mid-attempt cannot remove the attempt's working
/// directory; the next worker started on the same temp directory does, at
/// startup, without cgroups too, and keeps its own.
#[tokio::test]
async fn working_directories_of_a_killed_worker_are_swept_at_startup() {
    let tq = TestQueue::new("workdir-sweep").await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let how = WorkerProc {
        tmpdir: Some(tmp.path().to_path_buf()),
        ..Default::default()
    };
    let leaked = kill_a_worker_mid_attempt(&tq, &how, tmp.path()).await;
    let mut second = Proc(tq.spawn_worker_with(&SWEEP_ARGS, &how));
    assert_swept_at_startup(&leaked, tmp.path()).await;
    assert_rerun_in_its_own_directory(&second, tmp.path()).await;

    // A clean stop removes the worker's directory.
    sigterm(&second);
    assert_eq!(
        exit_code(&mut second, Duration::from_secs(30)).await,
        Some(0)
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("list tmp")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left in the temp directory: {left:?}");
    tq.cleanup().await;
}

/// The test harness: an agentq process dies with the thread that spawned
/// it (`common::die_with_test`), so a test that fails, or a test process
/// that is aborted, leaves no worker running.
#[tokio::test]
async fn harness_workers_die_with_the_thread_that_spawned_them() {
    let tq = TestQueue::new("harness-deathsig").await;
    let spawner = TestQueue {
        queue: tq.queue.clone(),
        ns: tq.ns.clone(),
    };
    let worker = std::thread::spawn(move || spawner.spawn_worker(&["--cgroup-parent", "off"]))
        .join()
        .expect("spawning thread");
    let mut worker = Proc(worker);
    let status = eventually(
        Duration::from_secs(30),
        "the worker dies with the thread that spawned it",
        || {
            let s = worker.try_wait().expect("try_wait");
            async move { s }
        },
    )
    .await;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    tq.cleanup().await;
}
