//! `docker/Dockerfile` builds, checked without a Docker engine (none runs
//! where agentq is developed, and no base image can be fetched).
//!
//! The honest proxy for `docker build -f docker/Dockerfile .`:
//! 1. assemble exactly the build context BuildKit would send: the
//!    repository minus what `docker/Dockerfile.dockerignore` (else
//!    `.dockerignore`) leaves out, with Docker's pattern rules
//!    ([`DockerIgnore`]);
//! 2. replay every stage the runtime image copies from, in order, in a
//!    directory standing for that stage's filesystem: `WORKDIR`, `ENV`,
//!    `ARG` and `COPY` (from the context or an earlier stage) as Docker
//!    applies them, and each `RUN` through `/bin/sh -c` in its `WORKDIR`,
//!    among them the dependency-cache step and `cargo build --release
//!    --locked`: a file the build needs that the context or a `COPY`
//!    leaves out fails here as it would in the image build;
//! 3. apply the runtime stage's `COPY` instructions (each source must exist:
//!    `--from` in that stage's result, plain ones in the context), skipping
//!    its `RUN` (OS packages of a base image we do not have), and check what
//!    the image would hold: the real agentq binary, the task kinds
//!    (none unless `DEMO_TASKS=1`), a non-root user.
//!
//! What stands in for Docker's base image: this machine's toolchain (PATH,
//! CARGO_HOME, RUSTUP_HOME are passed to `RUN`), with `CARGO_NET_OFFLINE=true`
//! because the local registry cache holds every crate the lockfile names and
//! the tests must not need the network. What stands in for BuildKit's layer
//! cache: the stage directories live under `target/docker-check/` and the
//! build stage's cargo target directory (`<WORKDIR>/target`) is kept between
//! runs, so a repeated run only recompiles agentq itself; a stage whose
//! declared `ARG`s have the same values is replayed once for both settings;
//! and a stage whose instructions, ARG values, context files and toolchain
//! are those of the last successful replay is not replayed again (its
//! directory is reused: a run where only tests or docs changed takes
//! seconds).
//!
//! `RUN` commands run on this machine, not in a container: the build
//! stages' commands must stay relative to their `WORKDIR` (the Dockerfile
//! says so).
//!
//! Cost (a shared 2-core machine): cold (empty `target/docker-check/`,
//! every dependency compiled with the release profile turned down, see
//! [`run_env`]) about 2 min; with the real release profile
//! (`AGENTQ_DOCKER_CHECK_OPTIMIZED=1`) 17 min with other builds running
//! beside it, 9.4 min of CPU; with an unchanged context about 1 s.
//!
//! Not covered: the runtime stage's `RUN` (apt-get, useradd: only checked
//! to create the `USER`), that the base images exist, and Docker's rarer
//! pattern forms (a `**` inside a component, such as `a**`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::ops::root;

// ---- .dockerignore ---------------------------------------------------------
//
// Hand-written rather than the `ignore` or `globset` crates: Docker's rules
// are not gitignore's (every pattern is anchored at the context root, there
// is no implicit `**/`, a pattern that matches a directory excludes
// everything under it, the last matching pattern wins), and a few dozen
// lines mirroring moby's patternmatcher keep Cargo.lock untouched.

/// One line of an ignore file: `!` (an exception) and the cleaned pattern,
/// split on `/`.
#[derive(Debug)]
struct IgnoreRule {
    exception: bool,
    parts: Vec<String>,
}

/// A parsed `.dockerignore`, with moby's (Docker's and BuildKit's) rules:
/// lines starting with `#` are comments, lines are trimmed, blank ones
/// skipped; a leading `!` makes an exception; the pattern is cleaned like
/// Go's `filepath.Clean` (so `/x`, `x/` and `./x` all mean `x`); `*` and `?`
/// match within one path component, `[...]` a character class, `\` escapes;
/// a `**` component matches any number of components (at least one when it
/// ends the pattern: `a/**` is what is under `a`); a path is excluded when
/// the last rule matching it or one of its parent directories is not an
/// exception.
#[derive(Debug)]
struct DockerIgnore {
    rules: Vec<IgnoreRule>,
}

impl DockerIgnore {
    fn parse(text: &str) -> DockerIgnore {
        let mut rules = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let mut pattern = line.trim();
            if pattern.is_empty() {
                continue;
            }
            let exception = pattern.starts_with('!');
            if exception {
                pattern = pattern[1..].trim();
            }
            let cleaned = clean(pattern);
            if cleaned.is_empty() {
                continue;
            }
            rules.push(IgnoreRule {
                exception,
                parts: cleaned.split('/').map(str::to_owned).collect(),
            });
        }
        DockerIgnore { rules }
    }

    /// Whether the context leaves out `rel` (a `/`-separated path relative
    /// to the context root).
    fn excludes(&self, rel: &str) -> bool {
        let comps: Vec<&str> = rel.split('/').collect();
        let mut excluded = false;
        for rule in &self.rules {
            // As moby: an exception only matters once something matched,
            // an exclusion only while nothing has.
            if rule.exception != excluded {
                continue;
            }
            // The path itself or any of its parent directories.
            if (1..=comps.len()).any(|n| glob_path(&rule.parts, &comps[..n])) {
                excluded = !rule.exception;
            }
        }
        excluded
    }

    /// Whether some exception could let back in a path under the excluded
    /// directory `dir` (then the walk must go into it, as Docker's does).
    fn may_include_below(&self, dir: &str) -> bool {
        let comps: Vec<&str> = dir.split('/').collect();
        self.rules
            .iter()
            .any(|r| r.exception && could_match_below(&r.parts, &comps))
    }
}

/// Go's `filepath.Clean` for a relative pattern, a leading `/` dropped.
fn clean(pattern: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in pattern.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

/// Whether the pattern components match the path components exactly.
fn glob_path(pat: &[String], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((p, rest)) if p == "**" => {
            if rest.is_empty() {
                !path.is_empty()
            } else {
                glob_path(rest, path) || (!path.is_empty() && glob_path(pat, &path[1..]))
            }
        }
        Some((p, rest)) => {
            !path.is_empty()
                && glob_part(p.as_bytes(), path[0].as_bytes())
                && glob_path(rest, &path[1..])
        }
    }
}

/// Whether the pattern could match a path strictly below `dir`.
fn could_match_below(pat: &[String], dir: &[&str]) -> bool {
    match (pat.split_first(), dir.split_first()) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some((p, _)), Some(_)) if p == "**" => true,
        (Some((p, rest)), Some((d, drest))) => {
            glob_part(p.as_bytes(), d.as_bytes()) && could_match_below(rest, drest)
        }
    }
}

/// One path component against one pattern component: `*`, `?`, `[...]`
/// (`[!...]` / `[^...]` negated, `a-z` ranges), `\` escapes.
fn glob_part(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') => (0..=s.len()).any(|i| glob_part(&p[1..], &s[i..])),
        Some(b'?') => !s.is_empty() && glob_part(&p[1..], &s[1..]),
        Some(b'[') => {
            let Some(close) = p.iter().skip(2).position(|&c| c == b']').map(|i| i + 2) else {
                return s.first() == Some(&b'[') && glob_part(&p[1..], &s[1..]);
            };
            let Some(&c) = s.first() else { return false };
            let mut class = &p[1..close];
            let negated = matches!(class.first(), Some(b'!' | b'^'));
            if negated {
                class = &class[1..];
            }
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negated && glob_part(&p[close + 1..], &s[1..])
        }
        Some(b'\\') if p.len() > 1 => s.first() == Some(&p[1]) && glob_part(&p[2..], &s[1..]),
        Some(&c) => s.first() == Some(&c) && glob_part(&p[1..], &s[1..]),
    }
}

/// The ignore file BuildKit uses for `docker/Dockerfile`: the
/// Dockerfile-specific one, else the context root's `.dockerignore`.
fn ignore_file_for_dockerfile() -> DockerIgnore {
    let specific = root().join("docker/Dockerfile.dockerignore");
    let generic = root().join(".dockerignore");
    let text = std::fs::read_to_string(&specific)
        .or_else(|_| std::fs::read_to_string(&generic))
        .unwrap_or_default();
    DockerIgnore::parse(&text)
}

/// Copies into `dest` exactly what the build context holds: files, symlinks
/// and directories of `src` that `ignore` does not leave out.
fn assemble_context(src: &Path, dest: &Path, ignore: &DockerIgnore) {
    fn walk(src: &Path, dest: &Path, rel: &str, ignore: &DockerIgnore) {
        let dir = if rel.is_empty() {
            src.to_path_buf()
        } else {
            src.join(rel)
        };
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry"))
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().into_string().expect("UTF-8 file names");
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ty = e.file_type().expect("file type");
            let excluded = ignore.excludes(&rel);
            if ty.is_dir() {
                if !excluded {
                    std::fs::create_dir_all(dest.join(&rel)).expect("mkdir in context");
                }
                if !excluded || ignore.may_include_below(&rel) {
                    walk(src, dest, &rel, ignore);
                }
            } else if !excluded {
                let to = dest.join(&rel);
                std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir in context");
                copy_entry(&e.path(), &to);
            }
        }
    }
    walk(src, dest, "", ignore);
}

/// Copies one file (mode kept) or symlink (as a symlink).
fn copy_entry(from: &Path, to: &Path) {
    let meta = std::fs::symlink_metadata(from).expect("stat");
    if to.symlink_metadata().is_ok() && !to.is_dir() {
        std::fs::remove_file(to).expect("replace file");
    }
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from).expect("readlink");
        std::os::unix::fs::symlink(target, to).expect("symlink");
    } else {
        std::fs::copy(from, to)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    }
}

/// `cp -R from/. to/` (directories merged, files replaced).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            copy_entry(&e.path(), &dest);
        }
    }
}

// ---- Dockerfile ------------------------------------------------------------

/// One instruction: its keyword (upper case), its arguments, its line.
#[derive(Clone, Debug)]
struct Instr {
    line: usize,
    cmd: String,
    args: String,
}

/// One stage: `FROM base [AS name]` and its instructions.
#[derive(Clone, Debug)]
struct Stage {
    index: usize,
    name: Option<String>,
    base: String,
    instrs: Vec<Instr>,
}

impl Stage {
    fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("stage{}", self.index))
    }
}

/// The stages of a Dockerfile: comment lines (also inside continuations)
/// dropped, `\` continuations joined, one instruction per logical line.
fn parse_dockerfile(text: &str) -> Vec<Stage> {
    let mut logical: Vec<(usize, String)> = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let t = raw.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_none()) {
            continue;
        }
        let (body, more) = match raw.trim_end().strip_suffix('\\') {
            Some(b) => (b, true),
            None => (raw, false),
        };
        let entry = cur.get_or_insert_with(|| (i + 1, String::new()));
        if !entry.1.is_empty() {
            entry.1.push(' ');
        }
        entry.1.push_str(body.trim());
        if !more {
            logical.push(cur.take().expect("instruction"));
        }
    }
    assert!(cur.is_none(), "Dockerfile ends inside a continued line");
    let mut stages: Vec<Stage> = Vec::new();
    for (line, text) in logical {
        let (cmd, args) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
        let cmd = cmd.to_ascii_uppercase();
        let args = args.trim().to_string();
        if cmd == "FROM" {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                [_] => None,
                _ => panic!("Dockerfile line {line}: FROM {args}: expected `FROM image [AS name]`"),
            };
            stages.push(Stage {
                index: stages.len(),
                name,
                base: words[0].to_string(),
                instrs: Vec::new(),
            });
        } else {
            let stage = stages
                .last_mut()
                .unwrap_or_else(|| panic!("Dockerfile line {line}: {cmd} before the first FROM (only ARG may be there; none is used)"));
            stage.instrs.push(Instr { line, cmd, args });
        }
    }
    stages
}

/// `$NAME` and `${NAME}` replaced from `vars` (unknown ones: empty, as Docker).
fn substitute(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(b) = after.strip_prefix('{') {
            let end = b.find('}').expect("closing } in ${...}");
            (&b[..end], end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        assert!(
            !name.contains(':'),
            "${{{name}}}: modifiers are not supported by this check"
        );
        out.push_str(vars.get(name).map(String::as_str).unwrap_or(""));
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// `COPY [--flag=...]... SRC... DEST` (shell or JSON form): flags, sources, destination.
fn copy_parts(args: &str, line: usize) -> (BTreeMap<String, String>, Vec<String>, String) {
    let words: Vec<String> = if args.starts_with('[') {
        serde_json::from_str(args)
            .unwrap_or_else(|e| panic!("Dockerfile line {line}: COPY {args}: {e}"))
    } else {
        args.split_whitespace().map(str::to_owned).collect()
    };
    let mut flags = BTreeMap::new();
    let mut rest = Vec::new();
    for w in words {
        match w.strip_prefix("--") {
            Some(f) if rest.is_empty() => {
                let (k, v) = f.split_once('=').unwrap_or((f, ""));
                flags.insert(k.to_string(), v.to_string());
            }
            _ => rest.push(w),
        }
    }
    assert!(
        rest.len() >= 2,
        "Dockerfile line {line}: COPY needs a source and a destination"
    );
    let dest = rest.pop().expect("destination");
    (flags, rest, dest)
}

/// Joins a container path (absolute or relative to `workdir`) onto `fs`.
fn in_fs(fs: &Path, workdir: &str, path: &str) -> PathBuf {
    let abs = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{workdir}/{path}")
    };
    let rel = clean(&abs);
    if rel.is_empty() {
        fs.to_path_buf()
    } else {
        fs.join(rel)
    }
}

/// Docker's COPY of `sources` (paths on the host) to `dest` (a container
/// path) in `fs`: a directory's contents go into the destination; a file
/// goes into the destination when it ends with `/` or is a directory,
/// else becomes it.
fn apply_copy(sources: &[(String, PathBuf)], dest: &str, fs: &Path, workdir: &str, line: usize) {
    let to = in_fs(fs, workdir, dest);
    let into_dir = dest.ends_with('/') || to.is_dir() || sources.len() > 1;
    for (shown, from) in sources {
        assert!(
            !shown.contains(['*', '?', '[']),
            "Dockerfile line {line}: COPY {shown}: wildcards are not supported by this check"
        );
        let meta = std::fs::symlink_metadata(from).unwrap_or_else(|_| {
            panic!(
                "Dockerfile line {line}: COPY {shown}: not found ({} is missing)",
                from.display()
            )
        });
        if meta.is_dir() {
            copy_tree(from, &to);
        } else {
            let file = if into_dir {
                to.join(from.file_name().expect("file name"))
            } else {
                to.clone()
            };
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            copy_entry(from, &file);
        }
    }
}

/// Removes everything in `dir` except the paths in `keep` (and the
/// directories leading to them).
fn reset_dir_keeping(dir: &Path, keep: &[PathBuf]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        std::fs::create_dir_all(dir).expect("mkdir");
        return;
    };
    for e in entries {
        let p = e.expect("entry").path();
        if keep.iter().any(|k| k == &p) {
            continue;
        }
        if keep.iter().any(|k| k.starts_with(&p)) && p.is_dir() && !p.is_symlink() {
            reset_dir_keeping(&p, keep);
        } else if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p).expect("remove stage directory");
        } else {
            std::fs::remove_file(&p).expect("remove stage file");
        }
    }
}

/// The environment `RUN` gets: the stand-ins for the base image's (the
/// toolchain and where it lives), offline cargo, then the stage's ENV and ARGs.
fn run_env(vars: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        "PATH",
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
    .collect();
    // The local registry cache has every crate Cargo.lock names; tests must
    // not depend on the network (the image build itself fetches them).
    env.push(("CARGO_NET_OFFLINE".into(), "true".into()));
    // What this check proves is that cargo accepts the manifests and
    // compiles every crate from what the image holds (`--locked`, every
    // file present), not what the optimizer makes of it: the release
    // profile's code generation is turned down (the command is the
    // Dockerfile's own), which makes a cold run several times cheaper in
    // CI. AGENTQ_DOCKER_CHECK_OPTIMIZED=1 keeps the real release profile.
    if std::env::var("AGENTQ_DOCKER_CHECK_OPTIMIZED").as_deref() != Ok("1") {
        for (k, v) in [
            ("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0"),
            ("CARGO_PROFILE_RELEASE_DEBUG", "false"),
            ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "256"),
        ] {
            env.push((k.into(), v.into()));
        }
    }
    env.extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Replays the Dockerfile: the stages the final one copies from, then the
/// final one's COPYs. Stage results are cached by (stage, values of the
/// ARGs it declares), as BuildKit's cache would reuse them.
struct Replay {
    stages: Vec<Stage>,
    context: PathBuf,
    work: PathBuf,
    done: HashMap<(usize, Vec<(String, String)>), PathBuf>,
    /// How long each stage run took, for the report.
    timings: Vec<(String, f64)>,
}

impl Replay {
    fn stage_by_name(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(name) || s.index.to_string() == name)
            .unwrap_or_else(|| panic!("no stage named {name} in docker/Dockerfile"))
    }

    /// The ARGs `stage` declares, with their values for `build_args`.
    fn stage_args(stage: &Stage, build_args: &BTreeMap<String, String>) -> Vec<(String, String)> {
        stage
            .instrs
            .iter()
            .filter(|i| i.cmd == "ARG")
            .map(|i| {
                let (k, default) = i.args.split_once('=').unwrap_or((&i.args, ""));
                let v = build_args
                    .get(k)
                    .cloned()
                    .unwrap_or_else(|| default.trim_matches('"').to_string());
                (k.to_string(), v)
            })
            .collect()
    }

    /// Runs stage `name` (a build stage) and returns its filesystem.
    fn run_stage(&mut self, name: &str, build_args: &BTreeMap<String, String>) -> PathBuf {
        let stage = self.stage_by_name(name).clone();
        let key = (stage.index, Self::stage_args(&stage, build_args));
        if let Some(fs) = self.done.get(&key) {
            return fs.clone();
        }
        assert!(
            self.stages
                .iter()
                .all(|s| s.name.as_deref() != Some(&stage.base)),
            "stage {} is FROM another stage; this check does not replay that",
            stage.label()
        );
        let suffix: String = key.1.iter().map(|(k, v)| format!("-{k}={v}")).collect();
        let fs = self.work.join(format!("stage-{}{suffix}", stage.label()));
        // BuildKit's cache, per stage: the same instructions, ARG values,
        // context and toolchain as the last successful replay give the same
        // filesystem, so it is reused as it is.
        let stamp = fs.join(".replayed");
        let cache_key = self.cache_key(&stage, &key.1);
        if cache_key.is_some() && std::fs::read_to_string(&stamp).ok() == cache_key {
            self.timings
                .push((format!("{}{suffix} (cached)", stage.label()), 0.0));
            self.done.insert(key, fs.clone());
            return fs;
        }
        // The cargo target directory of each WORKDIR is kept (the layer
        // cache's stand-in); everything else starts empty.
        let keep: Vec<PathBuf> = stage
            .instrs
            .iter()
            .filter(|i| i.cmd == "WORKDIR")
            .map(|i| in_fs(&fs, "/", &i.args).join("target"))
            .collect();
        reset_dir_keeping(&fs, &keep);
        let started = Instant::now();
        let mut workdir = "/".to_string();
        let mut vars: BTreeMap<String, String> = BTreeMap::new();
        for i in &stage.instrs {
            match i.cmd.as_str() {
                "WORKDIR" => {
                    let w = substitute(&i.args, &vars);
                    workdir = format!(
                        "/{}",
                        clean(&if w.starts_with('/') {
                            w
                        } else {
                            format!("{workdir}/{w}")
                        })
                    );
                    std::fs::create_dir_all(in_fs(&fs, &workdir, ".")).expect("mkdir WORKDIR");
                }
                "ENV" => {
                    let (k, v) = i.args.split_once(['=', ' ']).expect("ENV k=v");
                    vars.insert(k.to_string(), substitute(v.trim().trim_matches('"'), &vars));
                }
                "ARG" => {
                    let (k, default) = i.args.split_once('=').unwrap_or((&i.args, ""));
                    let v = build_args
                        .get(k)
                        .cloned()
                        .unwrap_or_else(|| default.trim_matches('"').to_string());
                    vars.insert(k.to_string(), v);
                }
                "COPY" => {
                    let (flags, srcs, dest) = copy_parts(&substitute(&i.args, &vars), i.line);
                    let sources = self.copy_sources(&flags, &srcs, build_args, i.line);
                    apply_copy(&sources, &dest, &fs, &workdir, i.line);
                }
                "RUN" => {
                    let cwd = in_fs(&fs, &workdir, ".");
                    let mut cmd = if i.args.starts_with('[') {
                        let argv: Vec<String> =
                            serde_json::from_str(&i.args).expect("RUN exec form");
                        let mut c = Command::new(&argv[0]);
                        c.args(&argv[1..]);
                        c
                    } else {
                        let mut c = Command::new("/bin/sh");
                        c.args(["-c", &i.args]);
                        c
                    };
                    let out = cmd
                        .current_dir(&cwd)
                        .env_clear()
                        .envs(run_env(&vars))
                        .output()
                        .expect("start /bin/sh");
                    assert!(
                        out.status.success(),
                        "docker/Dockerfile line {} (stage {}, build args {build_args:?}): RUN {} failed in {}: {}",
                        i.line,
                        stage.label(),
                        i.args,
                        cwd.display(),
                        tail(&common::ops::show(&out), 80)
                    );
                }
                // Metadata only, none of it changes the files.
                "USER" | "ENTRYPOINT" | "CMD" | "EXPOSE" | "LABEL" | "HEALTHCHECK"
                | "STOPSIGNAL" | "SHELL" | "VOLUME" => {}
                other => panic!(
                    "docker/Dockerfile line {}: {other} is not replayed by this check",
                    i.line
                ),
            }
        }
        if let Some(k) = cache_key {
            std::fs::write(&stamp, k).expect("write the replay stamp");
        }
        self.timings.push((
            format!("{}{suffix}", stage.label()),
            started.elapsed().as_secs_f64(),
        ));
        self.done.insert(key, fs.clone());
        fs
    }

    /// The cache key of a stage replay: its instructions, its ARG values,
    /// every file of the context and the toolchain (`rustc -vV`). None
    /// (never cached) for a stage that copies from another stage.
    fn cache_key(&self, stage: &Stage, args: &[(String, String)]) -> Option<String> {
        use sha2::{Digest, Sha256};
        if stage
            .instrs
            .iter()
            .any(|i| i.cmd == "COPY" && i.args.contains("--from"))
        {
            return None;
        }
        let mut h = Sha256::new();
        h.update(format!(
            "{:?}\n{:?}\n{args:?}\n",
            stage.base,
            stage
                .instrs
                .iter()
                .map(|i| (&i.cmd, &i.args))
                .collect::<Vec<_>>()
        ));
        let rustc = Command::new("rustc")
            .arg("-vV")
            .output()
            .expect("rustc -vV");
        h.update(&rustc.stdout);
        // The base environment, profile overrides included.
        h.update(format!("{:?}", run_env(&BTreeMap::new())));
        for f in files_under(&self.context) {
            let p = self.context.join(&f);
            let meta = std::fs::symlink_metadata(&p).expect("stat");
            h.update(format!(
                "{f}\0{:o}\0",
                std::os::unix::fs::PermissionsExt::mode(&meta.permissions())
            ));
            if meta.file_type().is_symlink() {
                h.update(
                    std::fs::read_link(&p)
                        .expect("readlink")
                        .as_os_str()
                        .as_encoded_bytes(),
                );
            } else {
                h.update(std::fs::read(&p).expect("read context file"));
            }
        }
        Some(hex::encode(h.finalize()))
    }

    /// A COPY's sources on this machine: in the context, or in the
    /// filesystem of the stage named by `--from` (replayed first).
    fn copy_sources(
        &mut self,
        flags: &BTreeMap<String, String>,
        srcs: &[String],
        build_args: &BTreeMap<String, String>,
        line: usize,
    ) -> Vec<(String, PathBuf)> {
        match flags.get("from") {
            Some(from) => {
                let fs = self.run_stage(from, build_args);
                srcs.iter().map(|s| (format!("--from={from} {s}"), in_fs(&fs, "/", s))).collect()
            }
            None => srcs
                .iter()
                .map(|s| {
                    let p = self.context.join(clean(s));
                    assert!(
                        p.symlink_metadata().is_ok(),
                        "docker/Dockerfile line {line}: COPY {s}: not in the build context \
                         (missing from the repository, or left out by docker/Dockerfile.dockerignore)"
                    );
                    (s.clone(), p)
                })
                .collect(),
        }
    }

    /// The final stage: its COPYs applied to an empty filesystem (its RUNs
    /// install OS packages into a base image this machine does not have),
    /// returned with its USER and its ENV.
    fn final_image(
        &mut self,
        build_args: &BTreeMap<String, String>,
    ) -> (PathBuf, Option<String>, BTreeMap<String, String>, String) {
        let stage = self.stages.last().expect("a stage").clone();
        let suffix: String = build_args
            .iter()
            .map(|(k, v)| format!("-{k}={v}"))
            .collect();
        let fs = self.work.join(format!("image{suffix}"));
        reset_dir_keeping(&fs, &[]);
        let mut workdir = "/".to_string();
        let mut user = None;
        let mut vars = BTreeMap::new();
        let mut runs = String::new();
        for i in &stage.instrs {
            match i.cmd.as_str() {
                "WORKDIR" => workdir = substitute(&i.args, &vars),
                "USER" => user = Some(substitute(&i.args, &vars)),
                "ENV" => {
                    let (k, v) = i.args.split_once(['=', ' ']).expect("ENV k=v");
                    vars.insert(k.to_string(), substitute(v.trim().trim_matches('"'), &vars));
                }
                "ARG" => {
                    let (k, default) = i.args.split_once('=').unwrap_or((&i.args, ""));
                    let v = build_args
                        .get(k)
                        .cloned()
                        .unwrap_or_else(|| default.to_string());
                    vars.insert(k.to_string(), v);
                }
                "RUN" => {
                    runs.push_str(&i.args);
                    runs.push('\n');
                }
                "COPY" => {
                    let (flags, srcs, dest) = copy_parts(&substitute(&i.args, &vars), i.line);
                    let sources = self.copy_sources(&flags, &srcs, build_args, i.line);
                    apply_copy(&sources, &dest, &fs, &workdir, i.line);
                }
                _ => {}
            }
        }
        (fs, user, vars, runs)
    }
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Files (relative paths) under `dir`, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(base, &p, out);
            } else {
                out.push(
                    p.strip_prefix(base)
                        .expect("under base")
                        .display()
                        .to_string(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

// ---- tests -----------------------------------------------------------------

/// Docker's ignore-file rules, on the patterns that matter: anchoring at the
/// root, `**`, leading `/`, trailing `/`, directory patterns covering their
/// contents, `!` exceptions (also inside an excluded directory), comments,
/// the last match winning, character classes and escapes.
#[test]
fn dockerignore_rules_match_dockers() {
    let ig = DockerIgnore::parse(
        "# a comment\n\
         \n\
         /target\n\
         docs/\n\
         **/*.swp\n\
         **/node_modules\n\
         *.md\n\
         !README.md\n\
         build/**\n\
         logs/*.log\n\
         !logs/keep.log\n\
         data?/[a-c]*.csv\n\
         lit\\*eral\n\
           padded  \n",
    );
    let cases = [
        ("target", true),
        ("target/release/agentq", true), // a directory pattern covers its contents
        ("crates/servers/target", false), // anchored at the root: no implicit **/
        ("targets", false),
        ("docs", true),
        ("docs/runbook.md", true),
        ("a.swp", true), // ** matches zero directories
        ("src/x/.y.swp", true),
        ("clients/typescript/node_modules/x/index.js", true),
        ("README.md", false), // the exception wins, it comes last
        ("CHANGES.md", true),
        ("docs/README.md", true), // *.md is anchored; !README.md too, so docs/ still excludes it
        ("build", false),         // build/** is what is under build/
        ("build/a/b", true),
        ("logs/x.log", true),
        ("logs/keep.log", false),
        ("logs/sub/x.log", false), // * does not cross /
        ("data1/b.csv", true),
        ("data1/d.csv", false),
        ("data12/b.csv", false),
        ("lit*eral", true),
        ("litXeral", false),
        ("padded", true),
        ("# a comment", false),
        ("src/main.rs", false),
    ];
    for (path, excluded) in cases {
        assert_eq!(
            ig.excludes(path),
            excluded,
            "{path}: excluded should be {excluded}"
        );
    }

    // A whitelist: everything out, some things back in, build output out again.
    let wl = DockerIgnore::parse("*\n!src\n!docker/stub.sh\n!crates/*/src\n**/target\n");
    for (path, excluded) in [
        ("Cargo.toml", true),
        (".git/config", true),
        ("src/main.rs", false),
        ("src/target/x", true),
        ("docker/stub.sh", false),
        ("docker/Dockerfile", true),
        ("crates/servers/src/lib.rs", false),
        ("crates/servers/Cargo.toml", true),
    ] {
        assert_eq!(
            wl.excludes(path),
            excluded,
            "whitelist: {path}: excluded should be {excluded}"
        );
    }
    // The walk goes into excluded directories only where an exception may let something back in.
    assert!(wl.may_include_below("docker"));
    assert!(wl.may_include_below("crates"));
    assert!(wl.may_include_below("crates/servers"));
    assert!(!wl.may_include_below(".git"));
    assert!(!wl.may_include_below("target"));
    assert!(!wl.may_include_below("docker/grafana"));

    assert_eq!(clean("/a//b/./c/"), "a/b/c");
    assert_eq!(clean("./x/../y"), "y");
}

/// The Dockerfile reader: continuations (with comment lines inside), stages
/// and their names, COPY flags, variable substitution.
#[test]
fn dockerfile_reader_reads_what_the_file_uses() {
    let stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nFROM rust:1 AS build\nWORKDIR /src\nRUN a \\\n# inside\n && b\nFROM debian\nCOPY --from=build --chown=x /src/t/a /usr/bin/a\n",
    );
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0].name.as_deref(), Some("build"));
    assert_eq!(stages[0].instrs[1].args, "a && b");
    assert_eq!(stages[1].name, None);
    let (flags, srcs, dest) = copy_parts(&stages[1].instrs[0].args, 0);
    assert_eq!(flags.get("from").map(String::as_str), Some("build"));
    assert_eq!(srcs, vec!["/src/t/a".to_string()]);
    assert_eq!(dest, "/usr/bin/a");
    let vars = BTreeMap::from([("A".to_string(), "1".to_string())]);
    assert_eq!(substitute("x$A/${A}y$B", &vars), "x1/1y");
}

/// `docker build -f docker/Dockerfile .`, replayed (see the module doc), by
/// default and with `--build-arg DEMO_TASKS=1`: the build stage compiles
/// agentq from the context alone (manifests, lockfile, every target's file,
/// the crates/servers member, migrations), the dependency-cache step
/// included; the image gets the real binary, runs as a non-root user, and
/// holds no task kinds unless DEMO_TASKS=1 asks for the example ones (never
/// the hostile test programs).
#[test]
fn image_builds_from_its_context_alone() {
    let started = Instant::now();
    let repo = root();
    let work = repo.join("target/docker-check");
    let context = work.join("context");
    reset_dir_keeping(&context, &[]);
    assemble_context(&repo, &context, &ignore_file_for_dockerfile());
    for must_not in [".git", "target", "tests", "workers/hostile"] {
        assert!(
            !context.join(must_not).exists(),
            "the build context leaves out {must_not}"
        );
    }

    let stages = parse_dockerfile(&common::ops::read("docker/Dockerfile"));
    let mut replay = Replay {
        stages,
        context,
        work,
        done: HashMap::new(),
        timings: Vec::new(),
    };

    for demo in [None, Some("1")] {
        let args: BTreeMap<String, String> = demo
            .map(|v| BTreeMap::from([("DEMO_TASKS".to_string(), v.to_string())]))
            .unwrap_or_default();
        let (image, user, env, runs) = replay.final_image(&args);

        // The binary is the real agentq, not the dependency-cache placeholder.
        let bin = image.join("usr/local/bin/agentq");
        let out = Command::new(&bin)
            .arg("--help")
            .output()
            .expect("run the image's agentq");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && help.contains("worker") && help.contains("migrate"),
            "the image's /usr/local/bin/agentq is not the agentq CLI: {}",
            common::ops::show(&out)
        );

        // Runs as the non-root user the image creates.
        let user = user.expect("the runtime stage sets USER");
        assert!(
            !["root", "0"].contains(&user.split(':').next().unwrap_or("")),
            "runs as {user}"
        );
        assert!(
            runs.contains(&format!(
                "useradd --system --uid 10001 --create-home {user}"
            )),
            "the image creates {user}: {runs}"
        );

        // Task kinds: the workers directory exists; empty unless asked for.
        let dir = env
            .get("AGENTQ_WORKERS_DIR")
            .expect("the image sets AGENTQ_WORKERS_DIR");
        let kinds_dir = image.join(clean(dir));
        assert!(
            kinds_dir.is_dir(),
            "{dir} exists in the image (the worker refuses a missing one)"
        );
        let registry =
            agentq::executor::Registry::load(&kinds_dir).expect("the image's task kinds load");
        let files = files_under(&kinds_dir);
        assert!(
            files
                .iter()
                .all(|f| !f.starts_with("hostile") && !f.starts_with("badbytes")),
            "test-only task programs in the image: {files:?}"
        );
        match demo {
            None => assert!(
                files.is_empty(),
                "the default image ships task kinds: {files:?}"
            ),
            Some(_) => {
                let kinds: Vec<&str> = registry.kinds().collect();
                assert_eq!(
                    kinds,
                    ["agent-sim", "echo", "fail", "memhog", "sleep"],
                    "DEMO_TASKS=1 kinds"
                );
            }
        }
    }

    eprintln!(
        "ops_docker: replayed docker/Dockerfile in {:.1} s (stages: {:?})",
        started.elapsed().as_secs_f64(),
        replay.timings
    );
}

/// The check catches what it was written for: the Dockerfile and ignore
/// file as they were before it (copying Cargo.toml, Cargo.lock, src,
/// migrations and benches, but not the crates/servers member nor the test
/// and example files the manifest declares) fail the replay at `cargo
/// build`, as they failed `docker build`. Fast: cargo stops at the manifest.
#[test]
fn the_dockerfile_before_this_check_fails_it() {
    const OLD_DOCKERFILE: &str = "\
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
RUN cargo build --release --locked --bin agentq

FROM debian:bookworm-slim
COPY --from=build /src/target/release/agentq /usr/local/bin/agentq
COPY workers /opt/agentq/workers
USER agentq
";
    const OLD_IGNORE: &str = "target\n.git\n**/*.swp\ndocker/backups\n";
    let work = root().join("target/docker-check/before");
    let context = work.join("context");
    reset_dir_keeping(&context, &[]);
    assemble_context(&root(), &context, &DockerIgnore::parse(OLD_IGNORE));
    let mut replay = Replay {
        stages: parse_dockerfile(OLD_DOCKERFILE),
        context,
        work,
        done: HashMap::new(),
        timings: Vec::new(),
    };
    let failure = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        replay.final_image(&BTreeMap::new());
    }))
    .expect_err("the old Dockerfile passes the replay");
    let msg = failure
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        msg.contains("RUN cargo build --release --locked --bin agentq failed")
            && msg.contains("crates/servers"),
        "the old Dockerfile fails for another reason: {msg}"
    );
}
