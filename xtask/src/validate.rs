//! `cargo xtask test`'s first step: the Kubernetes manifests in deploy/ are checked before any
//! test runs (no Rust test can run a Python validator or read the base as kubectl would).
//!
//! * every file the kustomization lists (and nothing else in deploy/) passes
//!   `kubernetes-validate --strict` against each of [`KUBERNETES_VERSIONS`], and so does the
//!   rendered base when `kubectl kustomize` is on the machine;
//! * the ClusterRole grants get/list/watch on exactly the resources the agent watches;
//! * the DaemonSet is not privileged, drops ALL capabilities (the added ones are printed), every
//!   `$(VAR)` in its args is one of its env variables, and its termination grace period is longer
//!   than the ConfigMap's drain timeout.
//!
//! [`crds`] runs after the build: the CustomResourceDefinitions `mesh-agent crds` prints pass
//! `kubernetes-validate --strict` against the same versions.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    process::{Failure, command, output},
    repo_root, setup, target_dir,
};

/// The oldest Kubernetes the base supports and the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.33", "1.37"];

/// What the agent watches (issue 10): (API group, resource), read-only.
const WATCHED: &[(&str, &str)] = &[
    ("", "pods"),
    ("", "namespaces"),
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("security.istio.io", "authorizationpolicies"),
    ("security.istio.io", "peerauthentications"),
    ("security.istio.io", "requestauthentications"),
    ("gateway.networking.k8s.io", "gateways"),
    ("gateway.networking.k8s.io", "httproutes"),
    ("gateway.networking.k8s.io", "grpcroutes"),
];
const READ_VERBS: &[&str] = &["get", "list", "watch"];

/// One problem in one manifest: the file, the object, the field and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", file.display())]
    Yaml {
        file: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{}: {object}: {source}", file.display())]
    Shape {
        file: PathBuf,
        object: String,
        source: serde_yaml::Error,
    },
    #[error("{}: {object}: {field}: {reason}", file.display())]
    Field {
        file: PathBuf,
        object: String,
        field: String,
        reason: String,
    },
    #[error("{}: no {kind} in the listed resources", dir.display())]
    Missing { dir: PathBuf, kind: &'static str },
    #[error("kubernetes-validate --strict -k {version}:\n{report}")]
    Schema { version: String, report: String },
}

/// Every problem found, reported together.
#[derive(Debug)]
pub struct ManifestErrors(Vec<ManifestError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "deploy/ has {} problem(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl From<ManifestErrors> for Failure {
    fn from(errors: ManifestErrors) -> Self {
        Failure::new(errors.to_string())
    }
}

#[derive(Deserialize)]
struct Kustomization {
    #[serde(default)]
    resources: Vec<String>,
}

#[derive(Deserialize)]
struct Header {
    kind: String,
    metadata: Metadata,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClusterRole {
    #[serde(default)]
    rules: Vec<PolicyRule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyRule {
    #[serde(default)]
    api_groups: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
    #[serde(default, rename = "nonResourceURLs")]
    non_resource_urls: Vec<String>,
}

#[derive(Deserialize)]
struct ConfigMap {
    #[serde(default)]
    data: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct DaemonSet {
    spec: DaemonSetSpec,
}

#[derive(Deserialize)]
struct DaemonSetSpec {
    template: PodTemplate,
}

#[derive(Deserialize)]
struct PodTemplate {
    spec: PodSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    termination_grace_period_seconds: Option<f64>,
    #[serde(default)]
    init_containers: Vec<Container>,
    containers: Vec<Container>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    name: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    security_context: Option<SecurityContext>,
}

#[derive(Deserialize)]
struct EnvVar {
    name: String,
}

#[derive(Deserialize)]
struct SecurityContext {
    privileged: Option<bool>,
    capabilities: Option<Capabilities>,
}

#[derive(Deserialize)]
struct Capabilities {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    drop: Vec<String>,
}

/// One YAML document of a listed file.
struct Document {
    file: PathBuf,
    kind: String,
    name: String,
    value: serde_yaml::Value,
}

impl Document {
    fn object(&self) -> String {
        format!("{} {}", self.kind, self.name)
    }

    fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ManifestError> {
        serde_yaml::from_value(self.value.clone()).map_err(|source| ManifestError::Shape {
            file: self.file.clone(),
            object: self.object(),
            source,
        })
    }

    fn field(&self, field: impl Into<String>, reason: impl Into<String>) -> ManifestError {
        ManifestError::Field {
            file: self.file.clone(),
            object: self.object(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Checks deploy/; the run fails on any problem, after listing all of them.
pub fn run() -> Result<(), Failure> {
    let dir = repo_root().join("deploy");
    let mut errors = Vec::new();
    let files = match listed_files(&dir) {
        Ok(files) => files,
        Err(e) => return Err(ManifestErrors(e).into()),
    };
    let mut documents = Vec::new();
    for file in &files {
        match documents_of(file) {
            Ok(mut docs) => documents.append(&mut docs),
            Err(e) => errors.push(e),
        }
    }
    errors.extend(check_cluster_role(&dir, &documents));
    errors.extend(check_daemonset(&dir, &documents));

    let rendered = render(&dir);
    // The waypoint component's built-in kinds (its Gateway is a CRD the validator has no
    // schema for).
    let waypoint = dir.join("waypoint").join("waypoint.yaml");
    for version in KUBERNETES_VERSIONS {
        let mut inputs = files.clone();
        inputs.extend(rendered.clone());
        inputs.push(waypoint.clone());
        match schema_check(version, &inputs) {
            Ok(()) => println!(
                "validate: {} manifest(s){} pass kubernetes-validate --strict -k {version}",
                files.len() + 1,
                if rendered.is_some() {
                    " and the rendered base"
                } else {
                    ""
                }
            ),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ManifestErrors(errors).into())
    }
}

/// The files the kustomization lists; every other YAML file in deploy/ is an error (it would
/// never be applied, nor validated).
fn listed_files(dir: &Path) -> Result<Vec<PathBuf>, Vec<ManifestError>> {
    let kustomization = dir.join("kustomization.yaml");
    let text = read(&kustomization).map_err(|e| vec![e])?;
    let parsed: Kustomization = serde_yaml::from_str(&text).map_err(|source| {
        vec![ManifestError::Yaml {
            file: kustomization.clone(),
            source,
        }]
    })?;
    let listed: Vec<PathBuf> = parsed.resources.iter().map(|r| dir.join(r)).collect();
    let mut errors = Vec::new();
    for (resource, file) in parsed.resources.iter().zip(&listed) {
        if !file.is_file() {
            errors.push(ManifestError::Field {
                file: kustomization.clone(),
                object: "Kustomization".into(),
                field: "resources".into(),
                reason: format!("{resource} is not a file in deploy/"),
            });
        }
    }
    let entries = fs::read_dir(dir).map_err(|source| {
        vec![ManifestError::Read {
            file: dir.to_path_buf(),
            source,
        }]
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        if yaml && path != kustomization && !listed.contains(&path) {
            errors.push(ManifestError::Field {
                file: kustomization.clone(),
                object: "Kustomization".into(),
                field: "resources".into(),
                reason: format!(
                    "{} is in deploy/ but not listed, so `kubectl apply -k` would skip it",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(listed)
    } else {
        Err(errors)
    }
}

fn read(file: &Path) -> Result<String, ManifestError> {
    fs::read_to_string(file).map_err(|source| ManifestError::Read {
        file: file.to_path_buf(),
        source,
    })
}

fn documents_of(file: &Path) -> Result<Vec<Document>, ManifestError> {
    let text = read(file)?;
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let yaml = |source| ManifestError::Yaml {
            file: file.to_path_buf(),
            source,
        };
        let value = serde_yaml::Value::deserialize(document).map_err(yaml)?;
        if value.is_null() {
            continue;
        }
        let header: Header = serde_yaml::from_value(value.clone()).map_err(yaml)?;
        documents.push(Document {
            file: file.to_path_buf(),
            kind: header.kind,
            name: header.metadata.name,
            value,
        });
    }
    Ok(documents)
}

fn one_of<'a>(
    dir: &Path,
    documents: &'a [Document],
    kind: &'static str,
) -> Result<&'a Document, ManifestError> {
    documents
        .iter()
        .find(|d| d.kind == kind)
        .ok_or(ManifestError::Missing {
            dir: dir.to_path_buf(),
            kind,
        })
}

/// get/list/watch on exactly [`WATCHED`], nothing more: no other verb, resource, wildcard,
/// subresource or non-resource URL.
fn check_cluster_role(dir: &Path, documents: &[Document]) -> Vec<ManifestError> {
    let document = match one_of(dir, documents, "ClusterRole") {
        Ok(d) => d,
        Err(e) => return vec![e],
    };
    let role: ClusterRole = match document.parse() {
        Ok(r) => r,
        Err(e) => return vec![e],
    };
    let mut errors = Vec::new();
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (i, rule) in role.rules.iter().enumerate() {
        if !rule.non_resource_urls.is_empty() {
            errors.push(document.field(
                format!("rules[{i}].nonResourceURLs"),
                "the agent reads no non-resource URL",
            ));
        }
        if !rule.resource_names.is_empty() {
            errors.push(document.field(
                format!("rules[{i}].resourceNames"),
                "the agent watches whole collections",
            ));
        }
        for verb in &rule.verbs {
            if !READ_VERBS.contains(&verb.as_str()) {
                errors.push(document.field(
                    format!("rules[{i}].verbs"),
                    format!("{verb:?} is not allowed (only get, list, watch)"),
                ));
            }
        }
        for group in &rule.api_groups {
            for resource in &rule.resources {
                if !WATCHED.contains(&(group.as_str(), resource.as_str())) {
                    errors.push(document.field(
                        format!("rules[{i}]"),
                        format!(
                            "grants {}/{resource}, which the agent does not watch",
                            shown_group(group)
                        ),
                    ));
                    continue;
                }
                granted
                    .entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    for (group, resource) in WATCHED {
        let verbs = granted
            .get(&(group.to_string(), resource.to_string()))
            .cloned()
            .unwrap_or_default();
        let missing: Vec<&str> = READ_VERBS
            .iter()
            .copied()
            .filter(|v| !verbs.contains(*v))
            .collect();
        if !missing.is_empty() {
            errors.push(document.field(
                "rules",
                format!(
                    "{}/{resource} lacks {}",
                    shown_group(group),
                    missing.join(", ")
                ),
            ));
        }
    }
    if errors.is_empty() {
        println!(
            "validate: ClusterRole {} grants get, list, watch on exactly: {}",
            document.name,
            WATCHED
                .iter()
                .map(|(g, r)| format!("{}/{r}", shown_group(g)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    errors
}

fn shown_group(group: &str) -> &str {
    if group.is_empty() { "core" } else { group }
}

/// Not privileged, ALL dropped (the added capabilities are printed), `$(VAR)` references that
/// resolve, and a grace period longer than the drain timeout.
fn check_daemonset(dir: &Path, documents: &[Document]) -> Vec<ManifestError> {
    let (document, daemonset) = match one_of(dir, documents, "DaemonSet")
        .and_then(|d| d.parse::<DaemonSet>().map(|ds| (d, ds)))
    {
        Ok(found) => found,
        Err(e) => return vec![e],
    };
    let mut errors = Vec::new();
    let spec = &daemonset.spec.template.spec;
    let containers = spec
        .init_containers
        .iter()
        .map(|c| ("initContainers", c))
        .chain(spec.containers.iter().map(|c| ("containers", c)));
    for (list, container) in containers {
        let at = format!("spec.template.spec.{list}[{}]", container.name);
        let context = container.security_context.as_ref();
        if context.and_then(|c| c.privileged) == Some(true) {
            errors.push(document.field(
                format!("{at}.securityContext.privileged"),
                "must not be true",
            ));
        }
        let capabilities = context.and_then(|c| c.capabilities.as_ref());
        if !capabilities.is_some_and(|c| c.drop.iter().any(|d| d == "ALL")) {
            errors.push(document.field(
                format!("{at}.securityContext.capabilities.drop"),
                "must contain ALL",
            ));
        }
        let added = capabilities.map(|c| c.add.join(", ")).unwrap_or_default();
        println!(
            "validate: DaemonSet {} {list} {}: capabilities: drop ALL, add [{added}]",
            document.name, container.name
        );
        let defined: BTreeSet<&str> = container.env.iter().map(|e| e.name.as_str()).collect();
        for (i, arg) in container.args.iter().enumerate() {
            for var in references(arg) {
                if !defined.contains(var) {
                    errors.push(document.field(
                        format!("{at}.args[{i}]"),
                        format!("$({var}) is not one of the container's env variables"),
                    ));
                }
            }
        }
    }
    errors.extend(check_grace_period(dir, documents, document, spec));
    errors
}

/// The kubelet kills the agent after the grace period: its drain must end before.
fn check_grace_period(
    dir: &Path,
    documents: &[Document],
    daemonset: &Document,
    spec: &PodSpec,
) -> Option<ManifestError> {
    let configmap = match one_of(dir, documents, "ConfigMap").and_then(|d| {
        d.parse::<ConfigMap>()
            .map(|c| (d, c.data.get("DRAIN_TIMEOUT").cloned()))
    }) {
        Ok(found) => found,
        Err(e) => return Some(e),
    };
    let (document, drain) = configmap;
    let Some(drain) = drain else {
        return Some(document.field("data.DRAIN_TIMEOUT", "missing"));
    };
    let Ok(drain_seconds) = drain.trim().parse::<f64>() else {
        return Some(document.field(
            "data.DRAIN_TIMEOUT",
            format!("{drain:?} is not a number of seconds"),
        ));
    };
    // Kubernetes' default when the field is absent.
    let grace = spec.termination_grace_period_seconds.unwrap_or(30.0);
    if grace <= drain_seconds {
        return Some(daemonset.field(
            "spec.template.spec.terminationGracePeriodSeconds",
            format!(
                "{grace} s is not longer than the ConfigMap's DRAIN_TIMEOUT ({drain_seconds} s)"
            ),
        ));
    }
    None
}

/// The `$(NAME)` references Kubernetes expands in an argument (`$$(NAME)` is an escaped one).
fn references(arg: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        let escaped = rest[..start].ends_with('$');
        let after = &rest[start + 2..];
        let Some(end) = after.find(')') else { break };
        if !escaped {
            found.push(&after[..end]);
        }
        rest = &after[end + 1..];
    }
    found
}

/// `mesh-agent crds` (the built `agent`) into target/xtask/crds.yaml, then
/// `kubernetes-validate --strict` on it against each of [`KUBERNETES_VERSIONS`].
pub fn crds(agent: &Path) -> Result<(), Failure> {
    let shown = format!("{} crds", agent.display());
    let out = command(agent)
        .arg("crds")
        .output()
        .map_err(|e| Failure::new(format!("cannot start `{shown}`: {e}")))?;
    if !out.status.success() {
        return Err(Failure::new(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let file = target_dir().join("xtask").join("crds.yaml");
    file.parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| fs::write(&file, &out.stdout))
        .map_err(|e| Failure::new(format!("cannot write {}: {e}", file.display())))?;
    let mut problems = Vec::new();
    for version in KUBERNETES_VERSIONS {
        match schema_check(version, std::slice::from_ref(&file)) {
            Ok(()) => println!(
                "validate: `mesh-agent crds` passes kubernetes-validate --strict -k {version}"
            ),
            Err(e) => problems.push(format!("  {e}")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(format!(
            "`mesh-agent crds` ({}) has {} problem(s):\n{}",
            file.display(),
            problems.len(),
            problems.join("\n")
        )))
    }
}

/// `kubectl kustomize deploy/` into target/, when kubectl is on the machine (it is not
/// something setup installs: without it the listed files are still validated one by one).
fn render(dir: &Path) -> Option<PathBuf> {
    let Some(rendered) = output(command("kubectl").arg("kustomize").arg(dir)) else {
        println!(
            "validate: kubectl not found or `kubectl kustomize` failed: the rendered base is not validated"
        );
        return None;
    };
    let out = target_dir().join("xtask").join("deploy-rendered.yaml");
    let written = out
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| fs::write(&out, rendered));
    match written {
        Ok(()) => Some(out),
        Err(e) => {
            println!(
                "validate: cannot write {}: {e}: the rendered base is not validated",
                out.display()
            );
            None
        }
    }
}

/// Any error, and any warning (which for built-in kinds means a kind or apiVersion it has no
/// schema for), fails.
fn schema_check(version: &str, files: &[PathBuf]) -> Result<(), ManifestError> {
    let bin = setup::kubernetes_validate_bin();
    let mut cmd = command(&bin);
    cmd.args(["--strict", "--quiet", "-k", version]).args(files);
    let result = cmd.output();
    let report = match result {
        Ok(out) if out.status.success() && out.stdout.is_empty() && out.stderr.is_empty() => {
            return Ok(());
        }
        Ok(out) => format!(
            "{}{}({})",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            out.status
        ),
        Err(e) => format!(
            "cannot start {}: {e} (`cargo xtask setup` installs it)",
            bin.display()
        ),
    };
    Err(ManifestError::Schema {
        version: version.to_string(),
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn documents(yaml: &str) -> Vec<Document> {
        let file = Path::new("deploy/test.yaml");
        let dir = std::env::temp_dir().join(format!("xtask-validate-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(file.file_name().unwrap());
        fs::write(&path, yaml).unwrap();
        documents_of(&path).unwrap()
    }

    #[test]
    fn a_failing_crds_command_is_named() {
        let error = crds(Path::new("/bin/false")).expect_err("false fails");
        assert!(
            error.to_string().contains("`/bin/false crds` failed"),
            "{error}"
        );
    }

    #[test]
    fn finds_variable_references() {
        assert_eq!(references("--node=$(NODE_NAME)"), vec!["NODE_NAME"]);
        assert_eq!(references("$(A)-$(B)"), vec!["A", "B"]);
        assert!(references("$$(ESCAPED) plain").is_empty());
    }

    #[test]
    fn the_shipped_base_passes_the_rbac_and_daemonset_checks() {
        let dir = repo_root().join("deploy");
        let files = listed_files(&dir).unwrap();
        let docs: Vec<Document> = files
            .iter()
            .flat_map(|f| documents_of(f).unwrap())
            .collect();
        assert!(check_cluster_role(&dir, &docs).is_empty());
        assert!(check_daemonset(&dir, &docs).is_empty());
    }

    #[test]
    fn a_write_verb_or_an_extra_resource_is_named() {
        let docs = documents(
            "kind: ClusterRole\nmetadata: {name: r}\nrules:\n\
             - apiGroups: ['']\n  resources: [pods, namespaces, services, secrets]\n  verbs: [get, list, watch, create]\n",
        );
        let errors: Vec<String> = check_cluster_role(Path::new("deploy"), &docs)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            errors
                .iter()
                .any(|e| e.contains("rules[0].verbs: \"create\" is not allowed"))
        );
        assert!(errors.iter().any(|e| e.contains("grants core/secrets")));
        assert!(
            errors
                .iter()
                .any(|e| e.contains("discovery.k8s.io/endpointslices lacks get, list, watch"))
        );
    }
}
