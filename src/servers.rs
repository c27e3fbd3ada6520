//! Finding Redis, or starting a private one, for `agentq demo` and the tests.
//!
//! A private server runs from the binary on PATH in a temporary directory on
//! a free loopback port, and is killed when its handle drops.

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

/// Find `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
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
        let dir = tempfile::Builder::new().prefix("agentq-redis-").tempdir()?;
        let mut r = PrivateRedis {
            child: None,
            dir,
            port: free_port()?,
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
