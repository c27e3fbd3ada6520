//! Operations assets: Alertmanager (`docker/alertmanager/alertmanager.yml`
//! and the `entrypoint.sh` that hands it its secrets) and how compose and
//! Prometheus wire it. Checked structurally always, and with `amtool` when
//! it is installed (Debian package `prometheus-alertmanager`): the config as
//! the entrypoint hands it over with sample secrets, the routes, and every
//! notification template.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::ops::{Yaml, YamlExt, on_path, read_yaml, root, show, volumes, words};

const CONFIG: &str = "docker/alertmanager/alertmanager.yml";
const ENTRYPOINT: &str = "docker/alertmanager/entrypoint.sh";

/// The receiver a top-level route with `severity="<sev>"` (or a regex
/// matcher naming it) sends to; the default receiver otherwise.
fn receiver_for(cfg: &Yaml, sev: &str) -> String {
    let route = cfg.get("route").expect("route");
    for r in route.get("routes").map(Yaml::seq).unwrap_or(&[]) {
        for m in r.get("matchers").map(Yaml::seq).unwrap_or(&[]) {
            let m = m.as_str().unwrap_or("").replace(' ', "");
            let hit = m == format!("severity=\"{sev}\"")
                || m.strip_prefix("severity=~\"")
                    .and_then(|v| v.strip_suffix('"'))
                    .is_some_and(|alts| alts.split('|').any(|a| a == sev));
            if hit {
                return r.str_at(&["receiver"]).expect("route receiver").into();
            }
        }
    }
    route
        .str_at(&["receiver"])
        .expect("default receiver")
        .into()
}

fn receiver<'a>(cfg: &'a Yaml, name: &str) -> &'a Yaml {
    cfg.get("receivers")
        .expect("receivers")
        .seq()
        .iter()
        .find(|r| r.str_at(&["name"]) == Some(name))
        .unwrap_or_else(|| panic!("{CONFIG}: no receiver {name}"))
}

/// Every `*_file` path of the receivers, with its field.
fn secret_files(cfg: &Yaml) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for r in cfg.get("receivers").expect("receivers").seq() {
        for (_, configs) in r.as_mapping().into_iter().flatten() {
            for c in configs.seq() {
                for (k, v) in c.as_mapping().into_iter().flatten() {
                    let (Some(k), Some(v)) = (k.as_str(), v.as_str()) else {
                        continue;
                    };
                    if k.ends_with("_file") {
                        out.push((k.to_string(), v.to_string()));
                    }
                }
            }
        }
    }
    out
}

/// Every string of the receivers holding a Go template (`{{`).
fn templates(cfg: &Yaml) -> Vec<String> {
    fn walk(v: &Yaml, out: &mut Vec<String>) {
        match v {
            Yaml::String(s) if s.contains("{{") => out.push(s.clone()),
            Yaml::Sequence(items) => items.iter().for_each(|i| walk(i, out)),
            Yaml::Mapping(m) => m.values().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(cfg.get("receivers").expect("receivers"), &mut out);
    out
}

#[test]
fn alertmanager_routes_critical_to_pagerduty_and_slack_and_warning_to_slack() {
    let cfg = read_yaml(CONFIG);
    let critical = receiver(&cfg, &receiver_for(&cfg, "critical"));
    assert!(
        critical.get("pagerduty_configs").is_some() && critical.get("slack_configs").is_some(),
        "critical alerts page (PagerDuty) and post to Slack: {critical:?}"
    );
    for sev in ["warning", "info"] {
        let r = receiver(&cfg, &receiver_for(&cfg, sev));
        assert!(
            r.get("slack_configs").is_some() && r.get("pagerduty_configs").is_none(),
            "{sev} alerts go to Slack and do not page: {r:?}"
        );
    }
    // Every severity alerts.yml uses is routed on purpose.
    let alerts = read_yaml("docker/prometheus/alerts.yml");
    for g in alerts.get("groups").expect("groups").seq() {
        for r in g.get("rules").expect("rules").seq() {
            let sev = r.str_at(&["labels", "severity"]).expect("severity");
            assert!(
                ["critical", "warning", "info"].contains(&sev),
                "alerts.yml: severity {sev} has no route"
            );
        }
    }

    // Secrets come from files the entrypoint writes, in the directory it
    // writes them to; no secret is inline.
    let files = secret_files(&cfg);
    let fields: BTreeSet<&str> = files.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        fields.contains("api_url_file") && fields.contains("routing_key_file"),
        "Slack and PagerDuty secrets through *_file fields: {files:?}"
    );
    let text = std::fs::read_to_string(root().join(CONFIG)).expect("config");
    for inline in ["api_url:", "routing_key:", "service_key:", "slack_api_url:"] {
        assert!(
            !text.lines().any(|l| l.trim_start().starts_with(inline)),
            "{CONFIG}: {inline} inline; use the *_file field"
        );
    }
    let entry = std::fs::read_to_string(root().join(ENTRYPOINT)).expect("entrypoint");
    let compose = read_yaml("docker/compose.yml");
    let am = compose
        .path(&["services", "alertmanager"])
        .expect("compose service alertmanager");
    let dir = am
        .str_at(&["environment", "ALERTMANAGER_SECRETS_DIR"])
        .expect("ALERTMANAGER_SECRETS_DIR");
    for (field, path) in &files {
        let (d, name) = path.rsplit_once('/').expect("absolute path");
        assert_eq!(d, dir, "{field}: {path} is in the secrets directory");
        assert!(
            entry.contains(&format!("\"$dir/{name}\"")),
            "{ENTRYPOINT} writes {name} ({field})"
        );
    }
    assert!(
        words(am.get("tmpfs")).iter().any(|t| t == dir),
        "the secrets directory is a tmpfs"
    );
    for var in ["SLACK_WEBHOOK_URL", "PAGERDUTY_ROUTING_KEY"] {
        assert!(
            am.str_at(&["environment", var]).is_some(),
            "compose passes {var} to alertmanager"
        );
        assert!(entry.contains(var), "{ENTRYPOINT} reads {var}");
    }
    assert!(
        am.str_at(&["image"])
            .is_some_and(|i| i.starts_with("prom/alertmanager:")),
        "the prom/alertmanager image"
    );
    let mounts = volumes(&compose, "alertmanager");
    for (src, dst) in [
        (
            "./alertmanager/alertmanager.yml",
            "/etc/alertmanager/alertmanager.yml",
        ),
        (
            "./alertmanager/entrypoint.sh",
            "/etc/alertmanager/entrypoint.sh",
        ),
    ] {
        assert!(
            mounts.iter().any(|(s, d)| s == src && d == dst),
            "alertmanager mounts {src} at {dst}: {mounts:?}"
        );
    }
    let ep = words(am.get("entrypoint"));
    assert!(
        ep.iter().any(|w| w == "/etc/alertmanager/entrypoint.sh"),
        "alertmanager starts through entrypoint.sh: {ep:?}"
    );
    assert!(
        words(am.get("command"))
            .iter()
            .any(|w| w == "--config.file=/etc/alertmanager/alertmanager.yml"),
        "alertmanager reads the mounted config"
    );

    // Prometheus sends its alerts there.
    let prom = read_yaml("docker/prometheus/prometheus.yml");
    let targets: Vec<&str> = prom
        .get("alerting")
        .and_then(|a| a.get("alertmanagers"))
        .expect("prometheus.yml: alerting.alertmanagers")
        .seq()
        .iter()
        .flat_map(|a| a.get("static_configs").map(Yaml::seq).unwrap_or(&[]))
        .flat_map(|s| s.get("targets").map(Yaml::seq).unwrap_or(&[]))
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(targets, ["alertmanager:9093"], "prometheus.yml alerting");
}

/// A container path of the alertmanager service, as the repository file
/// compose mounts there.
fn host_path(compose: &Yaml, container: &str) -> PathBuf {
    let (src, _) = volumes(compose, "alertmanager")
        .into_iter()
        .find(|(_, d)| d == container)
        .unwrap_or_else(|| panic!("alertmanager mounts nothing at {container}"));
    root().join("docker").join(src)
}

fn amtool(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("amtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run amtool")
}

/// amtool adds to the structural checks when installed (Debian package
/// `prometheus-alertmanager`). Set AGENTQ_REQUIRE_AMTOOL=1 to fail where it
/// is missing. The entrypoint runs as compose runs it, with sample secrets
/// holding the characters that break templated YAML, and a stand-in
/// `alertmanager` that records its arguments; amtool then checks the
/// config it was given, its routes, and renders every template.
#[test]
fn amtool_checks_the_config_the_entrypoint_hands_to_alertmanager() {
    if !on_path("amtool") {
        assert!(
            std::env::var_os("AGENTQ_REQUIRE_AMTOOL").is_none(),
            "AGENTQ_REQUIRE_AMTOOL is set but amtool is not on PATH (apt-get install prometheus-alertmanager)"
        );
        eprintln!(
            "amtool not on PATH: only the structural checks of {CONFIG} ran \
             (apt-get install prometheus-alertmanager for `amtool check-config`)"
        );
        return;
    }
    let compose = read_yaml("docker/compose.yml");
    let am = compose
        .path(&["services", "alertmanager"])
        .expect("alertmanager");
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = tmp.path().join("bin");
    let secrets = tmp.path().join("secrets");
    std::fs::create_dir(&bin).expect("mkdir");
    let args_out = tmp.path().join("args");
    let shim = bin.join("alertmanager");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\n",
            args_out.display()
        ),
    )
    .expect("shim");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let slack = "https://hooks.slack.com/services/T000/B000/a&b|c/\"d\"#e";
    let pd = "0123456789abcdef&/|\"#";
    let entry = words(am.get("entrypoint"));
    assert_eq!(entry.first().map(String::as_str), Some("/bin/sh"));
    let script = host_path(&compose, &entry[1]);
    let command = words(am.get("command"));
    let o = Command::new("/bin/sh")
        .arg(&script)
        .args(&command)
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("SLACK_WEBHOOK_URL", slack)
        .env("PAGERDUTY_ROUTING_KEY", pd)
        .env("ALERTMANAGER_SECRETS_DIR", &secrets)
        .output()
        .expect("run entrypoint.sh");
    assert!(o.status.success(), "entrypoint.sh: {}", show(&o));
    let read = |name: &str| std::fs::read_to_string(secrets.join(name)).expect(name);
    assert_eq!(read("slack_api_url"), slack, "the Slack URL byte for byte");
    assert_eq!(
        read("pagerduty_routing_key"),
        pd,
        "the routing key byte for byte"
    );
    let mode = std::fs::metadata(secrets.join("slack_api_url"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "secrets readable by their owner only");
    let given = std::fs::read_to_string(&args_out).expect("alertmanager ran");
    let given: Vec<&str> = given.lines().collect();
    assert_eq!(given, command, "alertmanager gets compose's command");

    // The config alertmanager was given, as the repository file compose mounts.
    let cfg_path = given
        .iter()
        .find_map(|a| a.strip_prefix("--config.file="))
        .expect("--config.file");
    let cfg_file = host_path(&compose, cfg_path);
    let cfg_file = cfg_file.to_str().expect("utf-8 path");
    let o = amtool(&["check-config", cfg_file], tmp.path());
    assert!(o.status.success(), "amtool check-config: {}", show(&o));

    // Routes as amtool evaluates them.
    let cfg = read_yaml(CONFIG);
    for sev in ["critical", "warning", "info"] {
        let arg = format!("--config.file={cfg_file}");
        let label = format!("severity={sev}");
        let o = amtool(
            &[
                "config",
                "routes",
                "test",
                &arg,
                &label,
                "alertname=AgentqTest",
            ],
            tmp.path(),
        );
        let got = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert_eq!(
            got,
            receiver_for(&cfg, sev),
            "amtool routes severity={sev}: {}",
            show(&o)
        );
    }

    // check-config does not parse inline templates: render each one.
    let empty = tmp.path().join("empty.tmpl");
    std::fs::write(&empty, "").expect("empty template");
    let glob = format!("--template.glob={}", empty.display());
    let all = templates(&cfg);
    assert!(all.len() >= 4, "Slack and PagerDuty templates: {all:?}");
    for t in all {
        let text = format!("--template.text={t}");
        let o = amtool(&["template", "render", &glob, &text], tmp.path());
        assert!(o.status.success(), "template {t:?}: {}", show(&o));
    }
}
