//! The worker process is not dumpable (`PR_SET_DUMPABLE` 0), so a task
//! program running as the worker's own uid (no `--task-user`) cannot read
//! the worker's `/proc/<pid>/environ`, where its secrets are
//! (`AGENTQ_DATABASE_URL`, Redis passwords).
//!
//! Tests run as root here, and root reads any process's environ
//! (CAP_SYS_PTRACE), so the worker binary is started as an unprivileged
//! uid (nobody, 65534) and its task programs run as that uid too. A control
//! process of the same uid, dumpable, shows that such a read does succeed
//! on this machine when nothing forbids it: what the test sees is the
//! worker's flag, not a /proc mounted with `hidepid` or a Yama setting.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use agentq::queue::job::JobSpec;
use common::*;
use serde_json::{Value, json};

const NOBODY: u32 = 65534;

/// `peek`: walks up its ancestors (and the pids in its payload's
/// `"others"`) and tries to read each one's /proc/<pid>/environ; reports,
/// per process, its uid and either the text read or the errno.
const PEEK: &str = r#"#!/usr/bin/python3
import json, os, sys
job = json.load(sys.stdin)
others = (job.get("payload") or {}).get("others", [])

def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.split()
    return out

def peek(pid):
    st = status(pid)
    r = {"pid": pid, "ppid": int(st["PPid"][0]), "uid": int(st["Uid"][0]), "name": " ".join(st["Name"])}
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            r["environ"] = f.read().replace(b"\0", b"\n").decode("utf-8", "replace")
        r["ok"] = True
    except OSError as e:
        r["ok"] = False
        r["errno"] = e.errno
        r["error"] = str(e)
    return r

ancestors = []
pid = int(status("self")["PPid"][0])
while pid > 1:
    r = peek(pid)
    ancestors.append(r)
    pid = r["ppid"]
print(json.dumps({"output": {"uid": os.getuid(), "ancestors": ancestors, "others": [peek(p) for p in others]}}))
"#;

/// The owner of `/proc/<pid>/environ`: the process's uid while it is
/// dumpable, root once it is not (the kernel's `task_dump_owner`).
fn environ_owner(pid: u32) -> u32 {
    std::fs::metadata(format!("/proc/{pid}/environ"))
        .expect("stat /proc/<pid>/environ")
        .uid()
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A workers directory nobody can read, with the kind `peek`.
fn peek_kind() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("agentq-dumpable-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    set_mode(dir.path(), 0o755);
    let kind = dir.path().join("peek");
    std::fs::create_dir(&kind).expect("mkdir peek");
    set_mode(&kind, 0o755);
    std::fs::write(
        kind.join("worker.toml"),
        "command = [\"./run\"]\ntimeout = \"30s\"\nenv = []\n",
    )
    .expect("write worker.toml");
    set_mode(&kind.join("worker.toml"), 0o644);
    std::fs::write(kind.join("run"), PEEK).expect("write run");
    set_mode(&kind.join("run"), 0o755);
    dir
}

#[tokio::test]
async fn a_task_of_the_workers_uid_cannot_read_the_workers_environment() {
    assert!(
        Path::new("/usr/bin/python3").exists(),
        "this test's task program needs /usr/bin/python3"
    );
    let tq = TestQueue::new("dumpable").await;
    let kinds = peek_kind();
    let secret = format!("s3cret-{:016x}", rand::random::<u64>());
    let control_marker = format!("control-{:016x}", rand::random::<u64>());

    // The control: a dumpable process of the same uid with a marker in its
    // environment.
    let control = Proc(
        die_with_test(Command::new("sleep").arg("120"))
            .uid(NOBODY)
            .gid(NOBODY)
            .env("AGENTQ_TEST_CONTROL", &control_marker)
            .current_dir("/")
            .spawn()
            .expect("spawn the control process"),
    );

    // The worker, as nobody, with a secret in its environment. Redis over
    // TCP; no ledger (the secret URL is never used); no cgroups (nobody
    // cannot write them; rlimits instead), no metrics port.
    let worker = Proc(
        agentq()
            .arg("worker")
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .args([
                "--no-ledger",
                "--metrics-addr",
                "off",
                "--cgroup-parent",
                "off",
            ])
            .args(["--concurrency", "1", "--queues", "default"])
            .env("AGENTQ_REDIS_URL", tq.queue.config().redis_url.clone())
            .env("AGENTQ_NAMESPACE", &tq.ns)
            .env("AGENTQ_WORKERS_DIR", kinds.path())
            .env(
                "AGENTQ_DATABASE_URL",
                format!("postgres://agentq:{secret}@127.0.0.1:5432/agentq"),
            )
            .env("AGENTQ_LOG", "agentq=warn")
            .env("TMPDIR", "/tmp")
            .current_dir(kinds.path())
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn agentq worker as nobody"),
    );
    let worker_pid = worker.id() as i64;

    let mut spec = JobSpec::new("acme", "default", "peek");
    spec.payload = json!({"others": [control.id()]}).to_string();
    spec.max_attempts = Some(1);
    let id = tq.enqueue(&spec).await;
    let info = job_in_state(&tq, &id, &["succeeded", "dead"]).await;
    assert_eq!(
        info.state, "succeeded",
        "the peek task failed: {:?}",
        info.last_error
    );
    // The job's result is the task's `output`.
    let out = info.result.expect("a result");
    let shown = serde_json::to_string_pretty(&out).expect("json");

    // The control: reading a dumpable same-uid process works here.
    let ctl = &out["others"][0];
    assert_eq!(ctl["uid"], json!(NOBODY), "control: {shown}");
    assert_eq!(ctl["ok"], json!(true), "control read failed: {shown}");
    assert!(
        ctl["environ"]
            .as_str()
            .is_some_and(|e| e.contains(&control_marker)),
        "control environ: {shown}"
    );

    // The worker: same uid as the task, and its environ refused.
    assert_eq!(
        out["uid"],
        json!(NOBODY),
        "the task runs as nobody: {shown}"
    );
    let ancestors = out["ancestors"].as_array().expect("ancestors");
    let w: &Value = ancestors
        .iter()
        .find(|a| a["pid"] == json!(worker_pid))
        .unwrap_or_else(|| {
            panic!("the worker ({worker_pid}) is not among the task's ancestors: {shown}")
        });
    assert_eq!(
        w["uid"],
        json!(NOBODY),
        "the worker runs as nobody: {shown}"
    );
    assert_eq!(
        w["ok"],
        json!(false),
        "the task read the worker's environment: {shown}"
    );
    assert_eq!(
        w["errno"],
        json!(libc::EACCES),
        "reading the worker's environ fails with permission denied: {shown}"
    );
    assert!(
        !out.to_string().contains(&secret),
        "the worker's secret reached the task: {shown}"
    );

    assert_eq!(
        environ_owner(worker.id()),
        0,
        "the worker's /proc files belong to root"
    );
    assert_eq!(
        environ_owner(control.id()),
        NOBODY,
        "the control's /proc files are its own"
    );

    drop(worker);
    drop(control);
    tq.cleanup().await;
    // Kept until the worker is gone.
    drop(kinds);
}

/// `agentq serve` holds the same secrets: also not dumpable. Seen from
/// here as the owner of its /proc files (root, though it runs as nobody).
#[tokio::test]
async fn serve_is_not_dumpable_either() {
    let tq = TestQueue::new("dumpable-serve").await;
    let db = TestDb::new("dumpable_serve").await;
    let port = agentq_servers::free_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    let serve = Proc(
        agentq()
            .args(["serve", "--listen", &addr])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("AGENTQ_REDIS_URL", tq.queue.config().redis_url.clone())
            .env("AGENTQ_NAMESPACE", &tq.ns)
            .env("AGENTQ_DATABASE_URL", db.url())
            .env("AGENTQ_LOG", "agentq=warn")
            .current_dir("/")
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn agentq serve as nobody"),
    );
    eventually(
        std::time::Duration::from_secs(60),
        "agentq serve listens",
        || async { agentq_servers::listening(&addr).then_some(()) },
    )
    .await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", serve.id())).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("65534")),
        "serve runs as nobody: {status}"
    );
    assert_eq!(
        environ_owner(serve.id()),
        0,
        "serve's /proc files belong to root"
    );
    drop(serve);
    db.cleanup().await;
    tq.cleanup().await;
}
