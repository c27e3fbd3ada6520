//! Operations assets: the Prometheus alert rules
//! (`docker/prometheus/alerts.yml`) and configuration (`prometheus.yml`),
//! checked structurally always and with `promtool` when it is installed:
//! each rule's shape, its metrics, its runbook section, and the alerts
//! the operators asked for.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::ops::{
    Yaml, YamlExt, assert_known_metrics, on_path, read, read_yaml, root, runbook_anchors, show,
};

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
    let doc = read_yaml("docker/prometheus/alerts.yml");
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

#[test]
fn prometheus_scrapes_the_workers_and_loads_the_rules() {
    let cfg = read_yaml("docker/prometheus/prometheus.yml");
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
    assert_eq!(sd[0].get("port").and_then(Yaml::as_u64), Some(9464));
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
