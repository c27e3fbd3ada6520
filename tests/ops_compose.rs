//! Operations assets: `docker/compose.yml` (Redis with AOF, PostgreSQL,
//! migrations, two workers, Prometheus, Grafana) and the YAML reading the
//! ops tests share. The Dockerfile and its build context: tests/ops_docker.rs.

mod common;

use common::ops::{Yaml, YamlExt, parse_yaml, read, read_yaml, root, volumes, words};

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
    let c = parse_yaml(&text).expect("docker/compose.yml");
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
    assert_eq!(
        worker.path(&["deploy", "replicas"]).and_then(Yaml::as_u64),
        Some(2)
    );
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
    if let Some(entries) = services.as_mapping() {
        for name in entries.keys().filter_map(Yaml::as_str) {
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

    // That the image builds (every file cargo needs is in the context and
    // copied, task kinds only with DEMO_TASKS=1) is tests/ops_docker.rs's
    // job: it replays docker/Dockerfile's build stages on the context.
}

/// The YAML constructs the assets use read as they mean: comments, anchors
/// and `<<` merges (explicit keys win), quoted and plain scalars, flow and
/// block sequences (also at the key's indentation), nested sequences, block
/// scalars and `{}`; bad indentation is refused.
#[test]
fn yaml_reading_handles_what_the_assets_use() {
    let y = parse_yaml(
        "# comment\nx: &base\n  a: 1\n  b: [\"p, q\", 'it''s', r]  # trailing\nlist:\n  - name: one\n    v: \"x: y\"\n  - plain\n  -\n    - nested\nblock: |\n  line one\n\n    indented\nnext: 2\nm:\n  <<: *base\n  a: 9\nempty: {}\nseq_same_indent:\n- s1\n- s2\n",
    )
    .expect("valid YAML");
    assert_eq!(y.path(&["x", "a"]).and_then(Yaml::as_u64), Some(1));
    assert_eq!(
        y.path(&["x", "b"]),
        Some(&Yaml::Sequence(vec![
            Yaml::String("p, q".into()),
            Yaml::String("it's".into()),
            Yaml::String("r".into())
        ]))
    );
    let list = y.get("list").expect("list").seq();
    assert_eq!(list[0].str_at(&["v"]), Some("x: y"));
    assert_eq!(list[1].as_str(), Some("plain"));
    assert_eq!(list[2].seq()[0].as_str(), Some("nested"));
    assert_eq!(y.str_at(&["block"]), Some("line one\n\n  indented\n"));
    assert_eq!(y.get("next").and_then(Yaml::as_u64), Some(2));
    assert_eq!(
        y.path(&["m", "a"]).and_then(Yaml::as_u64),
        Some(9),
        "explicit key wins over the merge"
    );
    assert_eq!(y.path(&["m", "b"]), y.path(&["x", "b"]), "merged key");
    assert_eq!(
        y.get("empty"),
        Some(&Yaml::Mapping(serde_norway::Mapping::new()))
    );
    assert_eq!(y.get("seq_same_indent").expect("seq").seq().len(), 2);
    assert!(
        parse_yaml("a: 1\n   b: 2\n").is_err(),
        "bad indentation is refused"
    );
}

/// The value after `flag` in a command's words (`--flag value`).
fn flag_value<'a>(cmd: &'a [String], flag: &str) -> Option<&'a str> {
    cmd.iter()
        .position(|w| w == flag)
        .and_then(|i| cmd.get(i + 1))
        .map(String::as_str)
}

/// The HTTP API, Redis's memory limit, the `ha` profile (replica and
/// Sentinels, and the URL workers switch to), Alertmanager, and Prometheus
/// scraping serve.
#[test]
fn compose_runs_serve_limits_redis_and_has_an_ha_profile_and_alertmanager() {
    let text = read("docker/compose.yml");
    let c = parse_yaml(&text).expect("docker/compose.yml");
    let svc = |name: &str| {
        c.get("services")
            .and_then(|s| s.get(name))
            .unwrap_or_else(|| panic!("service {name}"))
    };
    let profiles = |name: &str| words(svc(name).get("profiles"));

    // serve: all interfaces, published, health-checked, metrics for Prometheus.
    let serve = svc("serve");
    assert!(profiles("serve").is_empty(), "serve starts with `up`");
    assert_eq!(serve.str_at(&["image"]), svc("worker").str_at(&["image"]));
    let cmd = words(serve.get("command"));
    assert_eq!(cmd.first().map(String::as_str), Some("serve"));
    let listen = flag_value(&cmd, "--listen").expect("serve --listen");
    let port = listen
        .strip_prefix("0.0.0.0:")
        .unwrap_or_else(|| panic!("serve listens on all interfaces: --listen {listen}"));
    let published: Vec<String> = words(serve.get("ports"));
    assert!(
        published
            .iter()
            .any(|p| p.rsplit_once(':').is_some_and(|(_, c)| c == port)),
        "serve publishes its port {port}: {published:?}"
    );
    let hc = words(serve.path(&["healthcheck", "test"])).join(" ");
    assert!(
        hc.contains("python3") && hc.contains(&format!("127.0.0.1:{port}/healthz")),
        "serve healthcheck (python3, no curl in the image) on its port: {hc}"
    );
    assert_eq!(
        serve.str_at(&["depends_on", "migrate", "condition"]),
        Some("service_completed_successfully"),
        "serve reads API keys from the migrated database"
    );
    assert!(
        serve
            .str_at(&["environment", "AGENTQ_DATABASE_URL"])
            .is_some()
    );
    let metrics = flag_value(&cmd, "--metrics-addr").expect("serve --metrics-addr");
    let metrics_port: u64 = metrics
        .strip_prefix("0.0.0.0:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("serve --metrics-addr {metrics}"));

    // Prometheus scrapes serve, in a job of its own (the worker alerts
    // count job="agentq").
    let prom = read_yaml("docker/prometheus/prometheus.yml");
    let jobs = prom.get("scrape_configs").expect("scrape_configs").seq();
    let serve_job = jobs
        .iter()
        .find(|j| {
            j.get("dns_sd_configs")
                .map(Yaml::seq)
                .unwrap_or(&[])
                .iter()
                .any(|sd| {
                    sd.get("names")
                        .map(Yaml::seq)
                        .unwrap_or(&[])
                        .iter()
                        .any(|n| n.as_str() == Some("serve"))
                        && sd.get("port").and_then(Yaml::as_u64) == Some(metrics_port)
                })
        })
        .expect("prometheus.yml scrapes the serve service on its metrics port");
    assert_ne!(serve_job.str_at(&["job_name"]), Some("agentq"));
    let deps = svc("prometheus").get("depends_on").expect("depends_on");
    let deps: Vec<&str> = match deps {
        Yaml::Sequence(s) => s.iter().filter_map(Yaml::as_str).collect(),
        Yaml::Mapping(m) => m.keys().filter_map(Yaml::as_str).collect(),
        _ => Vec::new(),
    };
    for d in ["worker", "serve", "alertmanager"] {
        assert!(deps.contains(&d), "prometheus depends on {d}: {deps:?}");
    }
    assert!(
        profiles("alertmanager").is_empty(),
        "alertmanager starts with `up`"
    );

    // Redis: a memory limit from the environment with a default, and
    // noeviction, so full means refused writes (503), not an OOM kill.
    let redis = words(svc("redis").get("command"));
    let maxmemory = flag_value(&redis, "--maxmemory").expect("redis --maxmemory");
    let default = maxmemory
        .strip_prefix("${REDIS_MAXMEMORY:-")
        .and_then(|d| d.strip_suffix('}'))
        .unwrap_or_else(|| panic!("--maxmemory ${{REDIS_MAXMEMORY:-<default>}}: {maxmemory}"));
    let digits = default.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    assert!(
        digits.parse::<u64>().is_ok_and(|n| n > 0)
            && ["", "kb", "mb", "gb"].contains(&default[digits.len()..].to_lowercase().as_str()),
        "a Redis size for the default maxmemory: {default}"
    );
    assert_eq!(flag_value(&redis, "--maxmemory-policy"), Some("noeviction"));
    assert!(profiles("redis").is_empty());

    // ha: one replica of `redis` and three Sentinels, only with --profile ha.
    let services = c
        .get("services")
        .and_then(Yaml::as_mapping)
        .expect("services");
    let ha: Vec<&str> = services
        .keys()
        .filter_map(Yaml::as_str)
        .filter(|n| profiles(n).iter().any(|p| p == "ha"))
        .collect();
    let replicas: Vec<&str> = ha
        .iter()
        .copied()
        .filter(|n| {
            let cmd = words(svc(n).get("command"));
            cmd.first().map(String::as_str) == Some("redis-server")
                && cmd
                    .windows(3)
                    .any(|w| w == ["--replicaof", "redis", "6379"])
        })
        .collect();
    assert_eq!(
        replicas.len(),
        1,
        "one replica of redis in the ha profile: {ha:?}"
    );
    let replica = words(svc(replicas[0]).get("command"));
    assert_eq!(flag_value(&replica, "--maxmemory"), Some(maxmemory));
    assert_eq!(
        flag_value(&replica, "--maxmemory-policy"),
        Some("noeviction")
    );
    let sentinels: Vec<&str> = ha
        .iter()
        .copied()
        .filter(|n| {
            words(svc(n).get("command"))
                .join(" ")
                .contains("redis-sentinel")
        })
        .collect();
    assert_eq!(
        sentinels.len(),
        3,
        "three Sentinels in the ha profile: {ha:?}"
    );

    // Each Sentinel copies the read-only template into a writable volume of
    // its own and runs on the copy.
    let conf = read("docker/redis/sentinel.conf");
    let mut data_volumes = std::collections::BTreeSet::new();
    for s in &sentinels {
        let mounts = volumes(&c, s);
        let (_, template) = mounts
            .iter()
            .find(|(src, _)| src == "./redis/sentinel.conf")
            .unwrap_or_else(|| panic!("{s} mounts ./redis/sentinel.conf: {mounts:?}"));
        let v: Vec<&str> = svc(s)
            .get("volumes")
            .map(Yaml::seq)
            .unwrap_or(&[])
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        assert!(
            v.iter()
                .any(|m| m.starts_with("./redis/sentinel.conf:") && m.ends_with(":ro")),
            "{s}: the template is mounted read-only"
        );
        let script = words(svc(s).get("command")).join(" ");
        let runs = script
            .split("redis-sentinel ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("{s}: redis-sentinel <config>: {script}"));
        assert_ne!(
            runs, template,
            "{s} must run on a writable copy, not the template"
        );
        assert!(
            script.contains(&format!("cp {template} {runs}")),
            "{s} copies {template} to {runs}: {script}"
        );
        let (vol, _) = mounts
            .iter()
            .find(|(_, d)| runs.starts_with(&format!("{d}/")))
            .unwrap_or_else(|| panic!("{s}: {runs} is on a volume: {mounts:?}"));
        assert!(
            !vol.starts_with('.'),
            "{s}: a named volume, not a bind mount"
        );
        assert!(data_volumes.insert(vol.clone()), "{s}: a volume of its own");
    }
    let monitor: Vec<&str> = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("sentinel monitor "))
        .expect("sentinel.conf: sentinel monitor")
        .split_whitespace()
        .collect();
    let [name, host, port, quorum] = monitor[..] else {
        panic!("sentinel monitor <name> <host> <port> <quorum>: {monitor:?}");
    };
    assert_eq!((host, port, quorum), ("redis", "6379", "2"));
    let resolve = conf
        .lines()
        .position(|l| l.trim() == "sentinel resolve-hostnames yes")
        .expect("Sentinels resolve the compose service name");
    assert!(
        resolve
            < conf
                .lines()
                .position(|l| l.contains("sentinel monitor"))
                .unwrap_or(0),
        "resolve-hostnames before the monitor line"
    );

    // The header tells how to switch workers to the Sentinels, with a URL
    // fred (agentq's Redis client) reads as these three Sentinels and name.
    let url = text
        .lines()
        .filter(|l| l.starts_with('#'))
        .find_map(|l| {
            let at = l.find("redis-sentinel://")?;
            let rest = &l[at..];
            let end = rest.find(['\'', ' ', '"']).unwrap_or(rest.len());
            Some(rest[..end].to_string())
        })
        .filter(|u| !u.contains(":PASSWORD@"))
        .expect("the compose header documents the redis-sentinel:// URL");
    let cfg = fred::prelude::Config::from_url(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
    let fred::prelude::ServerConfig::Sentinel {
        hosts,
        service_name,
        ..
    } = cfg.server
    else {
        panic!("{url} is not a Sentinel URL for fred");
    };
    assert_eq!(service_name, name, "the name the Sentinels monitor");
    let mut got: Vec<String> = hosts
        .iter()
        .map(|h| format!("{}:{}", h.host, h.port))
        .collect();
    got.sort();
    let mut want: Vec<String> = sentinels.iter().map(|s| format!("{s}:26379")).collect();
    want.sort();
    assert_eq!(got, want, "the URL names every Sentinel");
    assert!(
        text.contains("--profile ha"),
        "the header says how to start the ha profile"
    );
    // Workers pick the URL up from the environment.
    let url_env = svc("worker")
        .str_at(&["environment", "AGENTQ_REDIS_URL"])
        .expect("worker AGENTQ_REDIS_URL");
    assert!(
        url_env.starts_with("${AGENTQ_REDIS_URL:-redis://redis:6379}"),
        "AGENTQ_REDIS_URL can be switched from the environment: {url_env}"
    );
}
