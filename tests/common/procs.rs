//! `agentq` processes started by the tests: the binary, spawning that dies
//! with the test ([`die_with_test`], `PR_SET_PDEATHSIG`), worker processes
//! on a test's namespace ([`WorkerProc`]), the CLI, children held in a
//! [`Proc`] (SIGKILL and reap when dropped), signals, exit codes, stderr
//! collected by a [`LogTail`], skewed clocks, lease guards, and plain HTTP
//! GETs to their endpoints.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::queue::{TestQueue, eventually};

/// The repository's workers directory.
pub fn workers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workers")
}

/// The agentq binary built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_agentq")
}

/// Makes the process `cmd` starts get SIGKILL when the thread that spawns
/// it exits (`PR_SET_PDEATHSIG`), so a test that fails, or a test process
/// that is aborted or killed, takes its agentq processes along (one was
/// found alive 27 minutes after a failed run, its binary already deleted).
///
/// The signal fires when the spawning *thread* exits, not the process. So
/// spawn from the test's own thread (a `#[tokio::test]` body, or tasks of a
/// current-thread runtime) or from tasks of the test's multi-thread runtime
/// (its worker threads live as long as the test); never from
/// `spawn_blocking`, `block_in_place` or a short-lived `std::thread`, whose
/// exit would kill the child in the middle of the test.
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    // SAFETY: plain syscall, before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the hook only makes async-signal-safe calls (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The test process died before prctl: no signal will come.
            if libc::getppid() != parent {
                libc::_exit(137);
            }
            Ok(())
        })
    }
}

/// `agentq` (the binary under test) that dies with the test (see
/// [`die_with_test`]); hold what it spawns in a [`Proc`].
pub fn agentq() -> Command {
    let mut cmd = Command::new(bin());
    die_with_test(&mut cmd);
    cmd
}

impl TestQueue {
    /// A worker process on this namespace; `args` are extra flags. It dies
    /// with the spawning thread ([`die_with_test`]); hold it in a [`Proc`].
    pub fn spawn_worker(&self, args: &[&str]) -> Child {
        agentq()
            .arg("worker")
            .arg("--no-ledger") // these tests read the outbox; ledger tests give their own schema
            .args(if args.contains(&"--metrics-addr") {
                &[][..]
            } else {
                &["--metrics-addr", "off"][..]
            })
            .args(args)
            .env("AGENTQ_REDIS_URL", self.queue.config().redis_url.clone())
            .env("AGENTQ_NAMESPACE", &self.ns)
            .env("AGENTQ_WORKERS_DIR", workers_dir())
            .env("AGENTQ_LOG", "agentq=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn agentq worker")
    }

    /// Run the CLI on this namespace; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        run_to_end(
            agentq()
                .args(args)
                .env("AGENTQ_REDIS_URL", self.queue.config().redis_url.clone())
                .env("AGENTQ_NAMESPACE", &self.ns)
                .env("AGENTQ_LOG", "off"),
        )
    }
}

/// Run `cmd` (an `agentq` command line) to its end with no stdin; returns
/// (exit code, or -1 if killed by a signal; stdout; stderr).
pub fn run_to_end(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("run agentq");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// How to start a worker process beyond [`TestQueue::spawn_worker`]'s defaults.
#[derive(Clone, Debug, Default)]
pub struct WorkerProc {
    /// Write the ledger to this PostgreSQL URL (None: `--no-ledger`).
    pub database_url: Option<String>,
    /// Extra environment, e.g. [`skewed_clock_env`].
    pub env: Vec<(String, String)>,
    /// Pipe stderr (read it with [`LogTail`]) instead of inheriting it.
    pub capture_stderr: bool,
    /// `AGENTQ_LOG` (default `agentq=warn`).
    pub log: Option<String>,
    /// `TMPDIR`: where the worker makes attempt working directories (a
    /// [`WorkerTmp`](super::WorkerTmp), to count what is left behind).
    pub tmpdir: Option<PathBuf>,
}

impl TestQueue {
    /// A worker process on this namespace, started as `how` says. It dies
    /// with the spawning thread ([`die_with_test`]); hold it in a [`Proc`].
    pub fn spawn_worker_with(&self, args: &[&str], how: &WorkerProc) -> Child {
        let mut cmd = agentq();
        cmd.arg("worker");
        if let Some(dir) = &how.tmpdir {
            cmd.env("TMPDIR", dir);
        }
        match &how.database_url {
            Some(url) => cmd.env("AGENTQ_DATABASE_URL", url),
            None => cmd.arg("--no-ledger"),
        };
        if !args.contains(&"--metrics-addr") {
            cmd.args(["--metrics-addr", "off"]);
        }
        cmd.args(args)
            .env("AGENTQ_REDIS_URL", self.queue.config().redis_url.clone())
            .env("AGENTQ_NAMESPACE", &self.ns)
            .env("AGENTQ_WORKERS_DIR", workers_dir())
            .env("AGENTQ_LOG", how.log.as_deref().unwrap_or("agentq=warn"))
            .envs(how.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(if how.capture_stderr {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        cmd.spawn().expect("spawn agentq worker")
    }
}

/// SIGKILL a child process and reap it.
pub fn kill9(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Send SIGTERM to a child process.
pub fn sigterm(c: &Child) {
    let pid = libc::pid_t::try_from(c.id()).expect("pid");
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// A child process that is SIGKILLed and reaped when dropped, so a failing
/// test leaves no worker behind (an orphan holding the test's stderr would
/// also keep `cargo test` waiting for it).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        kill9(&mut self.0);
    }
}

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// True when `pid` no longer runs (gone, or a zombie waiting for its
/// parent or init).
pub fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
    }
}

/// Wait (up to `limit`) until `pid` no longer runs; whether it stopped.
pub async fn wait_dead(pid: i32, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if is_dead(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Wait (up to `limit`) for a child to exit; its exit code.
pub async fn exit_code(c: &mut Child, limit: Duration) -> Option<i32> {
    let status = eventually(limit, "process exits", || {
        let s = c.try_wait().expect("try_wait");
        async move { s }
    })
    .await;
    status.code()
}

/// `GET path` on 127.0.0.1:port; returns (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// libfaketime's multi-threaded preload library, if installed.
pub fn faketime_lib() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Environment that runs a process with its wall clock shifted by `offset`
/// (libfaketime syntax, e.g. "+1h", "-1h"). The monotonic clock is left
/// alone: only the wall clock is skewed, as on a host with a wrong clock.
pub fn skewed_clock_env(offset: &str) -> Vec<(String, String)> {
    let lib = faketime_lib().expect(
        "libfaketime is not installed: apt-get install faketime libfaketime (.ci/run does)",
    );
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
    ]
}

/// The lines a child writes to stderr, collected by a thread.
#[derive(Clone, Default)]
pub struct LogTail(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl LogTail {
    /// Start collecting the child's piped stderr.
    pub fn follow(c: &mut Child) -> LogTail {
        use std::io::BufRead;
        let tail = LogTail::default();
        let err = c.stderr.take().expect("stderr piped");
        let lines = tail.0.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        tail
    }
    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The lease guard process (`agentq __lease-guard`) a worker started.
pub fn lease_guard_of(worker: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (ppid == worker && String::from_utf8_lossy(&cmdline).contains("__lease-guard"))
            .then_some(pid)
    })
}

/// Live (not zombie) direct children of `parent` that run a task program:
/// not the lease guard, nor a fork of the worker that has not exec'd yet.
pub fn task_leaders(parent: u32) -> Vec<u32> {
    let agentq = std::fs::canonicalize(bin()).unwrap_or_default();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next(), f.next().and_then(|p| p.parse::<u32>().ok()));
        if ppid != Some(parent) || state == Some("Z") {
            continue;
        }
        // A binary rebuilt while the test runs reads "<path> (deleted)".
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let exe = std::path::PathBuf::from(
            exe.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string(),
        );
        if exe != agentq {
            out.push(pid);
        }
    }
    out
}
