//! The deployment files, checked here without a Docker engine or a cluster: they parse, every
//! part is there with its health checks and probes, and every setting they pass is one of the
//! platform's real flags or environment variables with a value the platform accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{Args, FromArgMatches, ValueEnum};
use platform::settings::AssignmentMode;
use platform::{Part, Settings};
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `platform` command line as the binary builds it (`Settings`, plus the two settings
/// `main.rs` reads itself).
fn command() -> clap::Command {
    Settings::augment_args(clap::Command::new("platform").no_binary_name(true))
}

/// Environment variable → long flag, for every setting.
fn env_flags() -> BTreeMap<String, String> {
    let command = command();
    let mut flags = BTreeMap::new();
    for arg in command.get_arguments() {
        if let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) {
            flags.insert(env.to_string_lossy().into_owned(), long.to_owned());
        }
    }
    flags
}

/// Variables the binary reads outside `Settings` (checked against `main.rs` itself).
fn other_env() -> BTreeSet<&'static str> {
    let main = std::fs::read_to_string(root().join("src/main.rs")).expect("read src/main.rs");
    assert!(
        main.contains("env = \"PLATFORM_LOG_JSON\""),
        "main.rs reads PLATFORM_LOG_JSON"
    );
    assert!(main.contains("\"RUST_LOG\""), "main.rs reads RUST_LOG");
    BTreeSet::from(["PLATFORM_LOG_JSON", "RUST_LOG"])
}

/// Compose interpolation: `${X:-default}` → default, `${X:?message}` → a valid stand-in.
fn interpolate(name: &str, value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${") + start;
        let inner = &rest[start + 2..end];
        if let Some((_, default)) = inner.split_once(":-") {
            out.push_str(default);
        } else if inner.contains(":?") {
            assert_eq!(
                name, "PLATFORM_API_KEYS",
                "only keys are required from the shell"
            );
            out.push_str("client:0123456789abcdef-client,operator:0123456789abcdef-operator");
        } else {
            panic!("{name}: ${{{inner}}} has no default; give one or make it required");
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Parses `env` the way the binary would read it from the environment, by turning each
/// variable into its flag; panics on an unknown variable or a value the flag refuses.
fn parse_env(context: &str, env: &BTreeMap<String, String>) -> Settings {
    let flags = env_flags();
    let other = other_env();
    let mut args = Vec::new();
    for (name, value) in env {
        if other.contains(name.as_str()) {
            if name == "PLATFORM_LOG_JSON" {
                assert!(
                    ["true", "false", "1", "0"].contains(&value.as_str()),
                    "{context}: PLATFORM_LOG_JSON={value}"
                );
            }
            continue;
        }
        let flag = flags.get(name).unwrap_or_else(|| {
            panic!("{context}: {name} is not a setting of the platform (known: {flags:?})")
        });
        args.push(format!("--{flag}={}", interpolate(name, value)));
    }
    let matches = command()
        .try_get_matches_from(&args)
        .unwrap_or_else(|error| panic!("{context}: {args:?} is refused: {error}"));
    Settings::from_arg_matches(&matches).expect("settings from matches")
}

fn part(context: &str, args: &[String]) -> Part {
    assert_eq!(
        args.len(),
        2,
        "{context}: args are [serve, <part>], got {args:?}"
    );
    assert_eq!(args[0], "serve", "{context}");
    Part::from_str(&args[1], false)
        .unwrap_or_else(|error| panic!("{context}: {} is not a part: {error}", args[1]))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Applies `<<` merge keys at every level.
fn merge_all(value: &mut Value) {
    value.apply_merge().expect("merge keys");
    match value {
        Value::Mapping(mapping) => mapping.values_mut().for_each(merge_all),
        Value::Sequence(items) => items.iter_mut().for_each(merge_all),
        _ => {}
    }
}

/// The host of a gateway upstream: `http://host:port` (one instance) or `dns://host:port` (every
/// address the name resolves to).
fn upstream_host(url: &str) -> &str {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("dns://"))
        .unwrap_or_else(|| panic!("gateway upstream {url}: neither http:// nor dns://"));
    rest.split([':', '/']).next().expect("host")
}

/// A command service shares its partitions through its consumer group, with no fixed identity
/// per instance (`--assignment group`, and no `--instances`, which group assignment refuses).
fn assert_no_static_identity(context: &str, settings: &Settings) {
    assert_eq!(
        settings.assignment,
        AssignmentMode::Group,
        "{context}: instances share the partitions through the consumer group"
    );
    assert_eq!(
        settings.instances, 1,
        "{context}: no PLATFORM_INSTANCES with group assignment"
    );
    assert_eq!(settings.instance, 0, "{context}: no PLATFORM_INSTANCE");
}

/// The parts a deployment runs, each in its own container: every part but the ones that
/// bundle several into one process (`all`, and any other bundle such as `commands`).
fn deployed_parts() -> Vec<Part> {
    Part::value_variants()
        .iter()
        .copied()
        .filter(|part| {
            part.to_possible_value()
                .is_some_and(|value| !["all", "commands"].contains(&value.get_name()))
        })
        .collect()
}

#[test]
fn docker_compose_runs_every_part_on_kafka_in_kraft_mode_and_postgres() {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).expect("read compose");
    let mut compose: Value = serde_yaml::from_str(&text).expect("docker-compose.yml is YAML");
    merge_all(&mut compose);
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<String> = services
        .keys()
        .map(|key| key.as_str().expect("service name").to_owned())
        .collect();

    let kafka = &compose["services"]["kafka"];
    assert!(
        kafka["image"]
            .as_str()
            .expect("kafka image")
            .starts_with("apache/kafka:"),
        "the official image"
    );
    let kafka_env = kafka["environment"].as_mapping().expect("kafka env");
    assert!(
        kafka["environment"]["KAFKA_PROCESS_ROLES"]
            .as_str()
            .is_some_and(|roles| roles.contains("controller") && roles.contains("broker")),
        "KRaft: the broker is its own controller"
    );
    assert!(
        !kafka_env
            .keys()
            .any(|key| key.as_str().is_some_and(|key| key.contains("ZOOKEEPER"))),
        "no ZooKeeper"
    );
    let cluster_id = kafka["environment"]["CLUSTER_ID"]
        .as_str()
        .expect("CLUSTER_ID");
    assert_eq!(
        cluster_id.len(),
        22,
        "a KRaft cluster id is 16 bytes in base64 (22 chars)"
    );
    assert_eq!(
        kafka["environment"]["KAFKA_LOG_RETENTION_MS"].as_str(),
        Some("-1"),
        "the log is kept forever"
    );
    assert!(
        compose["services"]["postgres"]["image"]
            .as_str()
            .is_some_and(|image| image.starts_with("postgres:"))
    );

    let mut seen_parts = BTreeSet::new();
    let mut order_services = Vec::new();
    let mut images = BTreeSet::new();
    for (name, service) in services {
        let name = name.as_str().expect("name");
        let healthcheck = strings(&service["healthcheck"]["test"]);
        assert!(!healthcheck.is_empty(), "{name} has a healthcheck");
        if name == "kafka" || name == "postgres" {
            continue;
        }
        let context = format!("compose service {name}");
        assert_eq!(
            service["build"]["dockerfile"].as_str(),
            Some("Dockerfile"),
            "{context}: built from the one Dockerfile"
        );
        images.insert(service["image"].as_str().expect("image").to_owned());
        let part = part(&context, &strings(&service["command"]));
        seen_parts.insert(format!("{part:?}"));
        assert_eq!(
            healthcheck.last().map(String::as_str),
            Some("http://127.0.0.1:8080/health/ready"),
            "{context}: healthy means ready"
        );
        let env: BTreeMap<String, String> = service["environment"]
            .as_mapping()
            .expect("environment")
            .iter()
            .map(|(key, value)| {
                let value = match value {
                    Value::String(text) => text.clone(),
                    other => panic!("{context}: quote {key:?}'s value, got {other:?}"),
                };
                (key.as_str().expect("env name").to_owned(), value)
            })
            .collect();
        let settings = parse_env(&context, &env);
        assert_eq!(settings.http_addr.port(), 8080, "{context}");
        assert!(
            settings.http_addr.ip().is_unspecified(),
            "{context}: listens on all interfaces"
        );
        assert!(
            settings.store.kafka.is_some() && settings.store.database_url.is_some(),
            "{context}"
        );
        assert!(
            settings.security.auth_enabled(settings.store.distributed()),
            "{context}: auth on"
        );
        let depends = service["depends_on"].as_mapping().expect("depends_on");
        for (dependency, condition) in depends {
            let dependency = dependency.as_str().expect("name");
            assert!(
                names.contains(dependency),
                "{context}: depends on {dependency}"
            );
            assert_eq!(
                condition["condition"].as_str(),
                Some("service_healthy"),
                "{context}: waits for {dependency} to be healthy"
            );
        }
        match part {
            Part::Gateway => {
                for (upstream, urls) in [
                    ("order", &settings.gateway.gateway_order),
                    ("inventory", &settings.gateway.gateway_inventory),
                    ("customer", &settings.gateway.gateway_customer),
                    ("query", &settings.gateway.gateway_query),
                    ("saga", &settings.gateway.gateway_saga),
                ] {
                    assert!(
                        !urls.is_empty(),
                        "the gateway knows the {upstream} upstream"
                    );
                    if upstream == "order" {
                        assert!(
                            urls.iter().all(|url| url.starts_with("dns://")),
                            "the gateway finds every order replica by DNS: {urls:?}"
                        );
                    }
                    for url in urls {
                        let host = upstream_host(url);
                        assert!(
                            names.contains(host),
                            "gateway upstream {url}: no service {host}"
                        );
                        assert!(
                            depends.contains_key(host),
                            "the gateway waits for {host} to be healthy"
                        );
                    }
                }
                assert!(
                    service["ports"].as_sequence().is_some(),
                    "the gateway is published"
                );
            }
            _ => {
                assert!(
                    service.get("ports").is_none(),
                    "{context}: only the gateway is published"
                );
                for backend in ["kafka", "postgres"] {
                    assert!(
                        depends.contains_key(backend),
                        "{context}: waits for {backend}"
                    );
                }
            }
        }
        if matches!(
            part,
            Part::Order | Part::Payment | Part::Inventory | Part::Customer
        ) {
            assert_no_static_identity(&context, &settings);
            assert!(
                service.get("container_name").is_none(),
                "{context}: no fixed container name, so it can have replicas"
            );
        }
        if part == Part::Order {
            let replicas = service["deploy"]["replicas"]
                .as_u64()
                .unwrap_or_else(|| panic!("{context}: deploy.replicas"));
            assert!(
                replicas >= 2,
                "{context}: the order service runs as replicas sharing the partitions"
            );
            order_services.push(name.to_owned());
        }
    }
    let expected: BTreeSet<String> = deployed_parts().iter().map(|p| format!("{p:?}")).collect();
    assert_eq!(seen_parts, expected, "every part runs in its own container");
    assert_eq!(images.len(), 1, "one image for every part: {images:?}");
    assert_eq!(
        order_services,
        ["order"],
        "one order service, scaled by its replicas"
    );
}

fn k8s_documents() -> Vec<(String, Value)> {
    let dir = root().join("deploy/k8s");
    let kustomization: Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization"),
    )
    .expect("kustomization is YAML");
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("deploy/k8s")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml lists every manifest");
    let mut documents = Vec::new();
    for file in present {
        let text = std::fs::read_to_string(dir.join(&file)).expect("read manifest");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|error| panic!("{file} is not YAML: {error}"));
            if !value.is_null() {
                documents.push((file.clone(), value));
            }
        }
    }
    documents
}

use serde::Deserialize;

fn probe_path(container: &Value, probe: &str) -> Option<String> {
    container[probe]["httpGet"]["path"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn kubernetes_manifests_run_every_part_with_probes_and_real_settings() {
    let documents = k8s_documents();
    for (file, document) in &documents {
        for field in ["apiVersion", "kind"] {
            assert!(document[field].as_str().is_some(), "{file}: {field}");
        }
        assert!(
            document["metadata"]["name"].as_str().is_some(),
            "{file}: a name"
        );
    }
    let config: BTreeMap<String, String> = documents
        .iter()
        .find(|(_, d)| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "platform-config")
        .map(|(_, d)| serde_yaml::from_value(d["data"].clone()).expect("config data"))
        .expect("the platform-config ConfigMap");
    let services: Vec<&Value> = documents
        .iter()
        .filter(|(_, d)| d["kind"] == "Service")
        .map(|(_, d)| d)
        .collect();

    let mut seen_parts = BTreeSet::new();
    for (file, workload) in &documents {
        let kind = workload["kind"].as_str().unwrap_or_default();
        if kind != "Deployment" && kind != "StatefulSet" {
            continue;
        }
        let name = workload["metadata"]["name"].as_str().expect("name");
        let template = &workload["spec"]["template"];
        let labels = template["metadata"]["labels"].as_mapping().expect("labels");
        let selector = workload["spec"]["selector"]["matchLabels"]
            .as_mapping()
            .expect("selector");
        for (key, value) in selector {
            assert_eq!(
                labels.get(key),
                Some(value),
                "{file}: the selector matches the pods"
            );
        }
        assert!(
            services.iter().any(|service| service["spec"]["selector"]
                .as_mapping()
                .is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))),
            "{file}: a Service selects {name}"
        );
        let containers = template["spec"]["containers"]
            .as_sequence()
            .expect("containers");
        assert_eq!(containers.len(), 1, "{file}");
        let container = &containers[0];
        let image = container["image"].as_str().expect("image");
        if image != "fulfilment-platform" {
            // Kafka and Postgres: probes of their own kind.
            assert!(
                container["readinessProbe"].as_mapping().is_some()
                    && container["livenessProbe"].as_mapping().is_some(),
                "{file}: probes"
            );
            continue;
        }
        let context = format!("{file} ({kind} {name})");
        let part = part(&context, &strings(&container["args"]));
        seen_parts.insert(format!("{part:?}"));
        assert_eq!(
            probe_path(container, "livenessProbe").as_deref(),
            Some("/health/live"),
            "{context}"
        );
        assert_eq!(
            probe_path(container, "readinessProbe").as_deref(),
            Some("/health/ready"),
            "{context}"
        );
        let port = container["ports"][0]["containerPort"].as_u64();
        assert_eq!(port, Some(8080), "{context}");

        // The env the pod gets: the ConfigMap, then the container's own entries. Secrets and
        // field references stand in with valid values; they must still be real settings.
        let mut env: BTreeMap<String, String> = config.clone();
        let mut from_secret = BTreeSet::new();
        for entry in container["env"].as_sequence().expect("env") {
            let key = entry["name"].as_str().expect("env name").to_owned();
            let value = if let Some(value) = entry["value"].as_str() {
                value.to_owned()
            } else if entry["valueFrom"]["secretKeyRef"].is_mapping() {
                from_secret.insert(key.clone());
                match key.as_str() {
                    "DATABASE_URL" => "postgres://platform:x@postgres:5432/platform".to_owned(),
                    "PLATFORM_API_KEYS" => "client:0123456789abcdef-client".to_owned(),
                    "PLATFORM_JWT_SECRET" => "0123456789abcdef0123456789abcdef".to_owned(),
                    other => panic!("{context}: unexpected secret {other}"),
                }
            } else if let Some(field) = entry["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                panic!("{context}: {key} comes from {field}; no part needs a pod's identity");
            } else {
                panic!("{context}: {key} has no value");
            };
            env.insert(key, value);
        }
        for secret in ["DATABASE_URL", "PLATFORM_API_KEYS"] {
            assert!(
                from_secret.contains(secret),
                "{context}: {secret} comes from a Secret"
            );
        }
        let settings = parse_env(&context, &env);
        assert!(
            settings.security.auth_enabled(settings.store.distributed()),
            "{context}: auth on"
        );
        let replicas = workload["spec"]["replicas"].as_u64().expect("replicas") as u32;
        match part {
            Part::Order | Part::Payment | Part::Inventory | Part::Customer => {
                assert_eq!(kind, "Deployment", "{context}: pods need no fixed identity");
                assert_no_static_identity(&context, &settings);
                assert!(
                    replicas >= 2,
                    "{context}: command services share the partitions"
                );
                let max_unavailable =
                    &workload["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"];
                assert!(
                    max_unavailable.as_u64() == Some(0)
                        || matches!(max_unavailable.as_str(), Some("0" | "0%")),
                    "{context}: a rolling update never takes an owner down before its successor is up"
                );
                let grace = template["spec"]["terminationGracePeriodSeconds"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{context}: terminationGracePeriodSeconds"));
                assert!(
                    grace >= 20,
                    "{context}: {grace} s leaves no time for in-flight commands to settle \
                     (10 s read-back timeout) and the last snapshots (10 s)"
                );
                assert!(
                    services.iter().any(|service| service["metadata"]["name"]
                        == workload["metadata"]["name"]
                        && service["spec"]["clusterIP"].as_str() == Some("None")),
                    "{context}: a headless Service of the same name, for the gateway's dns:// source"
                );
            }
            Part::Projections | Part::Gateway => {
                assert!(
                    replicas >= 2,
                    "{context}: stateless or consumer-group members scale out"
                );
            }
            Part::Saga => assert_eq!(replicas, 1, "{context}: the relay and ticker are not split"),
            bundle => panic!("{context}: `serve {bundle:?}` bundles parts for one machine"),
        }
        if part == Part::Gateway {
            for upstream in [
                &settings.gateway.gateway_order,
                &settings.gateway.gateway_inventory,
                &settings.gateway.gateway_customer,
                &settings.gateway.gateway_query,
                &settings.gateway.gateway_saga,
            ] {
                assert!(
                    !upstream.is_empty(),
                    "{context}: every upstream is configured"
                );
            }
            for upstream in [
                &settings.gateway.gateway_order,
                &settings.gateway.gateway_inventory,
                &settings.gateway.gateway_customer,
            ] {
                for url in upstream {
                    assert!(
                        url.starts_with("dns://"),
                        "{context}: {url}: command services are found by DNS"
                    );
                    let service = upstream_host(url).split('.').next().expect("name");
                    assert!(
                        services.iter().any(|s| s["metadata"]["name"] == service
                            && s["spec"]["clusterIP"].as_str() == Some("None")),
                        "{context}: {url} names the headless Service {service}"
                    );
                }
            }
        }
    }
    let expected: BTreeSet<String> = deployed_parts().iter().map(|p| format!("{p:?}")).collect();
    assert_eq!(seen_parts, expected, "every part has a workload");
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_the_binary_unprivileged_in_another() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let instructions: Vec<(String, String)> = text
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (keyword, rest) = line.split_once(' ').unwrap_or((line, ""));
            (keyword.to_uppercase(), rest.trim().to_owned())
        })
        .collect();
    let known = [
        "FROM",
        "RUN",
        "COPY",
        "WORKDIR",
        "ENV",
        "USER",
        "EXPOSE",
        "HEALTHCHECK",
        "ENTRYPOINT",
        "CMD",
        "ARG",
    ];
    for (keyword, _) in &instructions {
        assert!(
            known.contains(&keyword.as_str()),
            "unknown instruction {keyword}"
        );
    }
    let froms: Vec<&String> = instructions
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, rest)| rest)
        .collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage");
    assert!(froms[0].ends_with(" AS build"), "{}", froms[0]);
    assert!(
        instructions.iter().any(|(k, rest)| k == "RUN"
            && rest.contains("cargo build --release --locked --bin platform")),
        "the build stage builds the platform binary"
    );
    assert!(
        instructions
            .iter()
            .any(|(k, rest)| k == "COPY" && rest.starts_with("--from=build ")),
        "the runtime stage copies only the binary"
    );
    let user = instructions
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, rest)| rest.as_str())
        .expect("a USER");
    assert!(user != "root" && user != "0", "runs unprivileged");
    let entrypoint = instructions
        .iter()
        .find(|(k, _)| k == "ENTRYPOINT")
        .map(|(_, rest)| rest.as_str())
        .expect("ENTRYPOINT");
    assert_eq!(entrypoint, "[\"/usr/local/bin/platform\"]");
    assert!(
        instructions
            .iter()
            .any(|(k, rest)| k == "ENV" && rest.contains("PLATFORM_HTTP_ADDR=0.0.0.0:8080")),
        "listens on all interfaces inside the container"
    );
    assert!(
        root().join(".dockerignore").exists(),
        "target/ stays out of the build context"
    );
    let _ = Path::new("");
}
