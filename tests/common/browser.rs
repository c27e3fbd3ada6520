//! Headless Chromium driven over WebDriver, for the dashboard's browser
//! test: a chromedriver started on a free port (killed with the test) and
//! a fantoccini client on it.
//!
//! Why fantoccini: it is the WebDriver client the Rust ecosystem has kept
//! longest (jonhoo/fantoccini, releases since 2017, hyper 1 since 0.21),
//! async on tokio like every other test here, and with default features off
//! it adds no TLS stack: chromedriver listens on plain loopback HTTP, which
//! hyper-util's connector (already in the tree through axum) reaches.
//! thirtyfour would do too, but pulls reqwest and a TLS backend.
//!
//! chromedriver missing is a failure, not a skip: CI installs chromium and
//! chromium-driver (.ci/run). `AGENTQ_SKIP_BROWSER=1` opts out explicitly.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};
use serde_json::json;

use crate::common::{Proc, die_with_test, eventually};

/// Chromium flags for running as root in a container with a closed network.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--window-size=1280,900",
    // Lets the window grow past 900 px for whole-page screenshots.
    "--screen-info={0,0 1280x2400}",
];

/// Whether the browser tests were explicitly opted out of.
pub fn skipped() -> bool {
    std::env::var("AGENTQ_SKIP_BROWSER").is_ok_and(|v| v == "1")
}

fn find(names: &[&str]) -> Option<std::path::PathBuf> {
    names.iter().find_map(|n| which::which(n).ok())
}

/// A running chromedriver and a browser session on it.
pub struct Browser {
    pub client: Client,
    /// chromedriver, leader of its own process group (Chromium's too).
    driver: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start chromedriver on a free port and open a headless Chromium.
    /// Panics (fails the test) when chromedriver or chromium is missing.
    pub async fn start() -> Browser {
        let driver = find(&["chromedriver"]).expect(
            "chromedriver not found: apt-get install -y chromium chromium-driver \
             (or set AGENTQ_SKIP_BROWSER=1 to skip the browser tests)",
        );
        let chrome = find(&["chromium", "chromium-browser", "google-chrome"]).expect(
            "chromium not found: apt-get install -y chromium chromium-driver \
             (or set AGENTQ_SKIP_BROWSER=1 to skip the browser tests)",
        );
        let port = agentq_servers::free_port().expect("free port");
        let mut cmd = Command::new(driver);
        die_with_test(&mut cmd)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let proc = Proc(cmd.spawn().expect("spawn chromedriver"));
        eventually(
            Duration::from_secs(20),
            "chromedriver listening",
            || async { agentq_servers::listening(&format!("127.0.0.1:{port}")).then_some(()) },
        )
        .await;
        let profile = tempfile::tempdir().expect("profile dir");
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": chrome, "args": args }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("WebDriver session with headless Chromium");
        Browser {
            client,
            driver: proc,
            _profile: profile,
        }
    }

    /// End the browser session (chromedriver is killed when dropped).
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    /// Kill chromedriver's whole process group, so a failing test leaves
    /// no Chromium behind either.
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.driver.id()) {
            // SAFETY: signalling the process group our own child leads.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}
