//! Operations assets: the Grafana dashboard
//! (`docker/grafana/dashboards/agentq.json`) and its provisioning: every
//! panel queries metrics agentq exports through the provisioned data
//! source, the panels the operators asked for are there, and compose
//! mounts the dashboards where the provider loads them.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::ops::{YamlExt, assert_known_metrics, read, read_yaml, volumes, words};

#[test]
fn grafana_dashboard_panels_query_agentq_metrics() {
    let text = read("docker/grafana/dashboards/agentq.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("agentq.json is valid JSON");
    assert_eq!(dash["uid"], "agentq");
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");

    let ds = read_yaml("docker/grafana/provisioning/datasources/prometheus.yml");
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
    has(
        &|e| e.contains("topk(") && e.contains("agentq_cost_month_to_date_micros"),
        "cost per tenant, top N",
    );
    has(
        &|e| e.contains("agentq_cost_projected_month_micros"),
        "month-end cost projection",
    );

    // The provider loads the directory compose mounts the dashboards into.
    let prov = read_yaml("docker/grafana/provisioning/dashboards/agentq.yml");
    let path = prov.get("providers").expect("providers").seq()[0]
        .str_at(&["options", "path"])
        .expect("provider path")
        .to_string();
    let compose = read_yaml("docker/compose.yml");
    let mounts = volumes(&compose, "grafana");
    assert!(
        mounts
            .iter()
            .any(|(src, dst)| src == "./grafana/dashboards" && *dst == path),
        "grafana mounts ./grafana/dashboards at {path}: {mounts:?}"
    );
}

/// How a metric is recorded (the `metrics` macro its constant goes through).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Which agentq process records each metric of src/metrics.rs: `worker`
/// (every worker; the sampler and ledger-writer duties run in workers too)
/// or `serve` (`agentq_jobs_enqueued_total`: the jobs `agentq serve`
/// created over HTTP; the CLI's enqueues and jobs enqueued through the
/// published Redis script or another client are not in it, which is why
/// the dashboard reads the sampler's `agentq_jobs_submitted_total`). A dashboard may only read what a process that
/// compose's Prometheus scrapes records.
const EMITTERS: &[(&str, Kind, &str)] = &[
    ("agentq_jobs_enqueued_total", Kind::Counter, "serve"),
    ("agentq_jobs_submitted_total", Kind::Gauge, "worker"), // the sampler, from Redis
    ("agentq_jobs_started_total", Kind::Counter, "worker"),
    ("agentq_jobs_completed_total", Kind::Counter, "worker"),
    ("agentq_jobs_retried_total", Kind::Counter, "worker"),
    ("agentq_jobs_dead_lettered_total", Kind::Counter, "worker"),
    ("agentq_completions_refused_total", Kind::Counter, "worker"),
    ("agentq_lease_expiries_total", Kind::Counter, "worker"),
    (
        "agentq_schedule_slots_refused_total",
        Kind::Counter,
        "worker",
    ),
    ("agentq_progress_reports_total", Kind::Counter, "worker"),
    ("agentq_tenants_throttled", Kind::Gauge, "worker"),
    ("agentq_job_wait_seconds", Kind::Histogram, "worker"),
    ("agentq_job_run_seconds", Kind::Histogram, "worker"),
    ("agentq_queue_jobs", Kind::Gauge, "worker"),
    ("agentq_tenant_running", Kind::Gauge, "worker"),
    ("agentq_tenant_cap", Kind::Gauge, "worker"),
    ("agentq_tenant_quota_use_ratio", Kind::Gauge, "worker"),
    ("agentq_worker_busy_slots", Kind::Gauge, "worker"),
    ("agentq_worker_slots", Kind::Gauge, "worker"),
    ("agentq_ledger_outbox_backlog", Kind::Gauge, "worker"),
    ("agentq_ledger_rows_written_total", Kind::Counter, "worker"),
    ("agentq_ledger_write_errors_total", Kind::Counter, "worker"),
    ("agentq_ledger_rejects_total", Kind::Counter, "worker"),
    ("agentq_cost_micros_total", Kind::Counter, "worker"),
    ("agentq_cost_month_to_date_micros", Kind::Gauge, "worker"), // the ledger writer, idle
    ("agentq_cost_projected_month_micros", Kind::Gauge, "worker"),
    ("agentq_agent_seconds_total", Kind::Gauge, "worker"), // fractional: see src/metrics.rs
    ("agentq_quota_alerts_total", Kind::Counter, "worker"),
    ("agentq_rate_alerts_total", Kind::Counter, "worker"),
];

/// `pub const NAME: &str = "agentq_...";` of src/metrics.rs: constant -> name.
fn metric_constants() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for l in read("src/metrics.rs").lines() {
        let Some(rest) = l.trim().strip_prefix("pub const ") else {
            continue;
        };
        let Some((ident, value)) = rest.split_once(": &str = \"") else {
            continue;
        };
        if let Some(name) = value.strip_suffix("\";")
            && name.starts_with("agentq_")
        {
            out.insert(ident.to_string(), name.to_string());
        }
    }
    out
}

/// The `.rs` files under `dir` (relative to the repository root).
fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Constant -> the kinds of `metrics` macro it is recorded through in src/.
fn recorded_kinds(consts: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<&'static str>> {
    let mut files = Vec::new();
    rust_files(&common::ops::root().join("src"), &mut files);
    let mut out: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read source");
        for kind in ["counter", "gauge", "histogram"] {
            let pat = format!("{kind}!(");
            for (at, _) in text.match_indices(&pat) {
                let arg = text[at + pat.len()..].trim_start();
                let ident: String = arg
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let ident = ident.rsplit("::").next().unwrap_or("").to_string();
                if consts.contains_key(&ident) {
                    out.entry(ident).or_default().insert(kind);
                }
            }
        }
    }
    out
}

/// Every `agentq_*` word of a PromQL expression, as written (suffixes kept).
fn raw_metric_words(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(p) = expr[i..].find("agentq_") {
        let start = i + p;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            out.insert(expr[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// The agentq processes compose's Prometheus scrapes: every scrape job's
/// targets (DNS service discovery names, static targets) that are compose
/// services running the agentq image, by their subcommand (`worker`, `serve`).
fn scraped_processes() -> BTreeSet<String> {
    let prom = read_yaml("docker/prometheus/prometheus.yml");
    let compose = read_yaml("docker/compose.yml");
    let mut hosts = Vec::new();
    for job in prom.get("scrape_configs").expect("scrape_configs").seq() {
        for sd in job.get("dns_sd_configs").map(|v| v.seq()).unwrap_or(&[]) {
            for n in sd.get("names").map(|v| v.seq()).unwrap_or(&[]) {
                hosts.extend(n.as_str().map(String::from));
            }
        }
        for sc in job.get("static_configs").map(|v| v.seq()).unwrap_or(&[]) {
            for t in sc.get("targets").map(|v| v.seq()).unwrap_or(&[]) {
                if let Some(t) = t.as_str() {
                    hosts.push(t.rsplit_once(':').map_or(t, |(h, _)| h).to_string());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    for h in hosts {
        let Some(svc) = compose.path(&["services", &h]) else {
            continue;
        };
        if svc.str_at(&["image"]) != Some("agentq:local") {
            continue;
        }
        if let Some(sub) = words(svc.get("command")).first() {
            out.insert(sub.clone());
        }
    }
    out
}

/// Every PromQL expression of a dashboard: panel targets (rows' panels
/// included) and query template variables, each with where it is.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<(String, String)> {
    fn panels(ps: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in ps.as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                if let Some(e) = t["expr"].as_str() {
                    out.push((format!("panel {title:?}"), e.to_string()));
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().unwrap_or("?");
        for q in [&v["definition"], &v["query"], &v["query"]["query"]] {
            if let Some(q) = q.as_str() {
                out.push((format!("variable ${name}"), q.to_string()));
            }
        }
    }
    out
}

/// Every metric a dashboard reads exists in src/metrics.rs (histograms with
/// their _bucket/_sum/_count series only) and is recorded by a process
/// compose's Prometheus scrapes. Enqueues counted only by the enqueuing
/// process (`agentq_jobs_enqueued_total`) are never scraped.
#[test]
fn every_dashboard_metric_is_emitted_by_a_scraped_process() {
    let consts = metric_constants();
    let names: BTreeSet<&str> = consts.values().map(String::as_str).collect();
    let table: BTreeMap<&str, (Kind, &str)> =
        EMITTERS.iter().map(|(n, k, p)| (*n, (*k, *p))).collect();
    assert_eq!(
        names,
        table.keys().copied().collect::<BTreeSet<_>>(),
        "EMITTERS in tests/ops_dashboard.rs lists every metric of src/metrics.rs"
    );
    assert_eq!(
        common::ops::METRICS
            .iter()
            .copied()
            .collect::<BTreeSet<_>>(),
        names,
        "tests/common/ops.rs METRICS lists every metric of src/metrics.rs"
    );
    // The table's kinds are how src/ records them.
    let recorded = recorded_kinds(&consts);
    for (ident, name) in &consts {
        let (kind, _) = table[name.as_str()];
        let want = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let got = recorded.get(ident).cloned().unwrap_or_default();
        assert_eq!(
            got,
            BTreeSet::from([want]),
            "{ident} ({name}) is recorded with {got:?} in src/, the table says {want}"
        );
    }

    let scraped = scraped_processes();
    assert!(
        scraped.contains("worker"),
        "prometheus.yml scrapes the compose workers: {scraped:?}"
    );
    let mut dashboards = 0;
    for e in std::fs::read_dir(common::ops::root().join("docker/grafana/dashboards"))
        .expect("docker/grafana/dashboards")
        .flatten()
    {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        dashboards += 1;
        let file = path.display().to_string();
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
        let exprs = dashboard_exprs(&dash);
        assert!(!exprs.is_empty(), "{file}: no expressions");
        for (what, expr) in exprs {
            for word in raw_metric_words(&expr) {
                let (base, kind) = if let Some((k, _)) = table.get(word.as_str()) {
                    assert!(
                        *k != Kind::Histogram,
                        "{file} {what}: histogram {word} is read through _bucket, _sum or _count: {expr:?}"
                    );
                    (word.as_str(), *k)
                } else {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| word.strip_suffix(s))
                        .filter(|b| table.get(b).is_some_and(|(k, _)| *k == Kind::Histogram))
                        .unwrap_or_else(|| {
                            panic!("{file} {what}: {word} is no metric of src/metrics.rs: {expr:?}")
                        });
                    (base, Kind::Histogram)
                };
                let _ = kind;
                let process = table[base].1;
                assert!(
                    scraped.contains(process),
                    "{file} {what}: {word} is recorded only by the {process} process, which \
                     compose's Prometheus does not scrape (it scrapes {scraped:?}): {expr:?}"
                );
            }
        }
    }
    assert!(dashboards > 0, "no dashboards in docker/grafana/dashboards");
}

/// promtool parses every dashboard expression (Grafana's variables replaced
/// by sample values), as a recording rule of a throwaway rules file. Set
/// AGENTQ_REQUIRE_PROMTOOL=1 to fail where promtool is missing.
#[test]
fn promtool_parses_every_dashboard_expression() {
    if !common::ops::on_path("promtool") {
        assert!(
            std::env::var_os("AGENTQ_REQUIRE_PROMTOOL").is_none(),
            "AGENTQ_REQUIRE_PROMTOOL is set but promtool is not on PATH (apt-get install prometheus)"
        );
        eprintln!("promtool not on PATH: dashboard expressions not parsed");
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for e in std::fs::read_dir(common::ops::root().join("docker/grafana/dashboards"))
        .expect("dashboards")
        .flatten()
    {
        if e.path().extension().is_none_or(|x| x != "json") {
            continue;
        }
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(e.path()).expect("read")).expect("JSON");
        for (what, expr) in dashboard_exprs(&dash) {
            if what.starts_with("variable") {
                continue; // label_values() is Grafana's, not PromQL
            }
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "15s")
                .replace("$queue", ".*")
                .replace("$tenant", ".*");
            n += 1;
            rules.push_str(&format!(
                "      - record: dashboard:expr{n}\n        expr: {}\n",
                serde_json::to_string(&expr).expect("quote")
            ));
        }
    }
    assert!(n > 0, "no panel expressions");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard_rules.yml");
    std::fs::write(&file, &rules).expect("write rules");
    let o = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("run promtool");
    assert!(
        o.status.success(),
        "promtool check rules on the dashboard expressions: {}\n{rules}",
        common::ops::show(&o)
    );
}
