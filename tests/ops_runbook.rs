//! Operations assets: docs/runbook.md's links. Every `#anchor` the
//! runbook, the scripts, compose, the alert rules and the dashboard link
//! to is a heading of the runbook.

mod common;

use common::ops::{read, runbook_anchors};

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
