//! Support for the operations-asset tests (`tests/ops_*.rs`): the files of
//! the repository, its scripts, the YAML files read with `serde_norway`
//! (`<<` merges applied), the metrics agentq exports and the PromQL names
//! that refer to them, and the runbook's headings and tested SQL blocks.
//!
//! Not re-exported from `common`: the ops tests name it `common::ops`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};

/// A parsed YAML document.
pub use serde_norway::Value as Yaml;

/// Every metric agentq exports (without histogram suffixes).
pub const METRICS: &[&str] = &[
    "agentq_jobs_enqueued_total",
    "agentq_jobs_submitted_total",
    "agentq_jobs_started_total",
    "agentq_jobs_completed_total",
    "agentq_jobs_retried_total",
    "agentq_jobs_dead_lettered_total",
    "agentq_completions_refused_total",
    "agentq_lease_expiries_total",
    "agentq_schedule_slots_refused_total",
    "agentq_progress_reports_total",
    "agentq_ledger_rows_written_total",
    "agentq_ledger_write_errors_total",
    "agentq_ledger_rejects_total",
    "agentq_cost_micros_total",
    "agentq_cost_month_to_date_micros",
    "agentq_cost_projected_month_micros",
    "agentq_agent_seconds_total",
    "agentq_quota_alerts_total",
    "agentq_rate_alerts_total",
    "agentq_job_wait_seconds",
    "agentq_job_run_seconds",
    "agentq_queue_jobs",
    "agentq_tenant_running",
    "agentq_tenant_cap",
    "agentq_tenant_quota_use_ratio",
    "agentq_tenants_throttled",
    "agentq_worker_busy_slots",
    "agentq_worker_slots",
    "agentq_ledger_outbox_backlog",
];

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file of the repository (`rel` to its root), as text.
pub fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Whether `tool` is on PATH.
pub fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A finished command's exit code, stdout and stderr, for a failure message.
pub fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// ---- YAML ------------------------------------------------------------------

/// Parse YAML text, `<<` merge keys applied (explicit keys win).
pub fn parse_yaml(src: &str) -> Result<Yaml, serde_norway::Error> {
    let mut doc: Yaml = serde_norway::from_str(src)?;
    doc.apply_merge()?;
    Ok(doc)
}

/// A YAML file of the repository (`rel` to its root), `<<` merges applied.
pub fn read_yaml(rel: &str) -> Yaml {
    parse_yaml(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Reading a parsed YAML document by mapping keys.
pub trait YamlExt {
    /// The value under `keys`, one mapping level each.
    fn path(&self, keys: &[&str]) -> Option<&Yaml>;
    /// The string under `keys`.
    fn str_at(&self, keys: &[&str]) -> Option<&str>;
    /// The items of a sequence (none if this is not one).
    fn seq(&self) -> &[Yaml];
}

impl YamlExt for Yaml {
    fn path(&self, keys: &[&str]) -> Option<&Yaml> {
        keys.iter().try_fold(self, |v, k| v.get(*k))
    }
    fn str_at(&self, keys: &[&str]) -> Option<&str> {
        self.path(keys).and_then(Yaml::as_str)
    }
    fn seq(&self) -> &[Yaml] {
        self.as_sequence().map(Vec::as_slice).unwrap_or(&[])
    }
}

/// The strings of a sequence, or the words of a string (a compose
/// `command` or `healthcheck.test` in either form).
pub fn words(v: Option<&Yaml>) -> Vec<String> {
    match v {
        Some(Yaml::Sequence(items)) => items
            .iter()
            .filter_map(Yaml::as_str)
            .map(String::from)
            .collect(),
        Some(Yaml::String(s)) => s.split_whitespace().map(String::from).collect(),
        _ => Vec::new(),
    }
}

/// (source, target) of a docker/compose.yml service's volumes.
pub fn volumes(compose: &Yaml, service: &str) -> Vec<(String, String)> {
    compose
        .path(&["services", service, "volumes"])
        .map(Yaml::seq)
        .unwrap_or_default()
        .iter()
        .filter_map(Yaml::as_str)
        .map(|v| {
            let mut parts = v.splitn(3, ':');
            (
                parts.next().unwrap_or("").to_string(),
                parts.next().unwrap_or("").to_string(),
            )
        })
        .collect()
}

// ---- Metrics in PromQL -----------------------------------------------------

/// `agentq_*` names in a PromQL expression, with histogram suffixes removed.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(p) = expr[i..].find("agentq_") {
        let start = i + p;
        let word_start =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if word_start {
            let mut name = &expr[start..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix)
                    && METRICS.contains(&base)
                {
                    name = base;
                }
            }
            out.insert(name.to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// The `agentq_*` names of `expr`, panicking (naming `what`) on any that
/// agentq does not export.
pub fn assert_known_metrics(what: &str, expr: &str) -> BTreeSet<String> {
    let names = metric_names(expr);
    for n in &names {
        assert!(
            METRICS.contains(&n.as_str()),
            "{what}: unknown metric {n} in {expr:?} (agentq exports: {METRICS:?})"
        );
    }
    names
}

// ---- The runbook -----------------------------------------------------------

/// GitHub's heading anchors: lower case, punctuation dropped, spaces to '-'.
pub fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of docs/runbook.md's headings.
pub fn runbook_anchors() -> BTreeSet<String> {
    read("docs/runbook.md")
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

/// The first ```` ```sql ```` block of docs/runbook.md after `marker` (the
/// comment that names the test running it).
pub fn runbook_sql_block(marker: &str, what: &str) -> String {
    let doc = read("docs/runbook.md");
    let pos = doc
        .find(marker)
        .unwrap_or_else(|| panic!("docs/runbook.md: marker of {what}"));
    let rest = &doc[pos..];
    let start = rest
        .find("```sql\n")
        .expect("```sql block after the marker")
        + 7;
    let len = rest[start..].find("```").expect("end of the sql block");
    rest[start..start + len].to_string()
}
