//! Integration tests for the executor: real processes, the real `workers/`
//! directory, and ad-hoc task kinds written into temporary directories.
//!
//! Timing assertions only have generous upper bounds so that a slow or busy
//! machine does not make them flaky.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentq::executor::*;
use common::wait_dead;
use serde_json::json;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

fn registry() -> Registry {
    Registry::load(&common::workers_dir()).expect("workers/ loads")
}

fn input(kind: &str, payload: serde_json::Value) -> TaskInput {
    TaskInput {
        id: "job-1".into(),
        tenant: "acme".into(),
        queue: "default".into(),
        kind: kind.into(),
        attempt: 1,
        payload: RawValue::from_string(payload.to_string()).unwrap(),
    }
}

fn caps(timeout: Duration, memory: Option<u64>) -> Caps {
    Caps {
        timeout,
        memory,
        kill_grace: Duration::from_secs(1),
    }
}

async fn run_kind(kind: &str, payload: serde_json::Value, lim: &Caps) -> Report {
    let reg = registry();
    let m = reg
        .get(kind)
        .unwrap_or_else(|| panic!("kind {kind} exists"));
    run_process(m, &input(kind, payload), lim, CancellationToken::new()).await
}

/// Writes `tmp/<kind>/worker.toml` (and `run` when a script is given) and
/// returns the parsed manifest.
fn adhoc(tmp: &Path, kind: &str, toml: &str, script: Option<&str>) -> Manifest {
    let dir = tmp.join(kind);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("worker.toml"), toml).unwrap();
    if let Some(script) = script {
        let run = dir.join("run");
        std::fs::write(&run, script).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    parse_manifest(kind, &dir, toml).unwrap()
}

async fn run_adhoc(
    toml: &str,
    script: Option<&str>,
    payload: serde_json::Value,
    lim: &Caps,
) -> Report {
    let tmp = tempfile::tempdir().unwrap();
    let m = adhoc(tmp.path(), "adhoc", toml, script);
    run_process(&m, &input("adhoc", payload), lim, CancellationToken::new()).await
}

/// Runs `script` as an ad-hoc task program (`command = ["./run"]`) with an
/// empty payload, under a 30 s timeout and no memory cap.
async fn run_script(script: &str) -> Report {
    run_adhoc(
        "command = [\"./run\"]",
        Some(script),
        json!({}),
        &caps(Duration::from_secs(30), None),
    )
    .await
}

/// Runs `command` (a manifest's `command = [...]`, no script) as an ad-hoc
/// task program with an empty payload, under a 30 s timeout and no memory
/// cap.
async fn run_command(command: &str) -> Report {
    run_adhoc(
        command,
        None,
        json!({}),
        &caps(Duration::from_secs(30), None),
    )
    .await
}

/// Runs handler `h` on a job of `kind` with `payload`, never cancelled.
async fn handle(
    h: &Arc<dyn Handler>,
    kind: &str,
    payload: serde_json::Value,
    lim: &Caps,
) -> Report {
    run_handler(&**h, input(kind, payload), lim, CancellationToken::new()).await
}

#[tokio::test]
async fn echo_round_trips_the_job() {
    let payload = json!({"a": [1, 2, {"b": null}], "s": "x y\nz \"q\"", "n": 12345678901234567u64});
    let r = run_kind(
        "echo",
        payload.clone(),
        &caps(Duration::from_secs(30), Some(256 * MIB)),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert!(!r.permanent);
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.signal, None);
    assert_eq!(r.error, None);
    assert_eq!(
        r.output,
        Some(json!({
            "id": "job-1", "tenant": "acme", "queue": "default", "kind": "echo",
            "attempt": 1, "payload": payload
        }))
    );
    assert_eq!(r.usage, TaskUsage::default());
}

#[tokio::test]
async fn payload_whitespace_is_compacted_to_one_line() {
    let reg = registry();
    let mut i = input("echo", json!(null));
    i.payload = RawValue::from_string("{\n  \"k\" : [1,\n 2]\n}".into()).unwrap();
    let r = run_process(
        reg.get("echo").unwrap(),
        &i,
        &caps(Duration::from_secs(30), None),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert_eq!(r.output.unwrap()["payload"], json!({"k": [1, 2]}));
}

#[tokio::test]
async fn exit_65_is_permanent() {
    let r = run_kind(
        "fail",
        json!({"code": 65, "message": "bad input: no such customer"}),
        &caps(Duration::from_secs(30), None),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert!(r.permanent);
    assert!(!r.retryable());
    assert_eq!(r.exit_code, Some(65));
    let e = r.error.unwrap();
    assert!(e.contains("exit code 65"), "{e}");
    assert!(e.contains("bad input: no such customer"), "{e}");
}

#[tokio::test]
async fn other_exit_codes_are_retryable() {
    let r = run_kind(
        "fail",
        json!({"code": 3, "message": "upstream 503"}),
        &caps(Duration::from_secs(30), Some(256 * MIB)),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert!(!r.permanent);
    assert!(r.retryable());
    assert_eq!(r.exit_code, Some(3));
    let e = r.error.unwrap();
    assert!(e.starts_with("task program exited with code 3"), "{e}");
    assert!(e.contains("upstream 503"), "{e}");
}

#[tokio::test]
async fn garbage_result_line_is_a_clear_failure() {
    let r = run_script("#!/bin/sh\necho '{\"output\": 1}'\necho 'hello, not json'\n").await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert!(!r.permanent);
    assert_eq!(r.exit_code, Some(0));
    let e = r.error.unwrap();
    assert!(
        e.starts_with("task program printed a result that is not a JSON object: hello, not json"),
        "{e}"
    );
}

#[tokio::test]
async fn negative_usage_is_garbage() {
    let r = run_script("#!/bin/sh\necho '{\"usage\": {\"api_calls\": -2}}'\n").await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert!(r.error.unwrap().contains("usage.api_calls"));
}

#[tokio::test]
async fn empty_stdout_is_success_without_output() {
    let r = run_script("#!/bin/sh\nexit 0\n").await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert_eq!(r.output, None);
}

#[tokio::test]
async fn reported_usage_is_kept() {
    let r = run_kind(
        "agent-sim",
        json!({"mean_ms": 20, "seed": 7}),
        &caps(Duration::from_secs(30), Some(256 * MIB)),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert!(r.usage.api_calls >= 1);
    assert!(r.usage.input_tokens > 0 && r.usage.output_tokens > 0);
    assert!(r.output.unwrap()["answer"].is_string());
}

#[tokio::test]
async fn program_that_never_reads_stdin_gets_a_large_payload() {
    let blob = "x".repeat(200 * 1024);
    // One program ignores stdin, one closes it right away.
    for script in [
        "#!/bin/sh\necho '{\"output\": \"ignored\"}'\n",
        "#!/bin/sh\nexec 0<&-\necho '{\"output\": \"ignored\"}'\n",
    ] {
        let r = run_adhoc(
            "command = [\"./run\"]",
            Some(script),
            json!({"blob": blob}),
            &caps(Duration::from_secs(30), None),
        )
        .await;
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(r.output, Some(json!("ignored")));
    }
}

#[tokio::test]
async fn large_stdout_keeps_the_last_line() {
    let r = run_adhoc(
        "command = [\"./run\"]\nenv = [\"PATH\"]",
        Some("#!/bin/sh\nhead -c 5000000 /dev/zero | tr '\\0' 'x'\necho\necho '{\"output\": \"end\"}'\n"),
        json!({}),
        &caps(Duration::from_secs(30), None),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert_eq!(r.output, Some(json!("end")));
}

#[tokio::test]
async fn timeout_kills_the_group() {
    let timeout = Duration::from_secs(1);
    let started = Instant::now();
    let r = run_kind("sleep", json!({"ms": 60000}), &caps(timeout, None)).await;
    let took = started.elapsed();
    assert_eq!(r.outcome, Outcome::TimedOut, "{r:?}");
    assert!(!r.permanent);
    assert_eq!(r.error_summary(), Some("timed out after 1s"));
    assert!(r.wall_ms >= 1000, "{}", r.wall_ms);
    assert!(took < timeout + Duration::from_secs(10), "{took:?}");
    assert_eq!(r.signal, Some(libc::SIGTERM));
}

#[tokio::test]
async fn sigterm_ignored_gets_sigkill_after_grace() {
    let lim = Caps {
        timeout: Duration::from_millis(500),
        memory: None,
        kill_grace: Duration::from_millis(700),
    };
    let started = Instant::now();
    let r = run_adhoc(
        "command = [\"./run\"]\nenv = [\"PATH\"]",
        Some("#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.1; done\n"),
        json!({}),
        &lim,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(r.outcome, Outcome::TimedOut, "{r:?}");
    assert_eq!(r.signal, Some(libc::SIGKILL));
    assert!(r.wall_ms >= 1200, "{}", r.wall_ms);
    assert!(took < Duration::from_secs(12), "{took:?}");
}

#[tokio::test]
async fn memory_cap_is_reported_as_memory_exceeded() {
    let r = run_kind(
        "memhog",
        json!({"mib": 300}),
        &caps(Duration::from_secs(60), Some(64 * MIB)),
    )
    .await;
    assert_eq!(r.outcome, Outcome::MemoryExceeded, "{r:?}");
    assert!(!r.permanent);
    let e = r.error.unwrap();
    assert!(e.starts_with("memory cap 64MiB exceeded"), "{e}");
    match agentq::executor::sandbox::current().mode() {
        // The cgroup caps the attempt as a whole: the kernel's OOM killer
        // stops it and the cgroup counts the kill; its peak has no floor.
        agentq::executor::sandbox::Mode::Cgroup(_) => {
            assert!(e.contains("OOM killer"), "{e}");
            assert!(r.peak_rss_bytes <= 64 * MIB, "{}", r.peak_rss_bytes);
        }
        // RLIMIT_DATA: the allocation fails inside the program. No upper
        // bound on peak_rss_bytes here: Linux carries the spawning process's
        // RSS high-water mark across fork+exec into ru_maxrss (README,
        // "Design notes"), so the figure depends on this test binary's size.
        agentq::executor::sandbox::Mode::Rlimit => assert!(e.contains("MemoryError"), "{e}"),
    }
}

#[tokio::test]
async fn memory_within_cap_succeeds_and_peak_rss_is_measured() {
    // In rlimit mode only a peak above this process's own memory is
    // measured (Report::peak_rss_bytes), so the hog is well above this test
    // binary (which may hold 90 MiB of symbols after a test's panic printed
    // a backtrace) and waits for the test that inflates it further.
    let _calm = WORKER_RSS.read().await;
    let r = run_kind(
        "memhog",
        json!({"mib": 160}),
        &caps(Duration::from_secs(60), Some(256 * MIB)),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert_eq!(r.output, Some(json!({"mib": 160})));
    assert!(r.peak_rss_bytes >= 160 * MIB, "{}", r.peak_rss_bytes);
    assert!(r.peak_rss_bytes < 256 * MIB, "{}", r.peak_rss_bytes);
}

#[tokio::test]
async fn grandchild_that_outlives_the_parent_is_killed() {
    let started = Instant::now();
    let r = run_command(
        r#"command = ['/bin/sh', '-c', '/bin/sleep 60 & printf "{\"output\": %s}\n" $!']"#,
    )
    .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    let pid = r
        .output
        .as_ref()
        .and_then(|o| o.as_i64())
        .expect("pid output") as i32;
    assert!(
        wait_dead(pid, Duration::from_secs(5)).await,
        "grandchild {pid} still running"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn environment_is_clean() {
    // No variables at all: /usr/bin/env prints nothing -> empty result.
    let r = run_command("command = [\"/usr/bin/env\"]\nenv = []").await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert_eq!(r.output, None);

    // Only the listed variables that are set in the worker are passed.
    let r = run_command("command = [\"/usr/bin/python3\", \"-c\", \"import os, json; print(json.dumps({'output': sorted(os.environ)}))\"]\nenv = [\"PATH\", \"AGENTQ_SURELY_UNSET_VAR\"]").await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    let names: Vec<String> = serde_json::from_value(r.output.unwrap()).unwrap();
    assert!(names.contains(&"PATH".to_string()), "{names:?}");
    assert!(!names.contains(&"HOME".to_string()), "{names:?}");
    assert!(
        !names.contains(&"AGENTQ_SURELY_UNSET_VAR".to_string()),
        "{names:?}"
    );
    // python may add LC_CTYPE on its own; nothing else from the worker.
    assert!(
        names.iter().all(|n| n == "PATH" || n == "LC_CTYPE"),
        "{names:?}"
    );
}

#[tokio::test]
async fn working_directory_is_fresh_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let m = adhoc(
        tmp.path(),
        "pwd",
        "command = [\"./run\"]\nenv = [\"PATH\"]",
        Some(
            "#!/bin/sh\nn=$(ls -A | wc -l)\necho data > scratch.txt\nprintf '{\"output\":{\"pwd\":\"%s\",\"entries\":%s}}\\n' \"$(pwd)\" \"$n\"\n",
        ),
    );
    let mut dirs = Vec::new();
    for _ in 0..2 {
        let r = run_process(
            &m,
            &input("pwd", json!({})),
            &caps(Duration::from_secs(30), None),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        let out = r.output.unwrap();
        assert_eq!(out["entries"], json!(0));
        let pwd = PathBuf::from(out["pwd"].as_str().unwrap());
        assert_ne!(pwd, m.dir);
        assert!(!pwd.exists(), "{} was not removed", pwd.display());
        dirs.push(pwd);
    }
    assert_ne!(dirs[0], dirs[1]);
}

#[tokio::test]
async fn no_descriptors_are_inherited() {
    // A pipe without O_CLOEXEC in the worker must not reach the child.
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let r = run_command("command = [\"/usr/bin/python3\", \"-c\", \"import os, json; print(json.dumps({'output': sorted(int(f) for f in os.listdir('/proc/self/fd'))}))\"]").await;
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    let open: Vec<i32> = serde_json::from_value(r.output.unwrap()).unwrap();
    assert!(
        !open.contains(&fds[0]) && !open.contains(&fds[1]),
        "{open:?}"
    );
    // 0, 1, 2 and the directory listing itself.
    assert!(open.len() <= 4, "{open:?}");
}

#[tokio::test]
async fn missing_program_is_a_permanent_failure_naming_it() {
    let r = run_command("command = [\"./does-not-exist\"]").await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert!(r.permanent);
    let e = r.error.unwrap();
    assert!(e.contains("does-not-exist"), "{e}");
    assert!(e.contains("No such file"), "{e}");

    let r = run_command("command = [\"agentq-no-such-program\"]").await;
    assert!(r.permanent);
    assert!(r.error.unwrap().contains("agentq-no-such-program"));

    // Present but not executable.
    let tmp = tempfile::tempdir().unwrap();
    let m = adhoc(
        tmp.path(),
        "noexec",
        "command = [\"./run\"]",
        Some("#!/bin/sh\n"),
    );
    std::fs::set_permissions(m.dir.join("run"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = run_process(
        &m,
        &input("noexec", json!({})),
        &caps(Duration::from_secs(30), None),
        CancellationToken::new(),
    )
    .await;
    assert!(r.permanent, "{r:?}");
    assert!(r.error.unwrap().contains("Permission denied"));
}

#[tokio::test]
async fn cancel_interrupts_quickly() {
    let reg = registry();
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.cancel();
    });
    let started = Instant::now();
    let r = run_process(
        reg.get("sleep").unwrap(),
        &input("sleep", json!({"ms": 60000})),
        &caps(Duration::from_secs(60), None),
        cancel,
    )
    .await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert!(!r.permanent);
    assert_eq!(
        r.error.as_deref(),
        Some("interrupted: worker shutting down")
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // Already cancelled: nothing is started.
    let cancel = CancellationToken::new();
    cancel.cancel();
    let r = run_process(
        reg.get("sleep").unwrap(),
        &input("sleep", json!({"ms": 60000})),
        &caps(Duration::from_secs(60), None),
        cancel,
    )
    .await;
    assert_eq!(
        r.error.as_deref(),
        Some("interrupted: worker shutting down")
    );
}

#[tokio::test]
async fn dropping_the_future_kills_the_group() {
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("pid");
    let m = adhoc(
        tmp.path(),
        "drop",
        &format!(
            "command = [\"/bin/sh\", \"-c\", \"echo $$ > {}; exec /bin/sleep 60\"]",
            pidfile.display()
        ),
        None,
    );
    let lim = caps(Duration::from_secs(60), None);
    let i = input("drop", json!({}));
    let fut = run_process(&m, &i, &lim, CancellationToken::new());
    let r = tokio::time::timeout(Duration::from_millis(500), fut).await;
    assert!(r.is_err(), "should still be running");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_dead(pid, Duration::from_secs(5)).await,
        "{pid} still running"
    );
}

#[tokio::test]
async fn cpu_time_is_measured() {
    let r = run_adhoc(
        "command = [\"./run\"]",
        Some("#!/bin/sh\ni=0\nwhile [ $i -lt 300000 ]; do i=$((i+1)); done\necho '{\"output\": \"done\"}'\n"),
        json!({}),
        &caps(Duration::from_secs(60), None),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert!(r.cpu_user_ms + r.cpu_sys_ms > 0, "{r:?}");
    assert!(r.wall_ms > 0);
    // In rlimit mode a shell's peak is below this process's RSS: unknown, 0.
    if matches!(sandbox::current().mode(), sandbox::Mode::Cgroup(_)) {
        assert!(r.peak_rss_bytes > 0);
    }
}

#[tokio::test]
async fn signal_death_is_retryable() {
    let r = run_command("command = [\"/bin/sh\", \"-c\", \"kill -SEGV $$\"]").await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert!(!r.permanent);
    assert_eq!(r.signal, Some(libc::SIGSEGV));
    assert!(r.error.unwrap().contains("SIGSEGV"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_attempts_do_not_interfere() {
    let reg = registry();
    let m = reg.get("sleep").unwrap().clone();
    let lim = caps(Duration::from_secs(30), None);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8u64 {
        let (m, lim) = (m.clone(), lim.clone());
        set.spawn(async move {
            let r = run_process(
                &m,
                &input("sleep", json!({"ms": 50 * i})),
                &lim,
                CancellationToken::new(),
            )
            .await;
            (i, r)
        });
    }
    while let Some(res) = set.join_next().await {
        let (i, r) = res.unwrap();
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(r.output, Some(json!({"slept_ms": 50 * i})));
    }
}

// ---- in-process handlers ----

#[tokio::test]
async fn handler_noop_succeeds() {
    let hs = Handlers::with_builtins();
    let h = hs.get("noop").unwrap();
    let r = handle(&h, "noop", json!({}), &caps(Duration::from_secs(5), None)).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert_eq!(r.output, None);
    assert_eq!(r.error, None);
}

#[tokio::test]
async fn handler_timeout() {
    let h = handler_fn(|_i| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(HandlerOutput::default())
    });
    let started = Instant::now();
    let r = handle(
        &h,
        "slow",
        json!({}),
        &caps(Duration::from_millis(200), None),
    )
    .await;
    assert_eq!(r.outcome, Outcome::TimedOut, "{r:?}");
    assert_eq!(r.error.as_deref(), Some("timed out after 200ms"));
    assert!(r.wall_ms >= 200);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn handler_panic_is_caught() {
    let h = handler_fn(|_i| async {
        if true {
            panic!("boom");
        }
        Ok(HandlerOutput::default())
    });
    let r = handle(&h, "panics", json!({}), &caps(Duration::from_secs(5), None)).await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert!(!r.permanent);
    assert_eq!(r.error.as_deref(), Some("handler panicked: boom"));
}

#[tokio::test]
async fn handler_output_errors_and_cancel() {
    let mut hs = Handlers::new();
    hs.register(
        "double",
        handler_fn(|i: TaskInput| async move {
            let v: serde_json::Value = serde_json::from_str(i.payload.get())
                .map_err(|e| HandlerError::permanent(e.to_string()))?;
            let n = v["n"]
                .as_u64()
                .ok_or_else(|| HandlerError::permanent("n missing"))?;
            Ok(HandlerOutput {
                output: Some(json!(n * 2)),
                usage: TaskUsage {
                    api_calls: 1,
                    ..Default::default()
                },
            })
        }),
    );
    let h = hs.get("double").unwrap();
    let lim = caps(Duration::from_secs(5), None);
    let r = handle(&h, "double", json!({"n": 21}), &lim).await;
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert_eq!(r.output, Some(json!(42)));
    assert_eq!(r.usage.api_calls, 1);
    let r = handle(&h, "double", json!({}), &lim).await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert!(r.permanent);
    assert_eq!(r.error.as_deref(), Some("n missing"));

    let slow = handler_fn(|_i| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(HandlerOutput::default())
    });
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.cancel();
    });
    let r = run_handler(&*slow, input("slow", json!({})), &lim, cancel).await;
    assert_eq!(
        r.error.as_deref(),
        Some("interrupted: worker shutting down")
    );
    assert!(!r.permanent);
}

// ---- text from task programs and handlers is stored clean ----

/// What a careless or hostile program may write: a NUL byte, invalid UTF-8
/// and a terminal escape sequence, between readable words.
const DIRTY: &str = r"before\x00mid\xff\xfe \x1b[31mred\x1b[0m after";

/// A Python task program that writes [`DIRTY`] to stdout and stderr, then
/// exits with `code`.
fn dirty_program(code: i32) -> String {
    format!(
        "#!/usr/bin/python3\nimport sys\nd = b\"{DIRTY}\\n\"\nsys.stdout.buffer.write(d)\nsys.stderr.buffer.write(d)\nsys.exit({code})\n"
    )
}

/// Panics unless `e` is storable text: no NUL, no escape, no control
/// character but newline and tab, at most [`ERROR_MAX`] bytes.
fn assert_clean(e: &str) {
    assert!(!e.contains('\0'), "NUL in {e:?}");
    assert!(!e.contains('\x1b'), "escape in {e:?}");
    assert!(
        e.chars().all(|c| c == '\n' || c == '\t' || !c.is_control()),
        "control character in {e:?}"
    );
    assert!(e.len() <= ERROR_MAX, "{} bytes", e.len());
}

#[tokio::test]
async fn dirty_stderr_becomes_clean_error_text() {
    let script = dirty_program(1);
    let r = run_script(&script).await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert_eq!(r.exit_code, Some(1));
    let e = r.error.unwrap();
    assert_clean(&e);
    assert!(e.starts_with("task program exited with code 1\n"), "{e:?}");
    for part in ["before", "mid", "[31mred", "after"] {
        assert!(e.contains(part), "{part:?} missing from {e:?}");
    }
}

#[tokio::test]
async fn dirty_result_line_becomes_clean_error_text() {
    let script = dirty_program(0);
    let r = run_script(&script).await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert_eq!(r.exit_code, Some(0));
    let e = r.error.unwrap();
    assert_clean(&e);
    let summary = e.lines().next().unwrap();
    assert!(
        summary.starts_with("task program printed a result that is not a JSON object: before"),
        "{e:?}"
    );
    for part in ["mid", "[31mred", "after"] {
        assert!(summary.contains(part), "{part:?} missing from {summary:?}");
    }
}

#[tokio::test]
async fn dirty_handler_errors_become_clean_error_text() {
    let lim = caps(Duration::from_secs(5), None);
    let dirty = "bad\0input \u{1b}[2J\u{7} here\r\n";
    let h = handler_fn(move |_i| async move { Err(HandlerError::permanent(dirty)) });
    let r = handle(&h, "dirty", json!({}), &lim).await;
    let e = r.error.unwrap();
    assert_clean(&e);
    assert!(
        e.starts_with("bad") && e.contains("input") && e.contains("here"),
        "{e:?}"
    );
    assert!(r.permanent);

    let huge = handler_fn(|_i| async { Err(HandlerError::retryable("x\0".repeat(1 << 20))) });
    let r = handle(&huge, "huge", json!({}), &lim).await;
    assert_clean(&r.error.unwrap());

    let panics = handler_fn(|_i| async {
        if true {
            panic!("boom\0\u{1b}[31m red");
        }
        Ok(HandlerOutput::default())
    });
    let r = handle(&panics, "panics", json!({}), &lim).await;
    let e = r.error.unwrap();
    assert_clean(&e);
    assert!(
        e.starts_with("handler panicked: boom") && e.ends_with("red"),
        "{e:?}"
    );
}

// ---- rlimit mode: the worker's own memory is not the task's ----

/// Taken for writing by the test that inflates this process's RSS, for
/// reading by tests whose rlimit-mode peak must stay above it.
static WORKER_RSS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Resident memory of this test process, in bytes.
fn own_rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// wait4's ru_maxrss keeps the RSS the forked child had before exec, which
/// is the worker's. A worker bigger than a job's memory cap must not make
/// every failure of that job look like a memory failure.
#[tokio::test]
async fn a_big_worker_does_not_make_failures_memory_failures_in_rlimit_mode() {
    let _inflating = WORKER_RSS.write().await;
    let sb = Sandbox::rlimit_only();
    assert_eq!(sb.mode(), sandbox::Mode::Rlimit);
    // This process plays a worker holding 96 MiB, three times the cap.
    let ballast = vec![1u8; 96 << 20];
    assert!(own_rss() >= 96 * MIB, "ballast is resident: {}", own_rss());
    let tmp = tempfile::tempdir().unwrap();
    let m = adhoc(
        tmp.path(),
        "exit3",
        "command = [\"/bin/sh\", \"-c\", \"exit 3\"]",
        None,
    );
    let cap = caps(Duration::from_secs(30), Some(32 * MIB));
    let r = run_process_in(
        &sb,
        &m,
        &input("exit3", json!({})),
        &cap,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.error_summary(), Some("task program exited with code 3"));
    assert!(
        r.peak_rss_bytes < 32 * MIB,
        "the worker's memory reported as the task's: {}",
        r.peak_rss_bytes
    );

    // A real memory hog under the same worker is still caught...
    let reg = registry();
    let r = run_process_in(
        &sb,
        reg.get("memhog").unwrap(),
        &input("memhog", json!({"mib": 300})),
        &caps(Duration::from_secs(60), Some(64 * MIB)),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::MemoryExceeded, "{r:?}");
    // ...and a peak well above the worker's own memory is the task's, and
    // reported.
    let r = run_process_in(
        &sb,
        reg.get("memhog").unwrap(),
        &input("memhog", json!({"mib": 320})),
        &caps(Duration::from_secs(60), Some(512 * MIB)),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert!(r.peak_rss_bytes >= 320 * MIB, "{}", r.peak_rss_bytes);
    assert!(r.peak_rss_bytes < 480 * MIB, "{}", r.peak_rss_bytes);
    std::hint::black_box(&ballast);
}
