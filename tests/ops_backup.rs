//! Operations assets: the ledger backup and restore scripts
//! (`scripts/ledger-backup.sh`, `scripts/ledger-restore.sh`) against the
//! real PostgreSQL, and the runbook's rebuild of `usage_daily` on the
//! restored ledger.

mod common;

use std::panic::AssertUnwindSafe;
use std::process::{Command, Output};

use agentq::ledger;
use common::database_url;
use common::ops::{on_path, read, root, runbook_sql_block, show};
use futures::FutureExt;
use sqlx::PgPool;

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
        billing: String::new(),
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
    // docs/runbook.md still names this test by its old file.
    runbook_sql_block(
        "tests/ops_backup.rs runs the SQL block below",
        "the tested SQL block",
    )
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
