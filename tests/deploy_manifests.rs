//! The Dockerfile and the deployment files under deploy/ (Compose, Swarm,
//! Kubernetes), checked by parsing them. No Docker engine or Kubernetes runs
//! where Spiegel is built and tested, so these checks are what keeps the files
//! consistent with the binary: its commands, its environment variables
//! (docs/configuration.md), its admin port and its shutdown timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

/// The commands a deployment may run: the one-shot install and the workers.
const DEPLOYABLE_COMMANDS: [&str; 4] = ["install", "run", "replicator", "change-listener"];
/// The commands that run workers, which serve the admin HTTP server and stop
/// within --shutdown-timeout.
const WORKER_COMMANDS: [&str; 3] = ["run", "replicator", "change-listener"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

// ---------------------------------------------------------------------------
// docs/configuration.md

struct Reference {
    /// Every name of the `Variable` column.
    variables: BTreeSet<String>,
    /// The variables of Spiegel 1.2's options that have no effect.
    no_effect: BTreeSet<String>,
    /// Variable -> its `Default` cell, without backticks.
    defaults: BTreeMap<String, String>,
}

fn table_cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_start_matches('|')
        .trim_end_matches('|')
        .split('|')
        .map(|cell| cell.trim().trim_matches('`').to_string())
        .collect()
}

fn reference() -> Reference {
    let doc = read("docs/configuration.md");
    let lines: Vec<&str> = doc.lines().collect();
    let mut reference = Reference {
        variables: BTreeSet::new(),
        no_effect: BTreeSet::new(),
        defaults: BTreeMap::new(),
    };
    let mut heading = "";
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.starts_with('#') {
            heading = line;
        }
        let is_header = line.starts_with('|')
            && lines
                .get(i + 1)
                .is_some_and(|next| next.starts_with("|-") || next.starts_with("| -"));
        if !is_header {
            i += 1;
            continue;
        }
        let header = table_cells(line);
        let variable = header.iter().position(|c| c == "Variable");
        let default = header.iter().position(|c| c == "Default");
        i += 2;
        while i < lines.len() && lines[i].starts_with('|') {
            let cells = table_cells(lines[i]);
            if let Some(name) = variable
                .and_then(|v| cells.get(v))
                .filter(|n| !n.is_empty())
            {
                reference.variables.insert(name.clone());
                if heading.contains("no effect") {
                    reference.no_effect.insert(name.clone());
                }
                if let Some(d) = default.and_then(|d| cells.get(d)) {
                    reference.defaults.insert(name.clone(), d.clone());
                }
            }
            i += 1;
        }
    }
    assert!(
        reference.variables.len() > 20,
        "docs/configuration.md: found only {:?} in the Variable column",
        reference.variables
    );
    reference
}

/// The admin server's port, from ADMIN_ADDR's documented default.
fn admin_port(reference: &Reference) -> i64 {
    let addr = reference
        .defaults
        .get("ADMIN_ADDR")
        .expect("docs/configuration.md gives ADMIN_ADDR's default");
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("ADMIN_ADDR's documented default {addr:?} has no port"))
}

/// Seconds a worker may take to stop: SHUTDOWN_TIMEOUT if the deployment
/// sets it, else its documented default.
fn shutdown_timeout(reference: &Reference, env: &BTreeMap<String, Option<String>>) -> f64 {
    let value = match env.get("SHUTDOWN_TIMEOUT") {
        Some(Some(v)) => v.clone(),
        _ => reference
            .defaults
            .get("SHUTDOWN_TIMEOUT")
            .expect("docs/configuration.md gives SHUTDOWN_TIMEOUT's default")
            .clone(),
    };
    value
        .parse()
        .unwrap_or_else(|_| panic!("SHUTDOWN_TIMEOUT {value:?} is not a number"))
}

// ---------------------------------------------------------------------------
// YAML files

struct Manifest {
    /// Relative to the repository, e.g. `deploy/kubernetes/secret.yaml`.
    path: String,
    docs: Vec<Yaml>,
}

fn yaml_paths(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            yaml_paths(&path, found);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yml" | "yaml")
        ) {
            found.push(path);
        }
    }
}

fn manifests() -> Vec<Manifest> {
    let mut paths = Vec::new();
    yaml_paths(&root().join("deploy"), &mut paths);
    paths.sort();
    assert!(!paths.is_empty(), "no YAML file under deploy/");
    paths
        .iter()
        .map(|path| {
            let relative = path
                .strip_prefix(root())
                .expect("under the repository")
                .display()
                .to_string();
            let text = std::fs::read_to_string(path).expect("readable YAML file");
            let docs = YamlLoader::load_from_str(&text)
                .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"));
            Manifest {
                path: relative,
                docs,
            }
        })
        .collect()
}

fn manifest(relative: &str) -> Manifest {
    manifests()
        .into_iter()
        .find(|m| m.path == relative)
        .unwrap_or_else(|| panic!("{relative} is missing"))
}

/// A scalar as text (YAML numbers and booleans included).
fn text(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn hash_entries(y: &Yaml) -> Vec<(String, &Yaml)> {
    y.as_hash()
        .map(|h| {
            h.iter()
                .filter_map(|(k, v)| text(k).map(|k| (k, v)))
                .collect()
        })
        .unwrap_or_default()
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

/// One process of Spiegel that a deployment file starts: a Compose or Swarm
/// service, or a Kubernetes container.
struct Unit {
    /// Where it is defined, for messages.
    place: String,
    /// Environment variables; `None` for values not given literally
    /// (Kubernetes `valueFrom`).
    env: BTreeMap<String, Option<String>>,
    /// The service or container definition itself.
    definition: Yaml,
    /// Kubernetes: the document the container belongs to.
    document: Option<Yaml>,
}

impl Unit {
    fn command(&self) -> &str {
        match self.env.get("TYPE") {
            Some(Some(t)) => t,
            _ => panic!("{}: sets no TYPE", self.place),
        }
    }

    fn is_worker(&self) -> bool {
        WORKER_COMMANDS.contains(&self.command())
    }
}

fn is_spiegel_image(image: &Yaml) -> bool {
    image
        .as_str()
        .is_some_and(|i| i.to_ascii_lowercase().contains("spiegel"))
}

/// Compose's `environment`, as a mapping or as a list of `NAME=value`.
fn compose_env(service: &Yaml) -> BTreeMap<String, Option<String>> {
    let environment = &service["environment"];
    let mut env = BTreeMap::new();
    for (name, value) in hash_entries(environment) {
        env.insert(name, Some(text(value).unwrap_or_default()));
    }
    for item in list(environment) {
        let item = text(item).unwrap_or_default();
        let (name, value) = item.split_once('=').unwrap_or((&item, ""));
        env.insert(name.to_string(), Some(value.to_string()));
    }
    env
}

fn compose_units(manifest: &Manifest) -> Vec<Unit> {
    let mut units = Vec::new();
    for doc in &manifest.docs {
        for (name, service) in hash_entries(&doc["services"]) {
            if is_spiegel_image(&service["image"]) || !service["build"].is_badvalue() {
                units.push(Unit {
                    place: format!("{} service {name}", manifest.path),
                    env: compose_env(service),
                    definition: service.clone(),
                    document: None,
                });
            }
        }
    }
    units
}

/// The pod spec of a Kubernetes workload document.
fn pod_spec(doc: &Yaml) -> Option<&Yaml> {
    let spec = match doc["kind"].as_str()? {
        "Pod" => &doc["spec"],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            &doc["spec"]["template"]["spec"]
        }
        "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => return None,
    };
    spec.as_hash().map(|_| spec)
}

fn kubernetes_env(container: &Yaml) -> BTreeMap<String, Option<String>> {
    list(&container["env"])
        .iter()
        .filter_map(|var| {
            let name = var["name"].as_str()?.to_string();
            Some((name, text(&var["value"])))
        })
        .collect()
}

fn kubernetes_units(manifest: &Manifest) -> Vec<Unit> {
    let mut units = Vec::new();
    for doc in &manifest.docs {
        let Some(spec) = pod_spec(doc) else { continue };
        let containers = list(&spec["containers"])
            .iter()
            .chain(list(&spec["initContainers"]));
        for container in containers.filter(|c| is_spiegel_image(&c["image"])) {
            units.push(Unit {
                place: format!(
                    "{} {} {} container {}",
                    manifest.path,
                    doc["kind"].as_str().unwrap_or("?"),
                    doc["metadata"]["name"].as_str().unwrap_or("?"),
                    container["name"].as_str().unwrap_or("?")
                ),
                env: kubernetes_env(container),
                definition: container.clone(),
                document: Some(doc.clone()),
            });
        }
    }
    units
}

/// A Kubernetes object (not a kustomization) under deploy/kubernetes/.
fn is_kubernetes(manifest: &Manifest) -> bool {
    manifest.path.starts_with("deploy/kubernetes/") && !is_kustomization(manifest)
}

fn is_kustomization(manifest: &Manifest) -> bool {
    manifest.path.ends_with("/kustomization.yaml")
}

/// Every Spiegel process of every deployment file.
fn all_units() -> Vec<Unit> {
    let mut units = Vec::new();
    for manifest in manifests() {
        if is_kubernetes(&manifest) {
            units.extend(kubernetes_units(&manifest));
        } else {
            units.extend(compose_units(&manifest));
        }
    }
    units
}

fn kubernetes_units_all() -> Vec<Unit> {
    manifests()
        .iter()
        .filter(|m| is_kubernetes(m))
        .flat_map(kubernetes_units)
        .collect()
}

/// A Compose duration (`45s`, `1m30s`, `500ms`) in seconds.
fn compose_duration(value: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = value.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            _ => return None,
        };
        total += number * factor;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// A container port given by number or by the name of one of its ports.
fn resolve_port(container: &Yaml, port: &Yaml) -> Option<i64> {
    if let Some(number) = port.as_i64() {
        return Some(number);
    }
    let name = port.as_str()?;
    list(&container["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_i64())
}

// ---------------------------------------------------------------------------
// Dockerfile

struct Instruction {
    keyword: String,
    arguments: String,
}

/// Instructions by stage, with line continuations joined and comments
/// (including parser directives) left out.
fn dockerfile_stages() -> Vec<Vec<Instruction>> {
    let text = read("Dockerfile");
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(current.is_empty(), "Dockerfile ends inside a continuation");
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    for line in logical.iter().filter(|l| !l.trim().is_empty()) {
        let (keyword, arguments) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let instruction = Instruction {
            keyword: keyword.to_ascii_uppercase(),
            arguments: arguments.trim().to_string(),
        };
        if instruction.keyword == "FROM" {
            stages.push(Vec::new());
        }
        match stages.last_mut() {
            Some(stage) => stage.push(instruction),
            // ARG before the first FROM.
            None => assert_eq!(instruction.keyword, "ARG", "Dockerfile: {line} before FROM"),
        }
    }
    assert!(!stages.is_empty(), "the Dockerfile has no FROM");
    stages
}

fn final_stage() -> Vec<Instruction> {
    dockerfile_stages().pop().expect("a stage")
}

fn instructions<'a>(stage: &'a [Instruction], keyword: &'a str) -> impl Iterator<Item = &'a str> {
    stage
        .iter()
        .filter(move |i| i.keyword == keyword)
        .map(|i| i.arguments.as_str())
}

/// The final stage's ENTRYPOINT, in exec form.
fn entrypoint() -> Vec<String> {
    let stage = final_stage();
    let entrypoint = instructions(&stage, "ENTRYPOINT")
        .last()
        .expect("the final stage has an ENTRYPOINT");
    serde_json::from_str(entrypoint).unwrap_or_else(|_| {
        panic!("ENTRYPOINT {entrypoint} is not in exec form (a JSON array): signals would go to a shell")
    })
}

// ---------------------------------------------------------------------------
// Tests: all files

#[test]
fn every_yaml_file_under_deploy_parses_into_mappings() {
    for manifest in manifests() {
        assert!(
            !manifest.docs.is_empty(),
            "{} holds no YAML document",
            manifest.path
        );
        for (i, doc) in manifest.docs.iter().enumerate() {
            assert!(
                doc.is_hash(),
                "{} document {i} is not a mapping: {doc:?}",
                manifest.path
            );
        }
    }
}

#[test]
fn every_spiegel_service_and_container_sets_type_to_a_deployable_command() {
    let units = all_units();
    for place in ["docker-compose.yml", "swarm-stack.yml", "kubernetes/"] {
        assert!(
            units.iter().any(|u| u.place.contains(place)),
            "no Spiegel service or container found in deploy/{place}"
        );
    }
    for unit in &units {
        let command = unit.command();
        assert!(
            DEPLOYABLE_COMMANDS.contains(&command),
            "{}: TYPE={command} is not one of {DEPLOYABLE_COMMANDS:?}",
            unit.place
        );
    }
}

#[test]
fn every_environment_variable_given_to_spiegel_is_in_the_configuration_reference() {
    let reference = reference();
    for unit in all_units() {
        for name in unit.env.keys() {
            assert!(
                reference.variables.contains(name),
                "{}: {name} is not a variable of docs/configuration.md (known: {:?})",
                unit.place,
                reference.variables
            );
        }
    }
}

#[test]
fn deployment_files_set_no_option_that_has_no_effect() {
    let reference = reference();
    assert!(
        !reference.no_effect.is_empty(),
        "docs/configuration.md lists no option without effect"
    );
    for unit in all_units() {
        for name in unit.env.keys() {
            assert!(
                !reference.no_effect.contains(name),
                "{}: {name} has no effect any more (docs/configuration.md)",
                unit.place
            );
        }
    }
}

#[test]
fn workers_are_given_longer_to_stop_than_spiegel_s_shutdown_timeout() {
    let reference = reference();
    let mut checked = 0;
    for unit in all_units().iter().filter(|u| u.is_worker()) {
        let timeout = shutdown_timeout(&reference, &unit.env);
        let grace = match &unit.document {
            Some(doc) => pod_spec(doc)
                .and_then(|s| s["terminationGracePeriodSeconds"].as_i64())
                .map(|s| s as f64),
            None => unit.definition["stop_grace_period"]
                .as_str()
                .and_then(compose_duration),
        };
        let grace = grace.unwrap_or_else(|| {
            panic!(
                "{}: no stop grace period (the orchestrator's default is shorter than Spiegel's {timeout} s shutdown timeout)",
                unit.place
            )
        });
        assert!(
            grace > timeout,
            "{}: {grace} s to stop is not longer than the {timeout} s shutdown timeout",
            unit.place
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} workers checked");
}

#[test]
fn deployment_guide_names_every_deploy_file() {
    let guide = read("docs/deployment.md");
    for manifest in manifests() {
        let name = manifest.path.trim_start_matches("deploy/");
        assert!(
            guide.contains(name),
            "docs/deployment.md does not mention {}",
            manifest.path
        );
    }
    for file in ["deploy/couchdb-local.ini", "Dockerfile"] {
        let name = file.trim_start_matches("deploy/");
        assert!(
            guide.contains(name),
            "docs/deployment.md does not mention {file}"
        );
    }
}

// ---------------------------------------------------------------------------
// Tests: Docker Compose

#[test]
fn compose_starts_workers_after_couchdb_is_healthy_and_install_succeeded() {
    let manifest = manifest("deploy/docker-compose.yml");
    let compose = &manifest.docs[0];
    let units = compose_units(&manifest);
    let service_name = |unit: &Unit| unit.place.rsplit(' ').next().unwrap_or("").to_string();

    let install = units
        .iter()
        .find(|u| u.command() == "install")
        .expect("a service with TYPE=install");
    assert_eq!(
        text(&install.definition["restart"]).as_deref(),
        Some("no"),
        "{}: a one-shot service must not restart",
        install.place
    );
    let install_deps = hash_entries(&install.definition["depends_on"]);
    assert!(
        !install_deps.is_empty(),
        "{} depends on nothing",
        install.place
    );
    for (dependency, how) in install_deps {
        assert_eq!(
            how["condition"].as_str(),
            Some("service_healthy"),
            "{} must wait for {dependency} to be healthy",
            install.place
        );
        let test = list(&compose["services"][dependency.as_str()]["healthcheck"]["test"])
            .iter()
            .filter_map(text)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            test.contains("/_up"),
            "service {dependency} has no healthcheck on CouchDB's /_up: {test:?}"
        );
    }

    let workers: Vec<&Unit> = units.iter().filter(|u| u.is_worker()).collect();
    assert!(
        !workers.is_empty(),
        "no worker service in {}",
        manifest.path
    );
    for worker in workers {
        assert_eq!(
            worker.definition["depends_on"][service_name(install).as_str()]["condition"].as_str(),
            Some("service_completed_successfully"),
            "{} must start after {} succeeded",
            worker.place,
            install.place
        );
        let ports: Vec<String> = list(&worker.definition["ports"])
            .iter()
            .filter_map(text)
            .collect();
        let admin = admin_port(&reference()).to_string();
        assert!(
            ports.iter().any(|p| p.ends_with(&format!(":{admin}"))),
            "{} does not publish the admin port {admin}: {ports:?}",
            worker.place
        );
    }
}

#[test]
fn compose_mounts_a_couchdb_ini_that_turns_startup_jitter_off() {
    let manifest = manifest("deploy/docker-compose.yml");
    let services = hash_entries(&manifest.docs[0]["services"]);
    let (name, couchdb) = services
        .iter()
        .find(|(_, s)| {
            s["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("couchdb:"))
        })
        .expect("a couchdb service");
    let mount = list(&couchdb["volumes"])
        .iter()
        .filter_map(Yaml::as_str)
        .find(|v| v.contains("/opt/couchdb/etc/local.d/"))
        .unwrap_or_else(|| panic!("service {name} mounts nothing into /opt/couchdb/etc/local.d/"));
    let source = mount.split(':').next().expect("a source");
    let target = mount.split(':').nth(1).expect("a target");
    assert!(
        target.ends_with(".ini"),
        "{mount}: CouchDB reads only *.ini from local.d"
    );
    let ini = std::fs::read_to_string(root().join("deploy").join(source))
        .unwrap_or_else(|e| panic!("{mount}: deploy/{source}: {e}"));
    let mut section = String::new();
    let mut jitter = None;
    for line in ini.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
        } else if let Some((key, value)) = line.split_once('=') {
            if section == "[replicator]" && key.trim() == "startup_jitter" {
                jitter = Some(value.trim().to_string());
            }
        }
    }
    assert_eq!(
        jitter.as_deref(),
        Some("0"),
        "deploy/{source} must set [replicator] startup_jitter = 0"
    );
}

// ---------------------------------------------------------------------------
// Tests: Docker Swarm

#[test]
fn swarm_stack_reads_the_url_and_the_passwords_file_from_docker_secrets() {
    let manifest = manifest("deploy/swarm-stack.yml");
    let stack = &manifest.docs[0];
    assert_eq!(
        text(&stack["version"]).as_deref(),
        Some("3.8"),
        "the stack file's version"
    );
    let declared: BTreeSet<String> = hash_entries(&stack["secrets"])
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let units = compose_units(&manifest);
    let commands: BTreeSet<&str> = units.iter().map(Unit::command).collect();
    assert_eq!(
        commands,
        BTreeSet::from(["change-listener", "replicator"]),
        "the stack runs one service per worker role"
    );
    for unit in &units {
        assert!(
            !unit.env.contains_key("URL"),
            "{}: the URL holds a password: read it from a secret",
            unit.place
        );
        assert_eq!(
            unit.definition["deploy"]["replicas"].as_i64(),
            Some(2),
            "{}: replicas",
            unit.place
        );
        // Secrets mount at /run/secrets/<target, or source>.
        let mut mounted = BTreeSet::new();
        for secret in list(&unit.definition["secrets"]) {
            let (source, target) = match secret.as_str() {
                Some(name) => (name.to_string(), name.to_string()),
                None => {
                    let source = text(&secret["source"]).expect("a secret's source");
                    let target = text(&secret["target"]).unwrap_or_else(|| source.clone());
                    (source, target)
                }
            };
            assert!(
                declared.contains(&source),
                "{}: secret {source} is not declared at the top level",
                unit.place
            );
            mounted.insert(format!("/run/secrets/{target}"));
        }
        let passwords = unit.env.get("PASSWORDS_FILE").cloned().flatten();
        let passwords = passwords.filter(|p| mounted.remove(p)).unwrap_or_else(|| {
            panic!(
                "{}: PASSWORDS_FILE is not one of the mounted secrets {mounted:?}",
                unit.place
            )
        });
        let entrypoint = list(&unit.definition["entrypoint"])
            .iter()
            .filter_map(text)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            entrypoint.contains("URL=")
                && mounted.iter().any(|secret| entrypoint.contains(secret.as_str())),
            "{}: the entrypoint does not read URL from a mounted secret other than {passwords}: {entrypoint:?}",
            unit.place
        );
    }
}

#[test]
#[cfg_attr(not(spiegel_has_docker), ignore = "the docker client is not installed")]
fn docker_stack_config_accepts_the_swarm_stack() {
    // `docker stack config` validates and renders a stack file without a
    // Docker daemon.
    let out = std::process::Command::new("docker")
        .args(["stack", "config", "-c"])
        .arg(root().join("deploy/swarm-stack.yml"))
        .env("SPIEGEL_IMAGE", "registry.example.com/spiegel:test")
        .output()
        .expect("run docker");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("services:"),
        "docker stack config: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    for service in ["replicator:", "change-listener:"] {
        assert!(text.contains(service), "{service} in {text}");
    }
}

#[test]
fn swarm_entrypoint_wrapper_execs_the_image_s_binary_with_a_shell_the_image_has() {
    let manifest = manifest("deploy/swarm-stack.yml");
    let binary = entrypoint().remove(0);
    let stage = final_stage();
    let base = instructions(&stage, "FROM")
        .next()
        .expect("FROM")
        .to_string();
    for unit in compose_units(&manifest) {
        let entrypoint: Vec<String> = list(&unit.definition["entrypoint"])
            .iter()
            .filter_map(text)
            .collect();
        let Some(shell) = entrypoint.first() else {
            continue;
        };
        assert!(
            shell == "/bin/sh" && entrypoint.get(1).map(String::as_str) == Some("-c"),
            "{}: expected [/bin/sh, -c, ...], got {entrypoint:?}",
            unit.place
        );
        assert!(
            !base.contains("distroless") && !base.starts_with("scratch"),
            "{}: runs /bin/sh, which the image's base {base} does not have",
            unit.place
        );
        let script = entrypoint.last().expect("a script");
        assert!(
            script.contains(&format!("exec {binary}")),
            "{}: the script must exec {binary} (the Dockerfile's ENTRYPOINT) so that it gets SIGTERM: {script:?}",
            unit.place
        );
    }
}

// ---------------------------------------------------------------------------
// Tests: Kubernetes

#[test]
fn kubernetes_documents_name_their_api_version_kind_and_name() {
    for manifest in manifests().iter().filter(|m| is_kubernetes(m)) {
        for doc in &manifest.docs {
            for field in ["apiVersion", "kind"] {
                assert!(
                    doc[field].as_str().is_some(),
                    "{}: a document has no {field}",
                    manifest.path
                );
            }
            assert!(
                doc["metadata"]["name"].as_str().is_some(),
                "{}: a {} has no metadata.name",
                manifest.path,
                doc["kind"].as_str().unwrap_or("?")
            );
        }
    }
}

#[test]
fn kubernetes_deployments_probe_healthz_and_readyz_on_the_admin_port() {
    let port = admin_port(&reference());
    let mut deployments = BTreeSet::new();
    for unit in kubernetes_units_all() {
        let doc = unit.document.as_ref().expect("a document");
        if doc["kind"].as_str() != Some("Deployment") {
            continue;
        }
        deployments.insert(unit.command().to_string());
        assert!(
            unit.is_worker(),
            "{}: a Deployment runs a worker",
            unit.place
        );
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &unit.definition[probe]["httpGet"];
            assert_eq!(
                get["path"].as_str(),
                Some(path),
                "{}: {probe} path",
                unit.place
            );
            assert_eq!(
                resolve_port(&unit.definition, &get["port"]),
                Some(port),
                "{}: {probe} port",
                unit.place
            );
        }
        if let Some(Some(addr)) = unit.env.get("ADMIN_ADDR") {
            assert!(
                addr.ends_with(&format!(":{port}")),
                "{}: ADMIN_ADDR {addr} does not serve the probed port {port}",
                unit.place
            );
        }
    }
    assert_eq!(
        deployments,
        BTreeSet::from(["change-listener".to_string(), "replicator".to_string()]),
        "one Deployment per worker role"
    );
}

#[test]
fn kubernetes_deployments_are_annotated_for_prometheus_on_the_admin_port() {
    let port = admin_port(&reference()).to_string();
    for unit in kubernetes_units_all() {
        let doc = unit.document.as_ref().expect("a document");
        if doc["kind"].as_str() != Some("Deployment") {
            continue;
        }
        let annotations = &doc["spec"]["template"]["metadata"]["annotations"];
        for (key, value) in [
            ("prometheus.io/scrape", "true"),
            ("prometheus.io/port", port.as_str()),
            ("prometheus.io/path", "/metrics"),
        ] {
            assert_eq!(
                annotations[key].as_str(),
                Some(value),
                "{}: pod annotation {key} (annotation values are strings)",
                unit.place
            );
        }
    }
}

#[test]
fn kubernetes_spiegel_runs_as_non_root_with_a_read_only_root_filesystem() {
    let units = kubernetes_units_all();
    assert!(
        units.len() >= 3,
        "only {} Kubernetes containers",
        units.len()
    );
    for unit in units {
        let pod = pod_spec(unit.document.as_ref().expect("a document")).expect("a pod spec");
        let container = &unit.definition["securityContext"];
        let non_root = container["runAsNonRoot"]
            .as_bool()
            .or(pod["securityContext"]["runAsNonRoot"].as_bool());
        assert_eq!(non_root, Some(true), "{}: runAsNonRoot", unit.place);
        assert_eq!(
            container["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{}: readOnlyRootFilesystem",
            unit.place
        );
        assert_eq!(
            container["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{}: allowPrivilegeEscalation",
            unit.place
        );
        for kind in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    text(&unit.definition["resources"][kind][resource]).is_some(),
                    "{}: resources.{kind}.{resource}",
                    unit.place
                );
            }
        }
    }
}

#[test]
fn kubernetes_spiegel_reads_the_url_and_the_passwords_file_from_the_secret() {
    // Secret name -> its keys.
    let mut secrets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for manifest in manifests().iter().filter(|m| is_kubernetes(m)) {
        for doc in manifest
            .docs
            .iter()
            .filter(|d| d["kind"].as_str() == Some("Secret"))
        {
            let keys = secrets
                .entry(
                    doc["metadata"]["name"]
                        .as_str()
                        .expect("a name")
                        .to_string(),
                )
                .or_default();
            for field in ["stringData", "data"] {
                keys.extend(hash_entries(&doc[field]).into_iter().map(|(k, _)| k));
            }
        }
    }
    assert!(!secrets.is_empty(), "no Secret under deploy/kubernetes/");

    for unit in kubernetes_units_all() {
        let env = list(&unit.definition["env"]);
        let var = |name: &str| env.iter().find(|v| v["name"].as_str() == Some(name));
        let url = var("URL").unwrap_or_else(|| panic!("{}: no URL", unit.place));
        assert!(
            url["value"].is_badvalue(),
            "{}: URL holds a password: take it from a Secret",
            unit.place
        );
        let reference = &url["valueFrom"]["secretKeyRef"];
        let (secret, key) = (
            reference["name"].as_str().unwrap_or_default(),
            reference["key"].as_str().unwrap_or_default(),
        );
        assert!(
            secrets.get(secret).is_some_and(|keys| keys.contains(key)),
            "{}: URL comes from secret {secret:?} key {key:?}, which no Secret here has ({secrets:?})",
            unit.place
        );

        let Some(Some(passwords)) = unit.env.get("PASSWORDS_FILE") else {
            continue;
        };
        let pod = pod_spec(unit.document.as_ref().expect("a document")).expect("a pod spec");
        let found = list(&unit.definition["volumeMounts"]).iter().any(|mount| {
            let (Some(dir), Some(volume)) = (mount["mountPath"].as_str(), mount["name"].as_str())
            else {
                return false;
            };
            let Some(file) = passwords.strip_prefix(&format!("{}/", dir.trim_end_matches('/')))
            else {
                return false;
            };
            list(&pod["volumes"])
                .iter()
                .filter(|v| v["name"].as_str() == Some(volume))
                .any(|v| {
                    let source = &v["secret"];
                    let Some(name) = source["secretName"].as_str() else {
                        return false;
                    };
                    let items = list(&source["items"]);
                    let key = if items.is_empty() {
                        Some(file)
                    } else {
                        items
                            .iter()
                            .find(|i| i["path"].as_str() == Some(file))
                            .and_then(|i| i["key"].as_str())
                    };
                    key.is_some_and(|key| secrets.get(name).is_some_and(|keys| keys.contains(key)))
                })
        });
        assert!(
            found,
            "{}: PASSWORDS_FILE {passwords} is not a key of a mounted Secret volume",
            unit.place
        );
    }
}

#[test]
fn kustomization_lists_every_manifest_and_names_the_image_once() {
    let kustomization = manifest("deploy/kubernetes/kustomization.yaml");
    let k = &kustomization.docs[0];
    let resources: BTreeSet<String> = list(&k["resources"])
        .iter()
        .filter_map(|r| r.as_str().map(String::from))
        .collect();
    let top_level: BTreeSet<String> = manifests()
        .iter()
        .filter(|m| is_kubernetes(m))
        .filter_map(|m| m.path.strip_prefix("deploy/kubernetes/").map(String::from))
        .filter(|name| !name.contains('/'))
        .collect();
    assert_eq!(resources, top_level);
    let image = &list(&k["images"])[0];
    let name = image["name"].as_str().expect("images[0].name");
    for unit in kubernetes_units_all() {
        let used = unit.definition["image"].as_str().unwrap_or_default();
        assert_eq!(
            used.split(':').next(),
            Some(name),
            "{}: the kustomization's image name must match",
            unit.place
        );
    }
}

#[test]
fn passwords_component_mounts_the_secret_key_and_sets_passwords_file() {
    let component = manifest("deploy/kubernetes/passwords/kustomization.yaml");
    let c = &component.docs[0];
    assert_eq!(c["kind"].as_str(), Some("Component"));
    let patch = &list(&c["patches"])[0];
    let ops = YamlLoader::load_from_str(patch["patch"].as_str().expect("a patch"))
        .expect("the patch is YAML")
        .remove(0);
    let value_of = |path: &str| {
        list(&ops)
            .iter()
            .find(|op| op["path"].as_str() == Some(path))
            .map(|op| op["value"].clone())
            .unwrap_or_else(|| panic!("no op on {path}"))
    };
    let env = value_of("/spec/template/spec/containers/0/env/-");
    let file = env["value"].as_str().expect("PASSWORDS_FILE's value");
    assert_eq!(env["name"].as_str(), Some("PASSWORDS_FILE"));
    let mount = value_of("/spec/template/spec/containers/0/volumeMounts");
    let dir = list(&mount)[0]["mountPath"].as_str().expect("a mount path");
    let volume = value_of("/spec/template/spec/volumes");
    let secret = &list(&volume)[0]["secret"];
    let item = &list(&secret["items"])[0];
    assert_eq!(
        format!("{dir}/{}", item["path"].as_str().unwrap_or_default()),
        file
    );
    let secrets = manifest("deploy/kubernetes/secret.yaml");
    let keys = hash_entries(&secrets.docs[0]["stringData"]);
    assert!(
        keys.iter()
            .any(|(k, _)| Some(k.as_str()) == item["key"].as_str()),
        "the secret has the key {:?}",
        item["key"]
    );
    let target = patch["target"]["name"].as_str().expect("a target name");
    for deployment in ["spiegel-replicator", "spiegel-change-listener"] {
        let pattern = regex::Regex::new(&format!("^(?:{target})$")).expect("a regex");
        assert!(pattern.is_match(deployment), "{target} misses {deployment}");
    }
}

/// `kubectl kustomize` of deploy/kubernetes, with `components` as given.
fn kustomize(components: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let copy = dir.path().join("kubernetes");
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(root().join("deploy/kubernetes"))
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(status.success());
    if !components.is_empty() {
        let path = copy.join("kustomization.yaml");
        let mut text = std::fs::read_to_string(&path).expect("kustomization.yaml");
        text.push_str(&format!("components: {components:?}\n"));
        std::fs::write(&path, text).expect("write kustomization.yaml");
    }
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&copy)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[cfg_attr(not(spiegel_has_kubectl), ignore = "kubectl is not installed")]
fn kubectl_kustomize_builds_the_manifests_with_and_without_the_passwords_file() {
    let plain = kustomize(&[]);
    assert_eq!(
        plain
            .matches("image: registry.example.com/spiegel:")
            .count(),
        3
    );
    assert!(
        !plain.contains("PASSWORDS_FILE"),
        "no passwords file by default"
    );
    let with = kustomize(&["passwords"]);
    assert_eq!(with.matches("name: PASSWORDS_FILE").count(), 2, "{with}");
    assert_eq!(with.matches("mountPath: /etc/spiegel").count(), 2, "{with}");
}

#[test]
fn kubernetes_install_job_runs_install_with_a_backoff_limit() {
    let manifest = manifest("deploy/kubernetes/install-job.yaml");
    let jobs: Vec<&Yaml> = manifest
        .docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Job"))
        .collect();
    assert_eq!(jobs.len(), 1, "{}: one Job", manifest.path);
    let job = jobs[0];
    assert!(
        job["spec"]["backoffLimit"].as_i64().is_some_and(|n| n > 0),
        "the install Job retries (backoffLimit) while CouchDB is not up yet"
    );
    assert!(
        matches!(
            job["spec"]["template"]["spec"]["restartPolicy"].as_str(),
            Some("Never" | "OnFailure")
        ),
        "a Job's restartPolicy is Never or OnFailure"
    );
    let units = kubernetes_units(&manifest);
    assert_eq!(units.len(), 1, "one Spiegel container in the install Job");
    assert_eq!(units[0].command(), "install", "{}", units[0].place);
}

// ---------------------------------------------------------------------------
// Tests: Dockerfile

#[test]
fn dockerfile_final_stage_runs_spiegel_as_a_numeric_non_root_user_without_default_command() {
    let stage = final_stage();
    let user = instructions(&stage, "USER")
        .last()
        .expect("the final stage sets USER");
    let uid = user.split(':').next().unwrap_or_default();
    let uid: u32 = uid.parse().unwrap_or_else(|_| {
        panic!("USER {user}: use a numeric UID, which Kubernetes' runAsNonRoot can check")
    });
    assert_ne!(uid, 0, "USER {user} is root");

    let entrypoint = entrypoint();
    let binary = entrypoint.first().expect("a program");
    assert!(
        binary == "spiegel" || binary.ends_with("/spiegel"),
        "ENTRYPOINT {entrypoint:?} does not run spiegel"
    );
    assert_eq!(
        entrypoint.len(),
        1,
        "ENTRYPOINT {entrypoint:?}: arguments would get in the way of TYPE and subcommands"
    );
    assert_eq!(
        instructions(&stage, "CMD").count(),
        0,
        "no default command: the command comes from TYPE (Spiegel 1.2 style) or arguments"
    );
    if binary.starts_with('/') {
        assert!(
            instructions(&stage, "COPY")
                .any(|copy| copy.starts_with("--from=") && copy.ends_with(&format!(" {binary}"))),
            "no COPY --from=... puts the binary at {binary}"
        );
    }
    let port = admin_port(&reference()).to_string();
    assert!(
        instructions(&stage, "EXPOSE").any(|ports| ports.split_whitespace().any(|p| p == port)),
        "the final stage does not EXPOSE the admin port {port}"
    );
}

#[test]
fn dockerfile_builds_the_release_binary_with_the_locked_dependencies() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "a multi-stage build");
    let build = &stages[..stages.len() - 1];
    assert!(
        build
            .iter()
            .flatten()
            .filter(|i| i.keyword == "RUN")
            .any(|i| i.arguments.contains("cargo build --release --locked")),
        "no `cargo build --release --locked` in a build stage"
    );
    // The last build (the crate itself) builds the spiegel binary only:
    // the benchmark is not shipped, nor compiled for the image.
    let last_build = build
        .iter()
        .flatten()
        .rfind(|i| i.keyword == "RUN" && i.arguments.contains("cargo build"))
        .expect("a cargo build");
    assert!(
        last_build.arguments.contains("--bin spiegel"),
        "{}",
        last_build.arguments
    );
}

#[test]
fn dockerignore_keeps_build_output_node_modules_and_git_out_of_the_context() {
    let ignore = read(".dockerignore");
    let entries: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    for entry in ["target", "testing/couchdb/node_modules", ".git"] {
        assert!(
            entries.contains(entry),
            ".dockerignore does not list {entry}"
        );
    }
}
