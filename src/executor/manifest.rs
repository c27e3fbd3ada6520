//! Task kind manifests: `workers/<kind>/worker.toml`.
//!
//! ```toml
//! command = ["./run"]        # relative to the kind's folder, absolute, or a bare name found on PATH
//! timeout = "30s"            # used when the job asks for none (default 30s)
//! memory  = "256MiB"         # used when the job asks for none (default: no cap)
//! env     = ["PATH", "LANG"] # variables passed through; nothing else is (default none)
//! ```
//!
//! Unknown keys are an error, so a typo never silently drops a limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::units::{parse_duration, parse_size};

/// Name of the manifest file inside a kind's folder.
pub const MANIFEST_FILE: &str = "worker.toml";

/// Timeout used when a manifest has none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One task kind: how to start it and its default limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Kind name (the folder name).
    pub kind: String,
    /// The kind's folder; relative commands resolve against it.
    pub dir: PathBuf,
    /// Program and arguments (never empty).
    pub command: Vec<String>,
    /// Default timeout for an attempt.
    pub timeout: Duration,
    /// Default memory cap in bytes (`None`: no cap).
    pub memory: Option<u64>,
    /// Names of the worker's environment variables passed to the program.
    pub env: Vec<String>,
}

/// A manifest or workers directory that cannot be used. Display is one line
/// naming the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The manifest (or kind name) is invalid.
    #[error("{path}: {message}")]
    Invalid {
        /// File or directory.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    command: Vec<String>,
    timeout: Option<String>,
    memory: Option<String>,
    env: Option<Vec<String>>,
}

/// True when `kind` matches `^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`.
pub fn valid_kind_name(kind: &str) -> bool {
    let b = kind.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0'])
}

/// Parses the text of `dir/worker.toml` for kind `kind`. Pure (no file
/// system access); errors name `dir/worker.toml`.
pub fn parse_manifest(kind: &str, dir: &Path, text: &str) -> Result<Manifest, ManifestError> {
    let path = dir.join(MANIFEST_FILE);
    let invalid = |message: String| ManifestError::Invalid {
        path: path.clone(),
        message,
    };
    if !valid_kind_name(kind) {
        return Err(invalid(format!(
            "invalid kind name {kind:?}: the folder name must be 1-64 characters of letters, digits, '_', '.' or '-', starting with a letter or digit"
        )));
    }
    let raw: RawManifest = toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let line = text.as_bytes()[..span.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1;
                invalid(format!("line {line}: {msg}"))
            }
            None => invalid(msg),
        }
    })?;
    match raw.command.first() {
        None => {
            return Err(invalid(
                "command is empty; write for example command = [\"./run\"]".into(),
            ));
        }
        Some(p) if p.is_empty() || p.contains('\0') => {
            return Err(invalid(
                "command: the program name is empty or contains NUL; write for example command = [\"./run\"]".into(),
            ));
        }
        Some(_) => {}
    }
    if raw.command.iter().any(|a| a.contains('\0')) {
        return Err(invalid("command: an argument contains a NUL byte".into()));
    }
    let timeout = match raw.timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) => {
            let d = parse_duration(&t).map_err(|e| invalid(format!("timeout: {e}")))?;
            if d.is_zero() {
                return Err(invalid(
                    "timeout: must be greater than zero, for example \"30s\"".into(),
                ));
            }
            d
        }
    };
    let memory = match raw.memory {
        None => None,
        Some(m) => {
            let n = parse_size(&m).map_err(|e| invalid(format!("memory: {e}")))?;
            if n == 0 {
                return Err(invalid(
                    "memory: must be greater than zero, for example \"256MiB\" (leave it out for no cap)".into(),
                ));
            }
            Some(n)
        }
    };
    let env = raw.env.unwrap_or_default();
    if let Some(bad) = env.iter().find(|n| !valid_env_name(n)) {
        return Err(invalid(format!(
            "env: {bad:?} is not a variable name; list names only, for example env = [\"PATH\", \"LANG\"]"
        )));
    }
    Ok(Manifest {
        kind: kind.to_string(),
        dir: dir.to_path_buf(),
        command: raw.command,
        timeout,
        memory,
        env,
    })
}

/// All task kinds found in a workers directory.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    dir: PathBuf,
    kinds: BTreeMap<String, Manifest>,
}

impl Registry {
    /// Scans `dir/*/worker.toml`. Folders without a `worker.toml` are
    /// skipped. The first bad manifest (or a folder with a manifest whose
    /// name is not a valid kind) is an error naming the file.
    pub fn load(dir: &Path) -> Result<Registry, ManifestError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ManifestError::Io { path, source }
        };
        let dir = std::fs::canonicalize(dir).map_err(io(dir))?;
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            if path.is_dir() && path.join(MANIFEST_FILE).is_file() {
                entries.push(path);
            }
        }
        entries.sort();
        let mut kinds = BTreeMap::new();
        for kind_dir in entries {
            let file = kind_dir.join(MANIFEST_FILE);
            let Some(kind) = kind_dir.file_name().and_then(|n| n.to_str()) else {
                return Err(ManifestError::Invalid {
                    path: file,
                    message: "the folder name is not valid UTF-8 and cannot be a kind name".into(),
                });
            };
            let text = std::fs::read_to_string(&file).map_err(io(&file))?;
            let m = parse_manifest(kind, &kind_dir, &text)?;
            kinds.insert(m.kind.clone(), m);
        }
        Ok(Registry { dir, kinds })
    }

    /// A registry with no kinds.
    pub fn empty() -> Registry {
        Registry::default()
    }

    /// A registry built from manifests (for tests and embedders).
    pub fn from_manifests(dir: PathBuf, manifests: impl IntoIterator<Item = Manifest>) -> Registry {
        Registry {
            dir,
            kinds: manifests.into_iter().map(|m| (m.kind.clone(), m)).collect(),
        }
    }

    /// The manifest of `kind`.
    pub fn get(&self, kind: &str) -> Option<&Manifest> {
        self.kinds.get(kind)
    }

    /// Kind names, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    /// Number of kinds.
    pub fn len(&self) -> usize {
        self.kinds.len()
    }

    /// True when there are no kinds.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    /// The (canonical) workers directory; empty for [`Registry::empty`].
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        parse_manifest("k", Path::new("/w/k"), text)
    }

    #[test]
    fn full_and_defaults() {
        let m = parse(
            "command = [\"./run\", \"-v\"]\ntimeout = \"5m\"\nmemory = \"256MiB\"\nenv = [\"PATH\"]\n",
        )
        .unwrap();
        assert_eq!(m.command, ["./run", "-v"]);
        assert_eq!(m.timeout, Duration::from_secs(300));
        assert_eq!(m.memory, Some(256 << 20));
        assert_eq!(m.env, ["PATH"]);
        let m = parse("command = [\"./run\"]").unwrap();
        assert_eq!(m.timeout, DEFAULT_TIMEOUT);
        assert_eq!(m.memory, None);
        assert!(m.env.is_empty());
    }

    #[test]
    fn errors_are_one_line_and_name_the_file() {
        for (text, needle) in [
            ("command = [\"./run\"]\ntimout = \"5s\"", "line 2"),
            ("command = []", "command is empty"),
            ("timeout = \"5s\"", "command"),
            ("command = [\"./run\"]\ntimeout = \"5\"", "missing unit"),
            ("command = [\"./run\"]\nmemory = \"lots\"", "memory"),
            ("command = [\"./run\"]\nenv = [\"A=B\"]", "env"),
            (
                "command = [\"./run\"]\ntimeout = \"0s\"",
                "greater than zero",
            ),
            ("command = \"./run\"", "line 1"),
            ("[[[", "line 1"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with("/w/k/worker.toml: "), "{e}");
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn kind_names() {
        assert!(valid_kind_name("agent-sim"));
        assert!(valid_kind_name("a.b_c-1"));
        assert!(valid_kind_name(&"a".repeat(64)));
        assert!(!valid_kind_name(&"a".repeat(65)));
        assert!(!valid_kind_name(""));
        assert!(!valid_kind_name(".hidden"));
        assert!(!valid_kind_name("a b"));
        assert!(!valid_kind_name("a/b"));
        assert!(parse_manifest("bad name", Path::new("/w"), "command=[\"x\"]").is_err());
    }

    #[test]
    fn registry_loads_repo_workers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("workers");
        let r = Registry::load(&dir).unwrap();
        for k in ["echo", "sleep", "memhog", "fail", "agent-sim"] {
            assert!(r.get(k).is_some(), "{k}");
        }
        assert!(r.dir().is_absolute());
        assert_eq!(r.get("memhog").unwrap().memory, Some(512 << 20));
    }

    #[test]
    fn registry_reports_bad_file() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("ok")).unwrap();
        std::fs::write(tmp.path().join("ok/worker.toml"), "command=[\"./run\"]").unwrap();
        std::fs::create_dir(tmp.path().join("notakind")).unwrap();
        let r = Registry::load(tmp.path()).unwrap();
        assert_eq!(r.kinds().collect::<Vec<_>>(), ["ok"]);
        std::fs::create_dir(tmp.path().join("bad")).unwrap();
        std::fs::write(
            tmp.path().join("bad/worker.toml"),
            "command=[\"./run\"]\nmem=1",
        )
        .unwrap();
        let e = Registry::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("bad/worker.toml"), "{e}");
        assert!(Registry::load(&tmp.path().join("missing")).is_err());
        assert!(Registry::empty().get("ok").is_none());
    }

    proptest! {
        #[test]
        fn parse_never_panics(kind in ".{0,70}", text in ".*") {
            let _ = parse_manifest(&kind, Path::new("/w"), &text);
        }

        #[test]
        fn parse_never_panics_tomlish(
            text in "(command|timeout|memory|env|x) ?= ?(\\[\"[a-z./]{0,5}\"\\]|\"[0-9a-zA-Z.]{0,6}\"|[0-9]{1,3})\n{0,2}"
        ) {
            if let Err(e) = parse_manifest("k", Path::new("/w"), &text) {
                prop_assert!(!e.to_string().contains('\n'));
            }
        }
    }
}
