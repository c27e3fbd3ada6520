//! Operations assets: `docker/compose.yml` (Redis with AOF, PostgreSQL,
//! migrations, two workers, Prometheus, Grafana), the Dockerfile and its
//! build context, and the YAML reading the ops tests share.

mod common;

use common::ops::{Yaml, YamlExt, parse_yaml, read, root, volumes, words};

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
