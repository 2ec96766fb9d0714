//! Static checks on `compose.yaml`. The compose demo can't run where there is no Docker engine, so
//! this test guards what would otherwise only fail at `docker compose up`: the services' environment
//! against the contract, ports against HTTP_ADDR, mounted files, healthchecks, start-up ordering,
//! the NATS version, and the documented variables. A compose CLI's own validation runs too
//! (`docker-compose`, from PATH or `.tools/bin` where `scripts/install-deps.sh` puts it, or the
//! `docker compose` plugin); without one that test fails, unless `SAGA_SKIP_COMPOSE_CLI=1` says to
//! skip it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::{Mapping, Value};

/// The three services, the port each listens on, and the environment variables each reads.
const APP_SERVICES: [(&str, u16, &[&str]); 3] = [
    ("order", 8081, &["ORDER_DEADLINE_MS"]),
    ("inventory", 8082, &[]),
    (
        "payment",
        8083,
        &[
            "PAYMENT_GATEWAY_LATENCY_MS",
            "PAYMENT_GATEWAY_DECLINE_OVER_MINOR",
        ],
    ),
];

/// Environment variables every service reads.
const COMMON_ENV: [&str; 21] = [
    "NATS_URL",
    "NATS_USER",
    "NATS_PASSWORD",
    "DATABASE_URL",
    "HTTP_ADDR",
    "RUST_LOG",
    "LOG_FORMAT",
    "SQLITE_SYNCHRONOUS",
    "ADMIN_TOKEN",
    "STREAM_MAX_BYTES",
    "STREAM_REPLICAS",
    "HTTP_HEADER_TIMEOUT_MS",
    "HTTP_REQUEST_TIMEOUT_MS",
    "HTTP_MAX_IN_FLIGHT",
    "HTTP_MAX_CONNECTIONS",
    "OUTBOX_RETENTION",
    "INBOX_RETENTION",
    "DEAD_LETTER_RETENTION",
    "RETENTION_SWEEP_INTERVAL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the repository")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_root().join(relative))
        .unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

fn compose() -> Value {
    serde_yaml::from_str(&read("compose.yaml")).expect("compose.yaml is valid YAML")
}

fn services(doc: &Value) -> &Mapping {
    doc.get("services")
        .and_then(Value::as_mapping)
        .expect("compose.yaml has a `services` mapping")
}

fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
    services(doc)
        .get(name)
        .unwrap_or_else(|| panic!("compose.yaml has no service `{name}`"))
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A service's `environment`, in either the mapping or the list form.
fn environment(svc: &Value) -> BTreeMap<String, Option<String>> {
    match svc.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(k, v)| (scalar(k).expect("environment key"), scalar(v)))
            .collect(),
        Some(Value::Sequence(list)) => list
            .iter()
            .map(|item| {
                let item = scalar(item).expect("environment entry is a string");
                match item.split_once('=') {
                    Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                    None => (item, None),
                }
            })
            .collect(),
        Some(other) => panic!("environment is neither a mapping nor a list: {other:?}"),
    }
}

/// Every string inside `value`, depth first.
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Sequence(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Mapping(map) => map.values().for_each(|v| strings(v, out)),
        other => out.extend(scalar(other)),
    }
}

/// Published ports as (host port, container port).
fn published_ports(svc: &Value) -> Vec<(u16, u16)> {
    let Some(ports) = svc.get("ports").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|entry| match entry {
            Value::Mapping(long) => {
                let target = long.get("target").and_then(scalar).expect("port target");
                let published = long
                    .get("published")
                    .and_then(scalar)
                    .expect("published port");
                (
                    published.parse().expect("host port"),
                    target.parse().expect("container port"),
                )
            }
            short => {
                let short = scalar(short).expect("port entry");
                let without_protocol = short.split('/').next().unwrap_or_default();
                // [ip:]host:container; an IPv6 ip is bracketed, so split from the right.
                let mut parts = without_protocol.rsplitn(3, ':');
                let container = parts.next().expect("container port");
                let host = parts
                    .next()
                    .unwrap_or_else(|| panic!("port {short:?} publishes no fixed host port"));
                (
                    host.parse()
                        .unwrap_or_else(|_| panic!("host port in {short:?}")),
                    container
                        .parse()
                        .unwrap_or_else(|_| panic!("container port in {short:?}")),
                )
            }
        })
        .collect()
}

/// The http(s) URLs a healthcheck's `test` mentions.
fn healthcheck_urls(svc: &Value) -> Vec<String> {
    let Some(test) = svc.get("healthcheck").and_then(|h| h.get("test")) else {
        return Vec::new();
    };
    let mut words = Vec::new();
    strings(test, &mut words);
    words
        .iter()
        .flat_map(|w| w.split_whitespace())
        .filter_map(|w| {
            w.find("http://")
                .or_else(|| w.find("https://"))
                .map(|i| &w[i..])
        })
        .map(|u| u.trim_matches(|c| c == '"' || c == '\'').to_owned())
        .collect()
}

/// (port, path, query) of `http://host:port/path?query`.
fn split_url(url: &str) -> (Option<u16>, String, String) {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let (authority, path_and_query) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let port = authority.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
    let (path, query) = path_and_query
        .split_once('?')
        .map(|(p, q)| (p.to_owned(), q.to_owned()))
        .unwrap_or_else(|| (path_and_query.to_owned(), String::new()));
    (port, path, query)
}

#[test]
fn app_services_set_only_contract_environment_variables() {
    let doc = compose();
    for (name, _, extra) in APP_SERVICES {
        let env = environment(service(&doc, name));
        let allowed: BTreeSet<&str> = COMMON_ENV.iter().chain(extra.iter()).copied().collect();
        let unknown: Vec<&String> = env
            .keys()
            .filter(|k| !allowed.contains(k.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "{name} sets variables outside the contract: {unknown:?}"
        );

        for required in [
            "NATS_URL",
            "NATS_USER",
            "NATS_PASSWORD",
            "DATABASE_URL",
            "HTTP_ADDR",
        ] {
            assert!(
                env.get(required).is_some_and(Option::is_some),
                "{name} does not set {required}"
            );
        }
        let get = |k: &str| env[k].clone().unwrap_or_default();
        assert_eq!(
            get("NATS_USER"),
            name,
            "{name} connects to NATS as its own user"
        );
        assert_eq!(get("NATS_URL"), "nats://nats:4222", "{name} NATS_URL");
        let db = get("DATABASE_URL");
        assert!(
            db.starts_with(&format!("postgres://{name}:"))
                && db.ends_with(&format!("@postgres:5432/{name}")),
            "{name} uses its own role and database on the postgres service: {db}"
        );
    }
}

#[test]
fn published_ports_match_http_addr() {
    let doc = compose();
    for (name, port, _) in APP_SERVICES {
        let svc = service(&doc, name);
        let addr = environment(svc)
            .get("HTTP_ADDR")
            .cloned()
            .flatten()
            .unwrap_or_else(|| panic!("{name} sets no HTTP_ADDR"));
        let (host, listen_port) = addr.rsplit_once(':').expect("HTTP_ADDR is host:port");
        assert_eq!(
            host, "0.0.0.0",
            "{name} must listen on all interfaces inside its container"
        );
        let listen_port: u16 = listen_port.parse().expect("HTTP_ADDR port");
        assert_eq!(listen_port, port, "{name} HTTP_ADDR port");
        assert_eq!(
            published_ports(svc),
            vec![(port, port)],
            "{name} publishes exactly its HTTP_ADDR port, on the same host port"
        );
    }
}

#[test]
fn mounted_files_and_build_context_exist() {
    let doc = compose();
    let root = repo_root();
    let declared_volumes: BTreeSet<String> = doc
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|m| m.keys().filter_map(scalar).collect())
        .unwrap_or_default();
    for (name, svc) in services(&doc) {
        let name = scalar(name).unwrap();
        for volume in svc
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let source = match volume {
                Value::Mapping(long) => long.get("source").and_then(scalar),
                short => scalar(short).and_then(|s| s.split(':').next().map(str::to_owned)),
            }
            .unwrap_or_else(|| panic!("{name}: volume without a source: {volume:?}"));
            if source.starts_with('.') || source.starts_with('/') {
                let path = root.join(&source);
                assert!(
                    path.exists(),
                    "{name} mounts {source}, which is not in the repository"
                );
            } else {
                assert!(
                    declared_volumes.contains(&source),
                    "{name} uses volume {source}, not declared under top-level `volumes`"
                );
            }
        }
        if let Some(build) = svc.get("build") {
            let (context, dockerfile) = match build {
                Value::Mapping(b) => (
                    b.get("context")
                        .and_then(scalar)
                        .unwrap_or_else(|| ".".into()),
                    b.get("dockerfile")
                        .and_then(scalar)
                        .unwrap_or_else(|| "Dockerfile".into()),
                ),
                short => (scalar(short).expect("build context"), "Dockerfile".into()),
            };
            let dockerfile = root.join(&context).join(dockerfile);
            assert!(
                dockerfile.is_file(),
                "{name} builds from {}, which is missing",
                dockerfile.display()
            );
        }
    }
    for (name, _, _) in APP_SERVICES {
        assert!(
            service(&doc, name).get("build").is_some(),
            "{name} is built from the repository"
        );
    }
}

#[test]
fn healthchecks_probe_readyz_or_healthz() {
    let doc = compose();
    for (name, svc) in services(&doc) {
        let name = scalar(name).unwrap();
        for url in healthcheck_urls(svc) {
            let (_, path, _) = split_url(&url);
            // Third-party images have their own health routes.
            let own = match name.as_str() {
                "prometheus" => "/-/ready",
                "grafana" => "/api/health",
                _ => "/readyz",
            };
            assert!(
                path == "/readyz" || path == "/healthz" || path == own,
                "{name} healthcheck probes {url}; use /readyz or /healthz"
            );
        }
    }
    let dockerfile = read("Dockerfile");
    for (name, port, _) in APP_SERVICES {
        let svc = service(&doc, name);
        let urls = healthcheck_urls(svc);
        assert_eq!(urls.len(), 1, "{name} has one HTTP healthcheck: {urls:?}");
        let (probe_port, path, _) = split_url(&urls[0]);
        assert_eq!(
            (probe_port, path.as_str()),
            (Some(port), "/readyz"),
            "{name} healthcheck {}",
            urls[0]
        );
        // The probe runs inside the service's image: its tool must be installed there.
        let mut words = Vec::new();
        strings(&svc["healthcheck"]["test"], &mut words);
        for tool in ["curl", "wget"] {
            if words
                .iter()
                .any(|w| w == tool || w.starts_with(&format!("{tool} ")))
            {
                assert!(
                    dockerfile
                        .lines()
                        .any(|l| l.contains("apt-get install") && l.contains(tool)),
                    "{name} healthcheck uses {tool}, which the Dockerfile does not install"
                );
            }
        }
    }
    let nats = healthcheck_urls(service(&doc, "nats"));
    assert!(
        nats.iter().any(|u| {
            let (port, path, query) = split_url(u);
            port == Some(8222) && path == "/healthz" && query.contains("js-enabled-only=true")
        }),
        "nats healthcheck must probe :8222/healthz?js-enabled-only=true, found {nats:?}"
    );
}

#[test]
fn every_dependency_waits_for_health() {
    let doc = compose();
    for (name, svc) in services(&doc) {
        let name = scalar(name).unwrap();
        let Some(depends_on) = svc.get("depends_on") else {
            continue;
        };
        let depends_on = depends_on.as_mapping().unwrap_or_else(|| {
            panic!("{name}: depends_on must be a mapping with conditions, not a list")
        });
        for (dependency, settings) in depends_on {
            let dependency = scalar(dependency).unwrap();
            let condition = settings.get("condition").and_then(scalar);
            assert_eq!(
                condition.as_deref(),
                Some("service_healthy"),
                "{name} depends on {dependency} without condition: service_healthy"
            );
            assert!(
                service(&doc, &dependency).get("healthcheck").is_some(),
                "{name} waits for {dependency} to be healthy, but {dependency} has no healthcheck"
            );
        }
    }
    for (name, _, _) in APP_SERVICES {
        let deps = service(&doc, name)["depends_on"]
            .as_mapping()
            .cloned()
            .unwrap_or_default();
        for needed in ["nats", "postgres"] {
            assert!(deps.contains_key(needed), "{name} must wait for {needed}");
        }
    }
}

#[test]
fn nats_image_is_official_and_at_least_2_10() {
    let doc = compose();
    let nats = service(&doc, "nats");
    let image = nats
        .get("image")
        .and_then(scalar)
        .expect("nats has an image");
    let (repository, tag) = image
        .split_once(':')
        .unwrap_or_else(|| panic!("nats image {image} has no tag"));
    assert!(
        repository == "nats" || repository == "docker.io/library/nats",
        "nats uses the official image, not {repository}"
    );
    let mut numbers = tag.split(['.', '-']).map(|p| p.parse::<u32>());
    let version = match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor),
        _ => panic!("nats image tag {tag} does not start with a major.minor version"),
    };
    assert!(
        version >= (2, 10),
        "nats {tag} is older than 2.10 (2.9 ignores filter_subjects)"
    );

    let mut mounts = Vec::new();
    strings(nats.get("volumes").unwrap_or(&Value::Null), &mut mounts);
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./nats.conf:") && m.ends_with(":ro")),
        "nats mounts the repository's nats.conf read-only: {mounts:?}"
    );
}

#[test]
fn passwords_and_variables_are_wired_and_documented() {
    let doc = compose();
    let text = read("compose.yaml");
    let documented: BTreeSet<String> = read(".env.example")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .collect();
    // Every ${VAR} or ${VAR:-default} compose interpolates is in .env.example.
    let mut interpolated = BTreeSet::new();
    for (i, _) in text.match_indices("${") {
        let name: String = text[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        interpolated.insert(name);
    }
    let undocumented: Vec<_> = interpolated.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        ".env.example lacks {undocumented:?}"
    );

    // The nats container gets every variable nats.conf reads.
    let conf = read("nats.conf");
    let nats_env = environment(service(&doc, "nats"));
    for (i, _) in conf.match_indices("password: $") {
        let var: String = conf[i + "password: $".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            nats_env.contains_key(&var),
            "nats.conf reads ${var}, which the nats service does not set"
        );
    }

    // Each service's NATS password is the one nats.conf checks for its user.
    for (name, _, _) in APP_SERVICES {
        let env = environment(service(&doc, name));
        let password = env["NATS_PASSWORD"].clone().unwrap_or_default();
        let variable = format!("NATS_{}_PASSWORD", name.to_uppercase());
        assert!(
            password.starts_with(&format!("${{{variable}")),
            "{name}'s NATS_PASSWORD should come from ${variable}, found {password}"
        );
        assert_eq!(
            nats_env[&variable], env["NATS_PASSWORD"],
            "{name} and nats agree on the password default"
        );
    }
}

#[test]
fn secrets_are_required_never_defaulted() {
    let text = read("compose.yaml");
    for (i, _) in text.match_indices("${") {
        let var: String = text[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let rest = &text[i + 2 + var.len()..];
        if var.ends_with("_PASSWORD") || var.ends_with("_TOKEN") {
            assert!(
                rest.starts_with(":?"),
                "{var} must be required (${{{var}:?…}}), not defaulted"
            );
        }
    }
    // Every app service and the seed job get the admin token; the services log JSON and have
    // time to drain.
    let doc = compose();
    for (name, _, _) in APP_SERVICES {
        let svc = service(&doc, name);
        let env = environment(svc);
        assert!(env.contains_key("ADMIN_TOKEN"), "{name} gets ADMIN_TOKEN");
        assert_eq!(
            env["LOG_FORMAT"].as_deref(),
            Some("json"),
            "{name} logs JSON"
        );
        let grace = scalar(&svc["stop_grace_period"]).unwrap_or_default();
        assert_eq!(
            grace, "30s",
            "{name} stop_grace_period longer than its drain"
        );
    }
    assert!(environment(service(&doc, "seed")).contains_key("ADMIN_TOKEN"));
}

#[test]
fn prometheus_scrapes_every_service_and_grafana_shows_the_saga() {
    let config = "deploy/prometheus/prometheus.yml";
    let out = Command::new(std::env::var("PROMTOOL_BIN").unwrap_or_else(|_| "promtool".into()))
        .args(["check", "config"])
        .arg(repo_root().join(config))
        .output()
        .expect("promtool not found: scripts/install-deps.sh installs it (Debian's prometheus)");
    assert!(
        out.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let prom: Value = serde_yaml::from_str(&read(config)).expect("yaml");
    let mut targets = Vec::new();
    strings(&prom["scrape_configs"], &mut targets);
    for (name, port, _) in APP_SERVICES {
        assert!(
            targets.contains(&format!("{name}:{port}")),
            "Prometheus scrapes {name}:{port}: {targets:?}"
        );
    }
    let doc = compose();
    let exporter = service(&doc, "nats-exporter");
    let mut args = Vec::new();
    strings(&exporter["command"], &mut args);
    assert!(args.contains(&"http://nats:8222".to_owned()));
    assert!(targets.iter().any(|t| t.starts_with("nats-exporter:")));

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/saga.json")).expect("dashboard json");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    for metric in [
        "sagas_terminal_total",
        "saga_duration_seconds_bucket",
        "outbox_oldest_pending_age_seconds",
        "consumer_lag_messages",
        "dead_letters_stored",
        "payment_circuit_breaker_state",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric)),
            "the dashboard shows {metric}"
        );
    }
}

/// Every compose CLI available here validates the file; there must be at least one, or nothing
/// would ever check that `docker compose up` can read it.
#[test]
fn compose_cli_validates_the_file() {
    let root = repo_root();
    let installed = root.join(".tools/bin/docker-compose");
    let installed = installed.to_str().expect("UTF-8 path");
    let candidates: [(&str, &[&str]); 3] = [
        ("docker-compose", &[]),
        (installed, &[]),
        ("docker", &["compose"]),
    ];
    let mut ran = Vec::new();
    for (program, prefix) in candidates {
        let available = Command::new(program)
            .args(prefix)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        let label = [program]
            .iter()
            .chain(prefix)
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        if !available {
            continue;
        }
        // With every variable set (the documented placeholders), the file is valid...
        let output = Command::new(program)
            .args(prefix)
            .args([
                "--env-file",
                ".env.example",
                "-f",
                "compose.yaml",
                "config",
                "-q",
            ])
            .current_dir(&root)
            .output()
            .unwrap_or_else(|e| panic!("run {label}: {e}"));
        assert!(
            output.status.success(),
            "`{label} --env-file .env.example -f compose.yaml config -q` failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // ...and without them compose refuses, naming what is missing.
        let empty = root.join("target").join("compose-empty.env");
        std::fs::create_dir_all(empty.parent().expect("target dir")).expect("target dir");
        std::fs::write(&empty, "").expect("empty env file");
        let refused = Command::new(program)
            .args(prefix)
            .arg("--env-file")
            .arg(&empty)
            .args(["-f", "compose.yaml", "config", "-q"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(&root)
            .output()
            .unwrap_or_else(|e| panic!("run {label}: {e}"));
        assert!(
            !refused.status.success()
                && String::from_utf8_lossy(&refused.stderr).contains("in .env"),
            "`{label}` accepted compose.yaml with no secrets set:\n{}",
            String::from_utf8_lossy(&refused.stderr)
        );
        println!("`{label} -f compose.yaml config -q`: valid");
        ran.push(label);
    }
    if ran.is_empty() {
        if std::env::var("SAGA_SKIP_COMPOSE_CLI").as_deref() == Ok("1") {
            println!("SKIPPED (SAGA_SKIP_COMPOSE_CLI=1): no compose CLI validated compose.yaml");
            return;
        }
        panic!(
            "no compose CLI found (docker-compose on PATH or in .tools/bin, or `docker compose`): \
             run scripts/install-deps.sh, or set SAGA_SKIP_COMPOSE_CLI=1 to skip this check"
        );
    }
}

fn in_cluster_profile(svc: &Value) -> bool {
    let mut profiles = Vec::new();
    strings(svc.get("profiles").unwrap_or(&Value::Null), &mut profiles);
    profiles.iter().any(|p| p == "cluster")
}

/// The `cluster` profile: three NATS nodes, each running its `deploy/cluster` file (which includes
/// the one `nats.conf` and adds a name and the routes), and two replicas of each service on R3
/// streams, reaching all three nodes.
#[test]
fn cluster_profile_runs_three_nats_nodes_and_two_replicas_of_each_service() {
    let doc = compose();
    let nodes: Vec<String> = services(&doc)
        .iter()
        .filter(|(_, svc)| in_cluster_profile(svc))
        .filter(|(_, svc)| {
            svc.get("image")
                .and_then(scalar)
                .is_some_and(|i| i.starts_with("nats:"))
        })
        .filter_map(|(name, _)| scalar(name))
        .collect();
    assert_eq!(nodes, ["nats-1", "nats-2", "nats-3"], "the cluster's nodes");
    let routes: Vec<String> = nodes.iter().map(|n| format!("nats://{n}:6222")).collect();
    for node in &nodes {
        let svc = service(&doc, node);
        let file = format!("deploy/cluster/{node}.conf");
        let mut words = Vec::new();
        strings(&svc["command"], &mut words);
        assert!(
            words.contains(&format!("/etc/nats/{file}")),
            "{node} runs {file}: {words:?}"
        );
        let mut mounts = Vec::new();
        strings(svc.get("volumes").unwrap_or(&Value::Null), &mut mounts);
        for mount in [
            format!("./{file}:/etc/nats/{file}:ro"),
            "./nats.conf:/etc/nats/nats.conf:ro".to_owned(),
        ] {
            assert!(mounts.contains(&mount), "{node} mounts {mount}: {mounts:?}");
        }
        let conf = read(&file);
        assert!(
            conf.contains("include \"../../nats.conf\""),
            "{file} includes the one nats.conf rather than copying its users"
        );
        assert!(
            !conf
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.contains("users") || l.contains("accounts")),
            "{file} defines users of its own; they belong in nats.conf"
        );
        assert!(
            conf.contains(&format!("server_name: {node}")),
            "{file} name"
        );
        for route in &routes {
            assert!(conf.contains(route.as_str()), "{file} routes to {route}");
        }
        assert!(
            !healthcheck_urls(svc).is_empty(),
            "{node} has a healthcheck"
        );
        // nats-server itself reads the file, its include and the passwords it references.
        let mut check = Command::new(event_toolkit::testing::nats_server_binary());
        check.arg("-c").arg(repo_root().join(&file)).arg("-t");
        for user in ["ORDER", "INVENTORY", "PAYMENT", "PROVISION", "CLI"] {
            check.env(format!("NATS_{user}_PASSWORD"), "placeholder");
        }
        let out = check.output().expect("run nats-server -t");
        assert!(
            out.status.success(),
            "nats-server -t {file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let node_urls = nodes
        .iter()
        .map(|n| format!("nats://{n}:4222"))
        .collect::<Vec<_>>()
        .join(",");
    for (name, port, extra) in APP_SERVICES {
        let replicated = format!("{name}-cluster");
        let svc = service(&doc, &replicated);
        assert!(
            in_cluster_profile(svc),
            "{replicated} is in the cluster profile"
        );
        assert_eq!(
            svc["deploy"]["replicas"].as_u64(),
            Some(2),
            "{replicated} runs two replicas"
        );
        assert!(
            published_ports(svc).is_empty(),
            "{replicated}: two replicas cannot publish one host port"
        );
        assert_eq!(svc["command"], service(&doc, name)["command"]);
        let env = environment(svc);
        let allowed: BTreeSet<&str> = COMMON_ENV.iter().chain(extra.iter()).copied().collect();
        assert!(
            env.keys().all(|k| allowed.contains(k.as_str())),
            "{replicated} sets variables outside the contract: {:?}",
            env.keys()
        );
        let get = |k: &str| env.get(k).cloned().flatten().unwrap_or_default();
        assert_eq!(
            get("NATS_URL"),
            node_urls,
            "{replicated} reaches every node"
        );
        assert_eq!(
            get("STREAM_REPLICAS"),
            "3",
            "{replicated} streams on three nodes"
        );
        assert_eq!(get("NATS_USER"), name);
        assert_eq!(get("HTTP_ADDR"), format!("0.0.0.0:{port}"));
        assert_eq!(
            get("DATABASE_URL"),
            environment(service(&doc, name))["DATABASE_URL"]
                .clone()
                .unwrap_or_default()
        );
        let deps = svc["depends_on"].as_mapping().cloned().unwrap_or_default();
        for needed in nodes.iter().map(String::as_str).chain(["postgres"]) {
            assert!(deps.contains_key(needed), "{replicated} waits for {needed}");
        }
    }

    // A compose CLI, where there is one, reads the profile too.
    let root = repo_root();
    let installed = root.join(".tools/bin/docker-compose");
    for program in ["docker-compose", installed.to_str().expect("UTF-8 path")] {
        let Ok(out) = Command::new(program)
            .args(["--env-file", ".env.example", "-f", "compose.yaml"])
            .args(["--profile", "cluster", "config", "--services"])
            .current_dir(&root)
            .output()
        else {
            continue;
        };
        assert!(
            out.status.success(),
            "{program} --profile cluster config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed = String::from_utf8_lossy(&out.stdout);
        for name in nodes
            .iter()
            .cloned()
            .chain(APP_SERVICES.iter().map(|(n, _, _)| format!("{n}-cluster")))
        {
            assert!(listed.lines().any(|l| l == name), "{program} lists {name}");
        }
    }
}
