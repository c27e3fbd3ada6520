//! Operations assets: the Grafana dashboard
//! (`docker/grafana/dashboards/agentq.json`) and its provisioning: every
//! panel queries metrics agentq exports through the provisioned data
//! source, the panels the operators asked for are there, and compose
//! mounts the dashboards where the provider loads them.

mod common;

use std::collections::BTreeSet;

use common::ops::{YamlExt, assert_known_metrics, read, read_yaml, volumes};

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
