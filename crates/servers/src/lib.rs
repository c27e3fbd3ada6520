//! Finding Redis and PostgreSQL, or starting private ones, for `agentq demo`
//! and the tests.
//!
//! A private server runs from the installed binaries in a temporary directory
//! on a free loopback port, and is stopped when its handle drops.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors finding or starting a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The server binary is not installed.
    #[error("{binary} not found on PATH: install it (Debian/Ubuntu: apt-get install {package})")]
    Missing {
        /// Binary name.
        binary: String,
        /// Package to install.
        package: String,
    },
    /// It started but never answered.
    #[error("{0}")]
    Start(String),
    /// Filesystem or process error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Find the program `name` on PATH (the `which` crate, as agentq's
/// executor uses).
pub fn which(name: &str) -> Option<PathBuf> {
    which::which(name).ok()
}

/// A free TCP port on 127.0.0.1 (racy by nature; good enough for tests).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// True if something accepts TCP connections on `addr`.
pub fn listening(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| {
            std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok()
        })
}

/// A `redis-server` this process started.
#[derive(Debug)]
pub struct PrivateRedis {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Port it listens on (127.0.0.1).
    pub port: u16,
    args: Vec<String>,
}

impl PrivateRedis {
    /// Start `redis-server` on a free port with `extra` arguments (for example
    /// `["--appendonly", "yes"]`), and wait until it answers.
    pub fn start(extra: &[&str]) -> Result<PrivateRedis, ServerError> {
        Self::start_on(free_port()?, extra)
    }

    /// Start `redis-server` on `port` with `extra` arguments.
    fn start_on(port: u16, extra: &[&str]) -> Result<PrivateRedis, ServerError> {
        let dir = tempfile::Builder::new().prefix("agentq-redis-").tempdir()?;
        let mut r = PrivateRedis {
            child: None,
            dir,
            port,
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart()?;
        Ok(r)
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its data directory (AOF and RDB files live here).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Start it again (same port, same directory) after [`kill`](Self::kill).
    pub fn restart(&mut self) -> Result<(), ServerError> {
        let bin = which("redis-server").ok_or_else(|| ServerError::Missing {
            binary: "redis-server".into(),
            package: "redis-server".into(),
        })?;
        let mut cmd = Command::new(bin);
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(self.dir.path())
        .args(&self.args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        self.child = Some(cmd.spawn()?);
        let addr = format!("127.0.0.1:{}", self.port);
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if listening(&addr) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(ServerError::Start(format!(
            "redis-server on port {} did not answer within 10s",
            self.port
        )))
    }

    /// SIGKILL it (no shutdown save), and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster this process started: `masters` primaries without
/// replicas, each a [`PrivateRedis`] on loopback with its own directory and
/// cluster bus port. Stopped when the handle drops.
#[derive(Debug)]
pub struct PrivateRedisCluster {
    nodes: Vec<PrivateRedis>,
}

impl PrivateRedisCluster {
    /// Start `masters` (at least 3, as `redis-cli --cluster create` requires)
    /// cluster-enabled servers, join them with `redis-cli --cluster create`
    /// (slots split evenly) and wait (up to 30s) until every node reports
    /// `cluster_state:ok`.
    pub fn start(masters: usize) -> Result<PrivateRedisCluster, ServerError> {
        if masters < 3 {
            return Err(ServerError::Start(format!(
                "a Redis Cluster needs at least 3 masters, asked for {masters}"
            )));
        }
        let cli = which("redis-cli").ok_or_else(|| ServerError::Missing {
            binary: "redis-cli".into(),
            package: "redis-tools".into(),
        })?;
        let ports = free_ports(masters * 2)?;
        let mut nodes = Vec::with_capacity(masters);
        for pair in ports.chunks_exact(2) {
            let bus = pair[1].to_string();
            nodes.push(PrivateRedis::start_on(
                pair[0],
                &[
                    "--cluster-enabled",
                    "yes",
                    // Relative to --dir: each node keeps its own.
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "5000",
                ],
            )?);
        }
        let cluster = PrivateRedisCluster { nodes };
        let out = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(cluster.addrs())
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(ServerError::Start(format!(
                "redis-cli --cluster create failed: {}",
                last_line(&out.stdout, &out.stderr)
            )));
        }
        cluster.wait_ok(&cli, Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// `127.0.0.1:<port>` of every node.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// Ports of the nodes (all primaries).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The cluster URL agentq takes: `redis-cluster://<first>?node=<other>&...`.
    pub fn url(&self) -> String {
        let addrs = self.addrs();
        let others: Vec<String> = addrs[1..].iter().map(|a| format!("node={a}")).collect();
        format!("redis-cluster://{}?{}", addrs[0], others.join("&"))
    }

    /// Poll `CLUSTER INFO` on every node until all report `cluster_state:ok`
    /// with every slot assigned and every node known.
    fn wait_ok(&self, cli: &std::path::Path, limit: Duration) -> Result<(), ServerError> {
        let until = Instant::now() + limit;
        let known = format!("cluster_known_nodes:{}", self.nodes.len());
        loop {
            let all_ok = self.nodes.iter().all(|n| {
                Command::new(cli)
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .stdin(Stdio::null())
                    .output()
                    .is_ok_and(|o| {
                        let text = String::from_utf8_lossy(&o.stdout);
                        let has = |l: &str| text.lines().any(|x| x.trim() == l);
                        has("cluster_state:ok") && has("cluster_slots_ok:16384") && has(&known)
                    })
            });
            if all_ok {
                return Ok(());
            }
            if Instant::now() > until {
                return Err(ServerError::Start(format!(
                    "Redis Cluster on {:?} did not reach cluster_state:ok within {limit:?}",
                    self.ports()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `n` distinct free loopback ports: every listener is held until all are
/// chosen, so no two are the same.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// The last non-empty line of a command's output, for one-line errors.
fn last_line(stdout: &[u8], stderr: &[u8]) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .trim()
        .to_string()
}

/// Where Redis is for a command that may start its own: the configured URL,
/// or, when none was configured and nothing listens on the default port, a
/// private server.
#[derive(Debug)]
pub enum RedisSource {
    /// A server someone else runs.
    External(String),
    /// A server this process started.
    Private(PrivateRedis),
}

impl RedisSource {
    /// Decide where Redis is; see the type's docs.
    pub fn find(url: &str, url_is_default: bool) -> Result<RedisSource, ServerError> {
        if !url_is_default || listening("127.0.0.1:6379") {
            return Ok(RedisSource::External(url.to_string()));
        }
        Ok(RedisSource::Private(PrivateRedis::start(&[
            "--appendonly",
            "yes",
        ])?))
    }

    /// The URL to connect to.
    pub fn url(&self) -> String {
        match self {
            RedisSource::External(u) => u.clone(),
            RedisSource::Private(p) => p.url(),
        }
    }
}

/// A PostgreSQL server (`postgres`, not a daemonized `pg_ctl`) this process
/// started in a temporary directory, with trust authentication for user
/// `postgres` on 127.0.0.1 only.
///
/// When this process runs as root (PostgreSQL refuses to), `initdb` and the
/// server run as the `postgres` system user, which then owns the directory.
#[derive(Debug)]
pub struct PrivatePostgres {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Port it listens on (127.0.0.1).
    pub port: u16,
    bin_dir: PathBuf,
    run_as: Option<(u32, u32)>,
}

impl PrivatePostgres {
    /// Create a cluster with `initdb` in a new temporary directory, start
    /// `postgres` on a free port and wait (up to 30s) until it reports itself
    /// ready to accept connections.
    ///
    /// Binaries come from PATH, else the newest `/usr/lib/postgresql/*/bin`.
    pub fn start() -> Result<PrivatePostgres, ServerError> {
        let bin_dir = postgres_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("agentq-pg-").tempdir()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            let ids = system_user("postgres").ok_or_else(|| {
                ServerError::Start(
                    "running as root, and PostgreSQL refuses to: no `postgres` system user \
                     to run it as (create one, or run as an ordinary user)"
                        .into(),
                )
            })?;
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1))?;
            Some(ids)
        } else {
            None
        };
        let mut pg = PrivatePostgres {
            child: None,
            dir,
            port: free_port()?,
            bin_dir,
            run_as,
        };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(pg.data_dir())
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(ServerError::Start(format!(
                "initdb failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        pg.restart()?;
        Ok(pg)
    }

    /// The server's URL (user `postgres`, database `postgres`, no password).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The temporary directory: `data/` (the cluster), `postgres.log` (the
    /// server's output) and the Unix socket.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// True while the server process this handle started has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Start the server (again) on the same port and data directory, after
    /// [`stop`](Self::stop); a server still running is stopped first. Waits
    /// up to 30s until it is ready to accept connections.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = cmd.spawn()?;
        let pid = child.id();
        let addr = format!("127.0.0.1:{}", self.port);
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(ServerError::Start(format!(
                    "postgres on port {} exited ({status}) while starting: {}",
                    self.port,
                    self.log_tail()
                )));
            }
            if self.pid_file_ready(pid) && listening(&addr) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ServerError::Start(format!(
                    "postgres on port {} was not ready within 30s: {}",
                    self.port,
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fast shutdown (SIGINT: roll back open transactions, close sessions,
    /// checkpoint) and reap it; SIGKILL if it has not exited within 10s.
    /// Does nothing if it is not running.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if matches!(c.try_wait(), Ok(None)) {
            if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                // SAFETY: signalling our own, not yet reaped, child.
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
            let until = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Require `password` (scram-sha-256) for user `postgres` over TCP, and
    /// with `tls = Some((cert, key))` (PEM files) serve TLS too (`ssl = on`;
    /// the files are copied into the data directory). Local socket
    /// connections stay trusted. Restarts the server.
    pub fn secure(
        &mut self,
        password: &str,
        tls: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<(), ServerError> {
        let sql = format!(
            "ALTER USER postgres PASSWORD '{}'",
            password.replace('\'', "''")
        );
        let out = self
            .command("psql")
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", &sql])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(ServerError::Start(format!(
                "setting the password failed: {}",
                last_line(&out.stdout, &out.stderr)
            )));
        }
        let data = self.data_dir();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n",
        )?;
        let mut conf = String::from("\npassword_encryption = 'scram-sha-256'\n");
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            for (src, name, mode) in [(cert, "server.crt", 0o644), (key, "server.key", 0o600)] {
                let dst = data.join(name);
                std::fs::copy(src, &dst)?;
                std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
                if let Some((uid, gid)) = self.run_as {
                    std::os::unix::fs::chown(&dst, Some(uid), Some(gid))?;
                }
            }
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?;
        std::io::Write::write_all(&mut f, conf.as_bytes())?;
        self.restart()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command for one of the PostgreSQL binaries, run as the right user
    /// from the temporary directory (the caller's may be unreadable to it).
    fn command(&self, binary: &str) -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(self.bin_dir.join(binary));
        cmd.current_dir(self.dir.path());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// `postmaster.pid` names `pid` and says `ready` (PostgreSQL 10+), so
    /// startup recovery is over, not just the socket open.
    fn pid_file_ready(&self, pid: u32) -> bool {
        let Ok(text) = std::fs::read_to_string(self.data_dir().join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        lines.first() == Some(&pid.to_string().as_str()) && lines.get(7) == Some(&"ready")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The directory holding `initdb` and `postgres`: `initdb`'s on PATH, else
/// the newest `/usr/lib/postgresql/<version>/bin` (Debian keeps them there).
fn postgres_bin_dir() -> Result<PathBuf, ServerError> {
    let from_path = which("initdb")
        .and_then(|p| std::fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(PathBuf::from));
    let dir = from_path.or_else(|| {
        std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| {
                let e = e.ok()?;
                let version: Vec<u32> = e
                    .file_name()
                    .to_str()?
                    .split('.')
                    .map(|n| n.parse().ok())
                    .collect::<Option<_>>()?;
                let bin = e.path().join("bin");
                bin.join("initdb").is_file().then_some((version, bin))
            })
            .max()
            .map(|(_, bin)| bin)
    });
    let dir = dir.ok_or_else(|| ServerError::Missing {
        binary: "initdb".into(),
        package: "postgresql".into(),
    })?;
    if !dir.join("postgres").is_file() {
        return Err(ServerError::Missing {
            binary: "postgres".into(),
            package: "postgresql".into(),
        });
    }
    Ok(dir)
}

/// The uid and gid of system user `name` (the `nix` crate's lookup, as
/// agentq's task users use).
fn system_user(name: &str) -> Option<(u32, u32)> {
    let u = nix::unistd::User::from_name(name).ok()??;
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

/// Where PostgreSQL is for a command that may start its own: the configured
/// URL, or, when none was configured and nothing listens on the default port,
/// a private server.
#[derive(Debug)]
pub enum PostgresSource {
    /// A server someone else runs.
    External(String),
    /// A server this process started.
    Private(PrivatePostgres),
}

impl PostgresSource {
    /// Decide where PostgreSQL is; see the type's docs.
    pub fn find(url: &str, url_is_default: bool) -> Result<PostgresSource, ServerError> {
        if !url_is_default || listening("127.0.0.1:5432") {
            return Ok(PostgresSource::External(url.to_string()));
        }
        Ok(PostgresSource::Private(PrivatePostgres::start()?))
    }

    /// The URL to connect to.
    pub fn url(&self) -> String {
        match self {
            PostgresSource::External(u) => u.clone(),
            PostgresSource::Private(p) => p.url(),
        }
    }
}
