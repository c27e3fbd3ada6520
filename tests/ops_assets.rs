//! Operations assets: the ledger backup and restore scripts against the real
//! PostgreSQL, the Prometheus alert rules and configuration (with `promtool`
//! when it is installed, structurally always), the Grafana dashboard, and
//! docker/compose.yml.
//!
//! The YAML files are read with a small parser for the subset they use
//! (block mappings and sequences, quoted and plain scalars, block scalars,
//! one-line flow sequences, anchors and `<<` merges); it panics with the line
//! number on anything else, so a change outside the subset fails loudly.

use std::collections::{BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Command, Output};

use agentq::ledger;
use futures::FutureExt;
use sqlx::PgPool;

/// Every metric agentq exports (without histogram suffixes).
const METRICS: &[&str] = &[
    "agentq_jobs_enqueued_total",
    "agentq_jobs_started_total",
    "agentq_jobs_completed_total",
    "agentq_jobs_retried_total",
    "agentq_jobs_dead_lettered_total",
    "agentq_completions_refused_total",
    "agentq_lease_expiries_total",
    "agentq_ledger_rows_written_total",
    "agentq_ledger_write_errors_total",
    "agentq_ledger_rejects_total",
    "agentq_cost_micros_total",
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

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn database_url() -> String {
    std::env::var("AGENTQ_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run a script of scripts/ (directly: it must be executable) with extra env.
fn script(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(root().join("scripts").join(name));
    c.args(args).current_dir(root()).env_remove("LEDGER_SCHEMA");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output()
        .unwrap_or_else(|e| panic!("run scripts/{name}: {e}"))
}

// ---------------------------------------------------------------------------
// Ledger backup and restore against the real PostgreSQL.

#[allow(clippy::too_many_arguments)]
fn record(
    job: &str,
    attempt: i32,
    tenant: &str,
    outcome: &str,
    finished_at: i64,
    run_ms: i64,
    cost_micros: i64,
    tokens: i64,
) -> ledger::Record {
    ledger::Record {
        job_id: job.into(),
        attempt,
        tenant: tenant.into(),
        queue: "default".into(),
        kind: "agent-sim".into(),
        outcome: outcome.into(),
        enqueued_at: finished_at - run_ms - 25,
        started_at: finished_at - run_ms,
        finished_at,
        wait_ms: 25,
        run_ms,
        cpu_ms: run_ms / 3,
        peak_rss_bytes: 3 << 20,
        exit_code: if outcome == "succeeded" {
            Some(0)
        } else {
            Some(1)
        },
        signal: None,
        worker: "w1".into(),
        api_calls: 2,
        input_tokens: tokens,
        output_tokens: tokens / 2,
        cost_micros,
        error: if outcome == "succeeded" {
            String::new()
        } else {
            "boom".into()
        },
    }
}

/// Every row of the ledger tables as text (with the partition of each ledger
/// row), in a stable order.
async fn snapshot(pool: &PgPool) -> Vec<String> {
    let mut out = Vec::new();
    for (name, sql) in [
        (
            "ledger",
            "SELECT tableoid::regclass::text || ' ' || t::text FROM usage_ledger t ORDER BY job_id, attempt",
        ),
        (
            "daily",
            "SELECT d::text FROM usage_daily d ORDER BY tenant, day",
        ),
        ("tenants", "SELECT t::text FROM tenants t ORDER BY name"),
        ("tiers", "SELECT t::text FROM tiers t ORDER BY name"),
    ] {
        let rows: Vec<String> = sqlx::query_scalar(sql)
            .fetch_all(pool)
            .await
            .unwrap_or_else(|e| panic!("snapshot {name}: {e}"));
        out.extend(rows.into_iter().map(|r| format!("{name}: {r}")));
    }
    // The HTTP API's keys, where the migrations have them: backed up too.
    let keys: Option<String> = sqlx::query_scalar("SELECT to_regclass('api_keys')::text")
        .fetch_one(pool)
        .await
        .expect("to_regclass");
    if keys.is_some() {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT k::text FROM api_keys k ORDER BY k::text")
                .fetch_all(pool)
                .await
                .expect("snapshot api_keys");
        out.push(format!("api_keys: table with {} rows", rows.len()));
        out.extend(rows.into_iter().map(|r| format!("api_keys: {r}")));
    }
    out
}

async fn daily(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT d::text FROM usage_daily d ORDER BY tenant, day")
        .fetch_all(pool)
        .await
        .expect("usage_daily")
}

/// The SQL block the runbook marks as tested ("Rebuild usage_daily").
fn runbook_rebuild_sql() -> String {
    let doc = read("docs/runbook.md");
    let marker = doc
        .find("tests/ops_assets.rs runs the SQL block below")
        .expect("docs/runbook.md: marker of the tested SQL block");
    let rest = &doc[marker..];
    let start = rest
        .find("```sql\n")
        .expect("```sql block after the marker")
        + 7;
    let len = rest[start..].find("```").expect("end of the sql block");
    rest[start..start + len].to_string()
}

#[tokio::test]
async fn ledger_backup_restores_rows_partitions_and_rollup_exactly() {
    let url = database_url();
    let schema = format!("t_ops_backup_{:08x}", rand::random::<u32>());
    let admin = ledger::connect(&url, None)
        .await
        .expect("connect to PostgreSQL (set AGENTQ_DATABASE_URL)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("create schema");

    let body = AssertUnwindSafe(backup_restore_round_trip(&url, &schema)).catch_unwind();
    let result = body.await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&admin)
    .await
    .expect("drop schema");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn backup_restore_round_trip(url: &str, schema: &str) {
    // A migrated ledger with rows in this month and in an old month (its own
    // partition), two tenants, several outcomes, and a tier.
    let pool = ledger::connect(url, Some(schema)).await.expect("connect");
    ledger::migrate(&pool).await.expect("migrate");
    let now = chrono::Utc::now().timestamp_millis();
    let old = chrono::DateTime::parse_from_rfc3339("2025-01-15T12:00:00Z")
        .expect("date")
        .timestamp_millis();
    let records = vec![
        record("0-a1", 1, "acme", "failed", now - 5000, 1200, 170, 100),
        record("0-a1", 2, "acme", "succeeded", now - 1000, 2300, 330, 200),
        record("0-a2", 1, "acme", "timed_out", old, 30_000, 5000, 0),
        record("0-g1", 1, "globex", "succeeded", now, 800, 90, 40),
        record("0-g2", 1, "globex", "lost", old + 3_600_000, 400, 40, 0),
    ];
    assert_eq!(ledger::insert(&pool, &records).await.expect("insert"), 5);
    sqlx::query("INSERT INTO tiers (name, settings) VALUES ('pro', '{\"weight\": 3}'::jsonb)")
        .execute(&pool)
        .await
        .expect("tier");
    let before = snapshot(&pool).await;
    assert!(
        before
            .iter()
            .any(|r| r.starts_with("ledger: usage_ledger_2025_01 ")),
        "the old rows sit in their own partition: {before:#?}"
    );
    assert_eq!(
        before.iter().filter(|r| r.starts_with("ledger:")).count(),
        5
    );

    // Back up.
    let dir = tempfile::tempdir().expect("tempdir");
    let dump = dir.path().join("ledger.dump");
    let dump_s = dump.to_str().expect("utf-8 path");
    let o = script(
        "ledger-backup.sh",
        &[url, dump_s],
        &[("LEDGER_SCHEMA", schema)],
    );
    assert!(o.status.success(), "backup failed: {}", show(&o));
    assert!(dump.is_file(), "no dump written");
    let out = String::from_utf8_lossy(&o.stdout);
    for t in [
        "usage_ledger ",
        "usage_ledger_2025_01",
        "usage_daily",
        "tenants",
        "tiers",
    ] {
        assert!(out.contains(t), "backup summary names {t}: {out}");
    }
    let has_keys = before.iter().any(|r| r.starts_with("api_keys: table"));
    assert_eq!(
        out.contains("api_keys"),
        has_keys,
        "api_keys backed up where it exists: {out}"
    );

    // A schema that does not exist fails and leaves no file behind.
    let missing = dir.path().join("missing.dump");
    let o = script(
        "ledger-backup.sh",
        &[url, missing.to_str().expect("utf-8")],
        &[("LEDGER_SCHEMA", &format!("{schema}_nope"))],
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(!missing.exists(), "a failed backup must leave no file");
    assert!(
        std::fs::read_dir(dir.path()).expect("ls").all(|e| !e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .contains("partial")),
        "no partial file left behind"
    );

    // Disaster: the ledger schema is gone.
    pool.close().await;
    let admin = ledger::connect(url, None).await.expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&admin)
        .await
        .expect("drop schema");

    // Asking for another schema than the backup holds is bad usage.
    let o = script(
        "ledger-restore.sh",
        &[url, dump_s],
        &[("LEDGER_SCHEMA", "some_other_schema")],
    );
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));

    // Restore (creates the schema), then migrate as documented.
    let o = script(
        "ledger-restore.sh",
        &[url, dump_s],
        &[("LEDGER_SCHEMA", schema)],
    );
    assert!(o.status.success(), "restore failed: {}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("usage_ledger rows: 5") && out.contains("agentq migrate"),
        "restore summary: {out}"
    );

    // A second restore onto the restored tables is refused, changing nothing.
    let o = script("ledger-restore.sh", &[url, dump_s], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already has ledger tables"),
        "{}",
        show(&o)
    );

    let pool = ledger::connect(url, Some(schema)).await.expect("connect");
    let helper: Option<String> =
        sqlx::query_scalar("SELECT to_regproc('agentq_ensure_ledger_partition')::text")
            .fetch_one(&pool)
            .await
            .expect("to_regproc");
    assert_eq!(
        helper, None,
        "the dump holds tables only: `agentq migrate` recreates the partition function"
    );
    ledger::migrate(&pool)
        .await
        .expect("migrate the restored ledger");
    let after = snapshot(&pool).await;
    assert_eq!(
        before, after,
        "restored ledger differs from the backed-up one"
    );

    let policies: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_policies WHERE schemaname = current_schema() \
         AND tablename IN ('usage_ledger', 'usage_daily')",
    )
    .fetch_one(&pool)
    .await
    .expect("policies");
    assert_eq!(policies, 2, "row-level security policies restored");

    // The restored ledger takes writes as before: a replay of the outbox
    // inserts nothing, a new attempt (in a month with no partition yet)
    // lands and is rolled up.
    assert_eq!(
        ledger::insert(&pool, &records).await.expect("replay"),
        0,
        "replayed records must be skipped"
    );
    let future = chrono::DateTime::parse_from_rfc3339("2031-03-03T03:03:03Z")
        .expect("date")
        .timestamp_millis();
    let new = record("0-n1", 1, "initech", "succeeded", future, 1000, 100, 10);
    assert_eq!(ledger::insert(&pool, &[new]).await.expect("insert"), 1);
    let partition: String = sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM usage_ledger WHERE job_id = '0-n1'",
    )
    .fetch_one(&pool)
    .await
    .expect("partition");
    assert_eq!(partition, "usage_ledger_2031_03");

    // The runbook's rebuild of usage_daily reproduces the writers' rollup.
    let rollup = daily(&pool).await;
    assert_eq!(rollup.len(), 5, "rollup rows: {rollup:#?}");
    sqlx::query("UPDATE usage_daily SET attempts = attempts + 100, cost_micros = 0")
        .execute(&pool)
        .await
        .expect("damage the rollup");
    sqlx::raw_sql(sqlx::AssertSqlSafe(runbook_rebuild_sql()))
        .execute(&pool)
        .await
        .expect("runbook SQL: rebuild usage_daily");
    assert_eq!(daily(&pool).await, rollup, "rebuilt rollup differs");
    pool.close().await;
}

#[test]
fn backup_and_restore_scripts_check_their_arguments() {
    for name in ["ledger-backup.sh", "ledger-restore.sh"] {
        let text = read(&format!("scripts/{name}"));
        assert!(
            text.starts_with("#!/usr/bin/env bash\n"),
            "{name}: bash shebang"
        );
        assert!(
            text.contains("set -euo pipefail"),
            "{name}: set -euo pipefail"
        );

        let o = script(name, &[], &[]);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{name} without arguments: {}",
            show(&o)
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("usage:"),
            "{}",
            show(&o)
        );
        let o = script(name, &["postgres://x@127.0.0.1/db"], &[]);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{name} with one argument: {}",
            show(&o)
        );
        let o = script(name, &["a", "b", "c"], &[]);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{name} with three arguments: {}",
            show(&o)
        );
        let o = script(name, &["--help"], &[]);
        assert_eq!(o.status.code(), Some(0), "{name} --help: {}", show(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("usage:"));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("x.dump");
    let out = out.to_str().expect("utf-8");
    let o = script(
        "ledger-backup.sh",
        &["postgres://x@127.0.0.1/db", out],
        &[("LEDGER_SCHEMA", "bad-name; drop")],
    );
    assert_eq!(o.status.code(), Some(2), "bad schema name: {}", show(&o));
    let o = script(
        "ledger-restore.sh",
        &["postgres://x@127.0.0.1/db", "/nonexistent/ledger.dump"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "missing file: {}", show(&o));
    let junk = dir.path().join("junk.dump");
    std::fs::write(&junk, "not a dump\n").expect("write");
    let o = script(
        "ledger-restore.sh",
        &["postgres://x@127.0.0.1/db", junk.to_str().expect("utf-8")],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "not a dump: {}", show(&o));

    if on_path("shellcheck") {
        let o = Command::new("shellcheck")
            .args(["scripts/ledger-backup.sh", "scripts/ledger-restore.sh"])
            .current_dir(root())
            .output()
            .expect("shellcheck");
        assert!(o.status.success(), "shellcheck: {}", show(&o));
    } else {
        eprintln!("shellcheck not on PATH: scripts checked by running them only");
    }
}

// ---------------------------------------------------------------------------
// Prometheus: alert rules, configuration.

/// `agentq_*` names in a PromQL expression, with histogram suffixes removed.
fn metric_names(expr: &str) -> BTreeSet<String> {
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

fn assert_known_metrics(what: &str, expr: &str) -> BTreeSet<String> {
    let names = metric_names(expr);
    for n in &names {
        assert!(
            METRICS.contains(&n.as_str()),
            "{what}: unknown metric {n} in {expr:?} (agentq exports: {METRICS:?})"
        );
    }
    names
}

/// GitHub's heading anchors: lower case, punctuation dropped, spaces to '-'.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn runbook_anchors() -> BTreeSet<String> {
    read("docs/runbook.md")
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

fn is_duration(s: &str) -> bool {
    // Prometheus durations: one or more <number><unit>, e.g. 5m, 1h30m.
    let mut digits = false;
    let mut units = 0;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits = true;
        } else if digits && "smhdwy".contains(c) {
            if c == 'm' && chars.peek() == Some(&'s') {
                chars.next();
            }
            digits = false;
            units += 1;
        } else {
            return false;
        }
    }
    !s.is_empty() && !digits && units > 0
}

struct Rule {
    alert: String,
    expr: String,
    severity: String,
    runbook_anchor: String,
}

/// Parse alerts.yml and check each rule's shape; returns the rules.
fn alert_rules() -> Vec<Rule> {
    let doc = parse_yaml(&read("docker/prometheus/alerts.yml"));
    let groups = doc.get("groups").expect("alerts.yml: groups").seq();
    assert!(!groups.is_empty(), "alerts.yml: no groups");
    let mut rules = Vec::new();
    for g in groups {
        let group = g.str_at(&["name"]).expect("group name").to_string();
        let list = g.get("rules").expect("group rules").seq();
        assert!(!list.is_empty(), "group {group}: no rules");
        for r in list {
            let alert = r
                .str_at(&["alert"])
                .unwrap_or_else(|| {
                    panic!(
                        "group {group}: a rule without `alert` (recording rules belong elsewhere)"
                    )
                })
                .to_string();
            let ctx = format!("alert {alert}");
            let expr = r
                .str_at(&["expr"])
                .unwrap_or_else(|| panic!("{ctx}: expr"))
                .trim()
                .to_string();
            assert!(!expr.is_empty(), "{ctx}: empty expr");
            let dur = r
                .str_at(&["for"])
                .unwrap_or_else(|| panic!("{ctx}: `for:` missing"));
            assert!(is_duration(dur), "{ctx}: `for: {dur}` is not a duration");
            let severity = r
                .str_at(&["labels", "severity"])
                .unwrap_or_else(|| panic!("{ctx}: labels.severity missing"))
                .to_string();
            assert!(
                ["info", "warning", "critical"].contains(&severity.as_str()),
                "{ctx}: severity {severity:?} is not info, warning or critical"
            );
            for a in ["summary", "description"] {
                let v = r
                    .str_at(&["annotations", a])
                    .unwrap_or_else(|| panic!("{ctx}: annotations.{a} missing"));
                assert!(!v.trim().is_empty(), "{ctx}: empty annotations.{a}");
            }
            let url = r
                .str_at(&["annotations", "runbook_url"])
                .unwrap_or_else(|| panic!("{ctx}: annotations.runbook_url missing"));
            let anchor = url
                .strip_prefix("docs/runbook.md#")
                .unwrap_or_else(|| {
                    panic!("{ctx}: runbook_url {url:?} should be docs/runbook.md#<anchor>")
                })
                .to_string();
            assert_known_metrics(&ctx, &expr);
            rules.push(Rule {
                alert,
                expr,
                severity,
                runbook_anchor: anchor,
            });
        }
    }
    rules
}

#[test]
fn alert_rules_are_complete_and_each_has_a_runbook_section() {
    let rules = alert_rules();
    let anchors = runbook_anchors();
    let mut names = BTreeSet::new();
    for r in &rules {
        assert!(names.insert(r.alert.clone()), "duplicate alert {}", r.alert);
        assert!(
            r.alert.starts_with("Agentq") && r.alert.chars().all(|c| c.is_ascii_alphanumeric()),
            "alert name {} should be CamelCase with the Agentq prefix",
            r.alert
        );
        assert!(
            anchors.contains(&r.runbook_anchor),
            "alert {}: docs/runbook.md has no heading for #{} (headings: {anchors:?})",
            r.alert,
            r.runbook_anchor
        );
        assert_eq!(
            r.runbook_anchor,
            r.alert.to_lowercase(),
            "alert {}: its runbook section is the heading `### {}`",
            r.alert,
            r.alert
        );
    }
    // Every alert section of the runbook belongs to an alert.
    for l in read("docs/runbook.md").lines() {
        if let Some(h) = l.strip_prefix("### Agentq") {
            let name = format!("Agentq{}", h.trim());
            assert!(
                names.contains(&name),
                "runbook section {name} has no alert rule"
            );
        }
    }

    // What the issue asks to alert on.
    let find = |pred: &dyn Fn(&Rule) -> bool, what: &str| {
        assert!(rules.iter().any(pred), "no alert rule for {what}");
    };
    find(
        &|r| r.expr.contains("deriv(agentq_ledger_outbox_backlog"),
        "a growing ledger outbox backlog",
    );
    find(
        &|r| r.expr.contains("agentq_ledger_write_errors_total"),
        "ledger write errors",
    );
    find(
        &|r| r.expr.contains("agentq_lease_expiries_total"),
        "lease expiries",
    );
    find(
        &|r| r.expr.contains("agentq_jobs_dead_lettered_total"),
        "dead-letter growth",
    );
    find(
        &|r| r.expr.contains("agentq_tenant_quota_use_ratio") && r.expr.contains(">= 0.8"),
        "a tenant at 80% of its quota",
    );
    find(
        &|r| r.expr.contains("agentq_tenant_quota_use_ratio") && r.expr.contains(">= 1"),
        "a tenant at 100% of its quota",
    );
    find(
        &|r| r.expr.contains("up{job=\"agentq\"} == 0"),
        "a worker that stops answering",
    );
    find(
        &|r| r.expr.contains("absent(up{job=\"agentq\"}") && r.severity == "critical",
        "all workers gone (critical)",
    );
}

/// `#anchor` after `needle` in `text`.
fn anchors_after<'t>(text: &'t str, needle: &str) -> Vec<&'t str> {
    text.match_indices(needle)
        .map(|(i, _)| {
            let rest = &text[i + needle.len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

#[test]
fn runbook_links_resolve() {
    let anchors = runbook_anchors();
    let doc = read("docs/runbook.md");
    let mut links: Vec<(String, String)> = anchors_after(&doc, "](#")
        .into_iter()
        .map(|a| ("docs/runbook.md".to_string(), a.to_string()))
        .collect();
    for f in [
        "scripts/ledger-backup.sh",
        "scripts/ledger-restore.sh",
        "docker/compose.yml",
        "docker/prometheus/alerts.yml",
        "docker/grafana/dashboards/agentq.json",
    ] {
        let text = read(f);
        links.extend(
            anchors_after(&text, "runbook.md#")
                .into_iter()
                .map(|a| (f.to_string(), a.to_string())),
        );
    }
    assert!(links.len() > 20, "links found: {links:?}");
    for (file, a) in links {
        assert!(
            anchors.contains(&a),
            "{file}: link to docs/runbook.md#{a}, which has no such heading"
        );
    }
}

#[test]
fn prometheus_scrapes_the_workers_and_loads_the_rules() {
    let cfg = parse_yaml(&read("docker/prometheus/prometheus.yml"));
    let rule_files: Vec<&str> = cfg
        .get("rule_files")
        .expect("rule_files")
        .seq()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(
        rule_files,
        ["alerts.yml"],
        "rule_files, relative to prometheus.yml"
    );
    assert!(root().join("docker/prometheus/alerts.yml").is_file());
    let job = cfg
        .get("scrape_configs")
        .expect("scrape_configs")
        .seq()
        .iter()
        .find(|j| j.str_at(&["job_name"]) == Some("agentq"))
        .expect("a scrape job named agentq (the alerts use job=\"agentq\")");
    let sd = job.get("dns_sd_configs").expect("dns_sd_configs").seq();
    assert_eq!(sd.len(), 1);
    let names: Vec<&str> = sd[0]
        .get("names")
        .expect("names")
        .seq()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(names, ["worker"], "the compose service name");
    assert_eq!(sd[0].str_at(&["type"]), Some("A"));
    assert_eq!(sd[0].str_at(&["port"]), Some("9464"));
}

/// promtool adds to the structural checks when installed (Debian package
/// `prometheus`). Set AGENTQ_REQUIRE_PROMTOOL=1 to fail where it is missing.
#[test]
fn promtool_checks_rules_config_and_rule_unit_tests() {
    if !on_path("promtool") {
        assert!(
            std::env::var_os("AGENTQ_REQUIRE_PROMTOOL").is_none(),
            "AGENTQ_REQUIRE_PROMTOOL is set but promtool is not on PATH (apt-get install prometheus)"
        );
        eprintln!(
            "promtool not on PATH: only the structural checks of alerts.yml and prometheus.yml ran \
             (apt-get install prometheus for `promtool check rules`, `check config`, `test rules`)"
        );
        return;
    }
    for args in [
        &["check", "rules", "docker/prometheus/alerts.yml"][..],
        &["check", "config", "docker/prometheus/prometheus.yml"][..],
        &["test", "rules", "docker/prometheus/alerts_test.yml"][..],
    ] {
        let o = Command::new("promtool")
            .args(args)
            .current_dir(root())
            .output()
            .expect("run promtool");
        assert!(
            o.status.success(),
            "promtool {}: {}",
            args.join(" "),
            show(&o)
        );
    }
    // The unit tests cover every alert.
    let tests = read("docker/prometheus/alerts_test.yml");
    for r in alert_rules() {
        assert!(
            tests.contains(&format!("alertname: {}\n", r.alert)),
            "docker/prometheus/alerts_test.yml has no test for {}",
            r.alert
        );
    }
}

// ---------------------------------------------------------------------------
// Grafana.

#[test]
fn grafana_dashboard_panels_query_agentq_metrics() {
    let text = read("docker/grafana/dashboards/agentq.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("agentq.json is valid JSON");
    assert_eq!(dash["uid"], "agentq");
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");

    let ds = parse_yaml(&read(
        "docker/grafana/provisioning/datasources/prometheus.yml",
    ));
    let ds_uid = ds.get("datasources").expect("datasources").seq()[0]
        .str_at(&["uid"])
        .expect("datasource uid")
        .to_string();

    let vars: BTreeSet<String> = dash["templating"]["list"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|v| v["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();

    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        panels.push(p);
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner); // collapsed rows
        }
    }
    let mut ids = BTreeSet::new();
    let mut all_exprs = Vec::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().expect("panel title");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id: {title}"
        );
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "{title}: gridPos.{k}");
        }
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: target without expr"));
            let names = assert_known_metrics(&format!("panel {title:?}"), expr);
            assert!(
                !names.is_empty(),
                "panel {title:?}: {expr:?} queries no agentq_ metric"
            );
            for v in ["$queue", "$tenant"] {
                if expr.contains(v) {
                    assert!(
                        vars.contains(&v[1..]),
                        "{title}: {v} is not a dashboard variable"
                    );
                }
            }
            let uid = t["datasource"]["uid"]
                .as_str()
                .or(p["datasource"]["uid"].as_str());
            assert_eq!(uid, Some(ds_uid.as_str()), "{title}: datasource uid");
            all_exprs.push(expr.to_string());
        }
    }
    // The panels the issue asks for.
    let has = |pred: &dyn Fn(&str) -> bool, what: &str| {
        assert!(all_exprs.iter().any(|e| pred(e)), "dashboard lacks {what}");
    };
    has(
        &|e| e.contains("rate(agentq_jobs_completed_total") && e.contains("by (outcome)"),
        "throughput by outcome",
    );
    for q in ["0.5", "0.99"] {
        has(
            &|e| {
                e.contains(&format!("histogram_quantile({q},"))
                    && e.contains("agentq_job_wait_seconds_bucket")
                    && e.contains("tenant")
            },
            "wait-time quantiles per tenant",
        );
    }
    has(
        &|e| e.contains("agentq_tenant_running"),
        "running per tenant",
    );
    has(&|e| e.contains("agentq_tenant_cap"), "cap per tenant");
    has(
        &|e| e.contains("agentq_tenants_throttled") && e.contains("reason"),
        "throttled by reason",
    );
    has(
        &|e| e.contains("agentq_ledger_outbox_backlog"),
        "outbox backlog",
    );
    has(
        &|e| e.contains("agentq_tenant_quota_use_ratio"),
        "quota use per tenant",
    );
    has(
        &|e| e.contains("rate(agentq_cost_micros_total") && e.contains("/ 1e6 * 3600"),
        "cost per tenant in $/hour",
    );

    // The provider loads the directory compose mounts the dashboards into.
    let prov = parse_yaml(&read("docker/grafana/provisioning/dashboards/agentq.yml"));
    let path = prov.get("providers").expect("providers").seq()[0]
        .str_at(&["options", "path"])
        .expect("provider path")
        .to_string();
    let compose = parse_yaml(&read("docker/compose.yml"));
    let mounts = volumes(&compose, "grafana");
    assert!(
        mounts
            .iter()
            .any(|(src, dst)| src == "./grafana/dashboards" && *dst == path),
        "grafana mounts ./grafana/dashboards at {path}: {mounts:?}"
    );
}

// ---------------------------------------------------------------------------
// docker/compose.yml and the Dockerfile.

/// (source, target) of a service's volumes.
fn volumes(compose: &Yaml, service: &str) -> Vec<(String, String)> {
    compose
        .get("services")
        .and_then(|s| s.get(service))
        .and_then(|s| s.get("volumes"))
        .map(|v| v.seq())
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

fn words(v: Option<&Yaml>) -> Vec<String> {
    match v {
        Some(Yaml::Seq(items)) => items
            .iter()
            .filter_map(Yaml::as_str)
            .map(String::from)
            .collect(),
        Some(Yaml::Str(s)) => s.split_whitespace().map(String::from).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn compose_file_wires_redis_postgres_migrate_workers_prometheus_grafana() {
    let text = read("docker/compose.yml");
    // Line-based, as an operator reads it.
    for s in [
        "redis",
        "postgres",
        "migrate",
        "worker",
        "prometheus",
        "grafana",
    ] {
        assert!(
            text.lines().any(|l| l == format!("  {s}:")),
            "docker/compose.yml: no service {s}"
        );
    }
    let c = parse_yaml(&text);
    let svc = |name: &str| {
        c.get("services")
            .and_then(|s| s.get(name))
            .unwrap_or_else(|| panic!("service {name}"))
    };

    let redis = svc("redis");
    assert!(
        redis
            .str_at(&["image"])
            .is_some_and(|i| i.starts_with("redis:7"))
    );
    let cmd = words(redis.get("command")).join(" ");
    assert!(
        cmd.contains("--appendonly yes") && cmd.contains("--appendfsync everysec"),
        "redis with AOF, fsync every second: {cmd}"
    );
    assert!(
        text.contains("always"),
        "the AOF trade-off comment mentions appendfsync always"
    );
    assert!(volumes(&c, "redis").iter().any(|(_, d)| d == "/data"));

    let pg = svc("postgres");
    assert!(
        pg.str_at(&["image"])
            .is_some_and(|i| i.starts_with("postgres:16"))
    );
    assert!(
        words(pg.path(&["healthcheck", "test"]))
            .iter()
            .any(|w| w == "pg_isready")
    );
    assert!(
        volumes(&c, "postgres")
            .iter()
            .any(|(_, d)| d == "/var/lib/postgresql/data")
    );

    let migrate = svc("migrate");
    assert_eq!(migrate.str_at(&["build", "context"]), Some(".."));
    let dockerfile = migrate
        .str_at(&["build", "dockerfile"])
        .expect("dockerfile");
    assert!(
        root().join(dockerfile).is_file(),
        "{dockerfile} relative to the context"
    );
    assert_eq!(words(migrate.get("command")), ["migrate"]);
    assert_eq!(
        migrate.str_at(&["depends_on", "postgres", "condition"]),
        Some("service_healthy")
    );

    let worker = svc("worker");
    assert_eq!(
        worker.str_at(&["image"]),
        migrate.str_at(&["image"]),
        "same image"
    );
    assert_eq!(worker.str_at(&["build", "dockerfile"]), Some(dockerfile));
    let cmd = words(worker.get("command"));
    assert_eq!(cmd.first().map(String::as_str), Some("worker"));
    let joined = cmd.join(" ");
    assert!(joined.contains("--queues default"), "{joined}");
    assert!(joined.contains("--concurrency 8"), "{joined}");
    assert!(
        joined.contains("--metrics-addr 0.0.0.0:9464"),
        "port prometheus.yml scrapes: {joined}"
    );
    assert_eq!(worker.str_at(&["deploy", "replicas"]), Some("2"));
    assert_eq!(
        worker.str_at(&["depends_on", "migrate", "condition"]),
        Some("service_completed_successfully")
    );
    let hc = words(worker.path(&["healthcheck", "test"])).join(" ");
    assert!(
        hc.contains("python3") && hc.contains("/healthz"),
        "worker healthcheck: {hc}"
    );
    for k in ["AGENTQ_REDIS_URL", "AGENTQ_DATABASE_URL"] {
        assert!(
            worker.str_at(&["environment", k]).is_some(),
            "worker env {k}"
        );
    }
    assert!(
        worker.get("ports").is_none(),
        "replicas cannot publish the same host port"
    );

    let prom = volumes(&c, "prometheus");
    for (src, dst) in [
        (
            "./prometheus/prometheus.yml",
            "/etc/prometheus/prometheus.yml",
        ),
        ("./prometheus/alerts.yml", "/etc/prometheus/alerts.yml"),
    ] {
        assert!(
            prom.iter().any(|(s, d)| s == src && d == dst),
            "prometheus mounts {src}: {prom:?}"
        );
    }
    let graf = volumes(&c, "grafana");
    assert!(
        graf.iter()
            .any(|(s, d)| s == "./grafana/provisioning/datasources"
                && d == "/etc/grafana/provisioning/datasources"),
        "grafana datasource provisioning: {graf:?}"
    );
    assert!(
        graf.iter()
            .any(|(s, d)| s == "./grafana/provisioning/dashboards"
                && d == "/etc/grafana/provisioning/dashboards"),
        "grafana dashboard provisioning: {graf:?}"
    );

    // Every bind mount's source exists (relative to docker/).
    let services = c.get("services").expect("services");
    if let Yaml::Map(entries) = services {
        for (name, _) in entries {
            for (src, _) in volumes(&c, name) {
                if src.starts_with('.') {
                    let p = root().join("docker").join(&src);
                    assert!(
                        p.exists(),
                        "service {name}: bind mount source {src} ({}) missing",
                        p.display()
                    );
                }
            }
        }
    }

    // The image builds: sqlx::migrate! embeds migrations/ at compile time,
    // and the task programs ship in the runtime image.
    let df = read("docker/Dockerfile");
    for dir in ["src", "migrations", "benches", "workers"] {
        assert!(
            df.lines()
                .any(|l| l.starts_with("COPY") && l.contains(&format!(" {dir} "))),
            "docker/Dockerfile copies {dir}/"
        );
    }
    let ignore = read("docker/Dockerfile.dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        "build context excludes target/"
    );
}

// ---------------------------------------------------------------------------
// A YAML subset parser (see the module comment).

#[derive(Clone, Debug, PartialEq)]
enum Yaml {
    Map(Vec<(String, Yaml)>),
    Seq(Vec<Yaml>),
    Str(String),
    Null,
}

impl Yaml {
    fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn path(&self, keys: &[&str]) -> Option<&Yaml> {
        keys.iter().try_fold(self, |v, k| v.get(k))
    }
    fn str_at(&self, keys: &[&str]) -> Option<&str> {
        self.path(keys).and_then(Yaml::as_str)
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Yaml::Str(s) => Some(s),
            _ => None,
        }
    }
    fn seq(&self) -> &[Yaml] {
        match self {
            Yaml::Seq(s) => s,
            _ => &[],
        }
    }
}

fn parse_yaml(src: &str) -> Yaml {
    let lines: Vec<(usize, &str)> = src
        .lines()
        .enumerate()
        .map(|(n, l)| {
            let content = l.trim_start_matches(' ');
            assert!(
                !content.starts_with('\t'),
                "line {}: tab indentation is not YAML",
                n + 1
            );
            (l.len() - content.len(), content.trim_end())
        })
        .collect();
    let mut p = YamlParser {
        lines,
        i: 0,
        anchors: HashMap::new(),
    };
    let doc = match p.peek() {
        Some((indent, _)) => p.block(indent, None),
        None => Yaml::Null,
    };
    if let Some((_, rest)) = p.peek() {
        panic!("line {}: unexpected {rest:?} (indentation?)", p.i + 1);
    }
    doc
}

struct YamlParser<'a> {
    lines: Vec<(usize, &'a str)>,
    i: usize,
    anchors: HashMap<String, Yaml>,
}

impl<'a> YamlParser<'a> {
    /// The next line that is neither blank nor a comment.
    fn peek(&mut self) -> Option<(usize, &'a str)> {
        while let Some(&(indent, c)) = self.lines.get(self.i) {
            let document_start = c == "---" && indent == 0 && self.i == 0;
            if c.is_empty() || c.starts_with('#') || document_start {
                self.i += 1;
            } else {
                return Some((indent, c));
            }
        }
        None
    }

    fn line(&self) -> usize {
        self.i + 1
    }

    /// A mapping or a sequence whose entries sit at `indent`; `first` is an
    /// entry already taken from a `- ` line.
    fn block(&mut self, indent: usize, first: Option<&'a str>) -> Yaml {
        let head = match first {
            Some(f) => f,
            None => self.peek().map(|(_, c)| c).unwrap_or(""),
        };
        if head == "-" || head.starts_with("- ") {
            self.seq(indent, first)
        } else {
            self.map(indent, first)
        }
    }

    fn seq(&mut self, indent: usize, mut first: Option<&'a str>) -> Yaml {
        let mut items = Vec::new();
        loop {
            let content = match first.take() {
                Some(f) => f,
                None => match self.peek() {
                    Some((ind, c)) if ind == indent && (c == "-" || c.starts_with("- ")) => {
                        self.i += 1;
                        c
                    }
                    _ => break,
                },
            };
            let rest = content[1..].trim_start();
            let col = indent + (content.len() - rest.len());
            if rest.is_empty() {
                match self.peek() {
                    Some((ind, _)) if ind > indent => items.push(self.block(ind, None)),
                    _ => items.push(Yaml::Null),
                }
            } else if rest == "-" || rest.starts_with("- ") || split_key(rest).is_some() {
                items.push(self.block(col, Some(rest)));
            } else {
                items.push(self.value(rest, indent));
            }
        }
        Yaml::Seq(items)
    }

    fn map(&mut self, indent: usize, mut first: Option<&'a str>) -> Yaml {
        let mut entries: Vec<(String, Yaml)> = Vec::new();
        let mut merged_keys: BTreeSet<String> = BTreeSet::new();
        loop {
            let content = match first.take() {
                Some(f) => f,
                None => match self.peek() {
                    Some((ind, c)) if ind == indent && !(c == "-" || c.starts_with("- ")) => {
                        self.i += 1;
                        c
                    }
                    Some((ind, c)) if ind > indent => {
                        panic!("line {}: unexpected indentation at {c:?}", self.line())
                    }
                    _ => break,
                },
            };
            let (key, rest) = split_key(content).unwrap_or_else(|| {
                panic!(
                    "line {}: expected `key: value`, got {content:?}",
                    self.line()
                )
            });
            let value = self.value(rest, indent);
            if key == "<<" {
                let Yaml::Map(merged) = value else {
                    panic!("line {}: `<<` needs a mapping alias", self.line())
                };
                // Keys given explicitly win over merged ones.
                for (k, v) in merged {
                    if !entries.iter().any(|(e, _)| *e == k) {
                        merged_keys.insert(k.clone());
                        entries.push((k, v));
                    }
                }
            } else if let Some(pos) = entries.iter().position(|(e, _)| *e == key) {
                assert!(
                    merged_keys.remove(&key),
                    "line {}: duplicate key {key}",
                    self.line()
                );
                entries[pos].1 = value;
            } else {
                entries.push((key, value));
            }
        }
        Yaml::Map(entries)
    }

    /// The value after `key:` (or after `- `) of an entry at `indent`.
    fn value(&mut self, rest: &'a str, indent: usize) -> Yaml {
        let mut rest = rest;
        let mut anchor = None;
        if let Some(a) = rest.strip_prefix('&') {
            let end = a.find(' ').unwrap_or(a.len());
            anchor = Some(a[..end].to_string());
            rest = a[end..].trim_start();
        }
        let v = if let Some(alias) = rest.strip_prefix('*') {
            self.anchors
                .get(alias.trim())
                .cloned()
                .unwrap_or_else(|| panic!("line {}: unknown alias *{alias}", self.line()))
        } else if rest.is_empty() || rest.starts_with('#') {
            match self.peek() {
                Some((ind, _)) if ind > indent => self.block(ind, None),
                Some((ind, c)) if ind == indent && (c == "-" || c.starts_with("- ")) => {
                    self.seq(indent, None)
                }
                _ => Yaml::Null,
            }
        } else if rest.starts_with('|') || rest.starts_with('>') {
            self.block_scalar(indent, rest.starts_with('>'))
        } else {
            scalar(rest).unwrap_or_else(|e| panic!("line {}: {e}", self.line()))
        };
        if let Some(a) = anchor {
            self.anchors.insert(a, v.clone());
        }
        v
    }

    /// Lines indented deeper than `indent` (blank ones included), dedented.
    fn block_scalar(&mut self, indent: usize, folded: bool) -> Yaml {
        let mut body: Vec<(usize, &str)> = Vec::new();
        while let Some(&(ind, c)) = self.lines.get(self.i) {
            if !c.is_empty() && ind <= indent {
                break;
            }
            body.push((ind, c));
            self.i += 1;
        }
        while body.last().is_some_and(|(_, c)| c.is_empty()) {
            body.pop();
        }
        let min = body
            .iter()
            .filter(|(_, c)| !c.is_empty())
            .map(|(i, _)| *i)
            .min()
            .unwrap_or(0);
        let lines: Vec<String> = body
            .iter()
            .map(|(i, c)| {
                if c.is_empty() {
                    String::new()
                } else {
                    format!("{}{c}", " ".repeat(i - min))
                }
            })
            .collect();
        Yaml::Str(lines.join(if folded { " " } else { "\n" }))
    }
}

/// `key: rest` -> (key, rest); None if the line is not a mapping entry.
fn split_key(content: &str) -> Option<(String, &str)> {
    let (key, after) = if let Some(q) = content.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let (k, used) = quoted(content, q).ok()?;
        (k, &content[used..])
    } else {
        let idx = content
            .find(": ")
            .or_else(|| content.ends_with(':').then(|| content.len() - 1))?;
        let k = &content[..idx];
        if k.contains(" #") || k.starts_with('[') || k.starts_with('{') {
            return None;
        }
        (k.trim_end().to_string(), &content[idx..])
    };
    let after = after.strip_prefix(':')?;
    if !(after.is_empty() || after.starts_with(' ')) {
        return None;
    }
    Some((key, after.trim_start()))
}

/// A quoted scalar at the start of `s`: its text and the bytes consumed.
fn quoted(s: &str, q: char) -> Result<(String, usize), String> {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1).peekable();
    while let Some((i, c)) = chars.next() {
        if c == q {
            if q == '\'' && chars.peek().map(|(_, n)| *n) == Some('\'') {
                chars.next();
                out.push('\'');
                continue;
            }
            return Ok((out, i + 1));
        }
        if q == '"' && c == '\\' {
            match chars.next().map(|(_, e)| e) {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(e) => out.push(e),
                None => break,
            }
            continue;
        }
        out.push(c);
    }
    Err(format!("unterminated quoted string in {s:?}"))
}

/// A scalar, a one-line flow sequence, or `{}`; trailing comments dropped.
fn scalar(s: &str) -> Result<Yaml, String> {
    let s = s.trim();
    if let Some(q) = s.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let (text, used) = quoted(s, q)?;
        let tail = s[used..].trim();
        if !(tail.is_empty() || tail.starts_with('#')) {
            return Err(format!("text after a quoted string: {s:?}"));
        }
        return Ok(Yaml::Str(text));
    }
    if let Some(inner) = s.strip_prefix('[') {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = inner.char_indices();
        let mut closed = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '"' | '\'' => {
                    let (_, used) = quoted(&inner[i..], c)?;
                    let text = &inner[i..i + used];
                    cur.push_str(text);
                    for _ in 1..text.chars().count() {
                        chars.next();
                    }
                }
                ',' => {
                    items.push(scalar(&cur)?);
                    cur.clear();
                }
                ']' => {
                    closed = Some(i);
                    break;
                }
                '[' | '{' => {
                    return Err(format!("nested flow collections are not supported: {s:?}"));
                }
                _ => cur.push(c),
            }
        }
        let end = closed.ok_or_else(|| format!("flow sequence must close on its line: {s:?}"))?;
        if !cur.trim().is_empty() {
            items.push(scalar(&cur)?);
        }
        let tail = inner[end + 1..].trim();
        if !(tail.is_empty() || tail.starts_with('#')) {
            return Err(format!("text after a flow sequence: {s:?}"));
        }
        return Ok(Yaml::Seq(items));
    }
    if s.starts_with('{') {
        return if s == "{}" {
            Ok(Yaml::Map(Vec::new()))
        } else {
            Err(format!("flow mappings are not supported: {s:?}"))
        };
    }
    let plain = match s.find(" #") {
        Some(i) => s[..i].trim_end(),
        None => s,
    };
    Ok(Yaml::Str(plain.to_string()))
}

#[test]
fn yaml_subset_parser_reads_what_the_assets_use() {
    let y = parse_yaml(
        "# comment\nx: &base\n  a: 1\n  b: [\"p, q\", 'it''s', r]  # trailing\nlist:\n  - name: one\n    v: \"x: y\"\n  - plain\n  -\n    - nested\nblock: |\n  line one\n\n    indented\nnext: 2\nm:\n  <<: *base\n  a: 9\nempty: {}\nseq_same_indent:\n- s1\n- s2\n",
    );
    assert_eq!(y.str_at(&["x", "a"]), Some("1"));
    assert_eq!(
        y.path(&["x", "b"]),
        Some(&Yaml::Seq(vec![
            Yaml::Str("p, q".into()),
            Yaml::Str("it's".into()),
            Yaml::Str("r".into())
        ]))
    );
    let list = y.get("list").expect("list").seq();
    assert_eq!(list[0].str_at(&["v"]), Some("x: y"));
    assert_eq!(list[1].as_str(), Some("plain"));
    assert_eq!(list[2].seq()[0].as_str(), Some("nested"));
    assert_eq!(y.str_at(&["block"]), Some("line one\n\n  indented"));
    assert_eq!(y.str_at(&["next"]), Some("2"));
    assert_eq!(
        y.str_at(&["m", "a"]),
        Some("9"),
        "explicit key wins over the merge"
    );
    assert_eq!(y.path(&["m", "b"]), y.path(&["x", "b"]), "merged key");
    assert_eq!(y.get("empty"), Some(&Yaml::Map(Vec::new())));
    assert_eq!(y.get("seq_same_indent").expect("seq").seq().len(), 2);
    let p = std::panic::catch_unwind(|| parse_yaml("a: 1\n   b: 2\n"));
    assert!(p.is_err(), "bad indentation is refused");
}
