//! The mesh's view of an Istio `AuthorizationPolicy`: checked, with typed IP blocks, ports and patterns.
//!
//! Evaluation lives in [`crate::policy`]; this module only turns the resource into something that
//! cannot be malformed, naming the field of every problem.

use super::small_map::Labels;
use std::collections::BTreeMap;

use serde::Serialize;

use super::cidr::{Cidr, CidrError};
use super::istio::{
    AuthorizationPolicyResource, ConditionSpec, OperationSpec, RuleSpec, Scalar, SourceSpec,
};
use super::namespace::namespace_of;
use super::path_pattern::{PathPattern, PathPatternError};
use super::policy_target::{Attachment, PolicyTarget, TargetRefError};
use super::string_match::StringMatch;

/// The annotation that makes a policy report what it would do instead of doing it.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    /// `spec.selector.matchLabels`; empty selects every workload of the namespace
    /// (of the mesh, in the root namespace).
    pub selector: Labels,
    /// `spec.targetRefs` (and `targetRef`): set, the policy is for waypoints only, attached to
    /// these; node agents never apply it, and waypoints apply nothing else.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<PolicyTarget>>,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
    pub dry_run: bool,
    /// Why the policy as written cannot be understood: it then stands as a DENY of everything
    /// for the workloads it selects ([`AuthorizationPolicy::fail_closed`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
}

/// `spec.action`. `CUSTOM` is rejected when the policy is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Only asks for logging; the agent has no audit log, so it ignores these policies.
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule: `from` (any entry), `to` (any entry) and `when` (every condition); empty parts match all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// `from[].source`: every field present must match. Request principals are kept as written:
/// they are L7 attributes the agent cannot see. Remote IP blocks are parsed (a malformed one is
/// rejected) but count as L7 too: the remote IP is the client address a proxy in front forwarded
/// (`X-Forwarded-For`, PROXY protocol), which only an L7 proxy learns — istiod and ztunnel treat
/// `remoteIpBlocks` that way in ambient mode, like the `remote.ip` condition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    /// `<iss>/<sub>` of the request's validated JWT.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// The trust domain of the peer's identity (`cluster.local` of `cluster.local/ns/a/sa/b`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_trust_domains: Vec<StringMatch>,
    /// `<namespace>/<serviceaccount>`, matched against the peer identity in any trust domain.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<Cidr>,
}

impl Source {
    /// Whether the source names attributes only an L7 proxy sees.
    pub fn uses_l7(&self) -> bool {
        !self.request_principals.is_empty()
            || !self.not_request_principals.is_empty()
            || !self.remote_ip_blocks.is_empty()
            || !self.not_remote_ip_blocks.is_empty()
    }
}

/// `to[].operation`: ports are L4; hosts, methods and paths are HTTP attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
    /// Matched against `:authority`, ignoring case (and its port when the pattern has none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathPattern>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<PathPattern>,
}

impl Operation {
    pub fn uses_l7(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
}

/// `when[]`: the key's value must be one of `values` (when set) and none of `notValues` (when set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    pub key: String,
    #[serde(flatten)]
    pub test: ConditionTest,
}

/// The values of a condition, typed by the attribute its key names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ConditionTest {
    SourceIp(Values<Cidr>),
    SourceNamespace(Values<StringMatch>),
    SourcePrincipal(Values<StringMatch>),
    DestinationIp(Values<Cidr>),
    DestinationPort(Values<u16>),
    /// `source.serviceAccount`: `<namespace>/<account>` of the peer.
    SourceServiceAccount(Values<String>),
    /// `source.trustDomain`.
    SourceTrustDomain(Values<StringMatch>),
    /// `remote.ip`: the original client (see [`crate::policy::RequestAttributes`]).
    RemoteIp(Values<Cidr>),
    /// `request.headers[<name>]`.
    RequestHeader {
        #[serde(skip)]
        name: String,
        #[serde(flatten)]
        values: Values<StringMatch>,
    },
    /// `request.auth.principal`, `request.auth.audiences`, `request.auth.presenter`.
    RequestAuth {
        #[serde(skip)]
        field: AuthField,
        #[serde(flatten)]
        values: Values<StringMatch>,
    },
    /// `request.auth.claims[a][b]...`.
    RequestClaim {
        #[serde(skip)]
        path: Vec<String>,
        #[serde(flatten)]
        values: Values<StringMatch>,
    },
    /// A key the mesh cannot evaluate (`connection.sni`, `experimental.*`, or unknown): an ALLOW
    /// rule with it never matches, a DENY rule ignores it, so it fails closed.
    Unsupported(Values<String>),
}

/// Which `request.auth` attribute a condition reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AuthField {
    #[default]
    Principal,
    Audiences,
    Presenter,
}

impl ConditionTest {
    /// Whether only an L7 proxy sees the attribute (a node agent cannot check it).
    pub fn is_l7(&self) -> bool {
        matches!(
            self,
            ConditionTest::RemoteIp(_)
                | ConditionTest::RequestHeader { .. }
                | ConditionTest::RequestAuth { .. }
                | ConditionTest::RequestClaim { .. }
                | ConditionTest::Unsupported(_)
                | ConditionTest::SourceServiceAccount(_)
                | ConditionTest::SourceTrustDomain(_)
        )
    }
}

/// The positive and negative values of a condition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Values<T> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<T>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<T>,
}

impl Rule {
    /// Whether any part of the rule names an attribute only an L7 proxy sees.
    pub fn uses_l7(&self) -> bool {
        self.from.iter().any(Source::uses_l7)
            || self.to.iter().any(Operation::uses_l7)
            || self.when.iter().any(|condition| condition.test.is_l7())
    }
}

/// A policy the agent cannot use; the field is carried beside it (see [`AuthorizationPolicy::from_resource`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizationError {
    #[error(transparent)]
    Target(#[from] TargetRefError),
    #[error("CUSTOM is not supported: the mesh has no external authorization")]
    Custom,
    #[error("{0:?} is not an action (ALLOW, DENY, AUDIT, CUSTOM)")]
    UnknownAction(String),
    #[error("{0:?} must be \"true\" or \"false\"")]
    DryRun(String),
    #[error(transparent)]
    Cidr(#[from] CidrError),
    #[error(transparent)]
    Path(#[from] PathPatternError),
    #[error("{0:?} is not request.headers[<name>] with a valid header name")]
    HeaderKey(String),
    #[error("{0:?} is not request.auth.claims[<name>]...")]
    ClaimKey(String),
    #[error("{0:?} is not a port number (1-65535)")]
    Port(String),
    #[error("{0:?} is not <namespace>/<serviceaccount>")]
    ServiceAccount(String),
    #[error("must not be empty")]
    Empty,
    #[error("at least one of values or notValues must be set")]
    NoValues,
    #[error("{0}")]
    Unreadable(String),
    #[error("has {count} rules, over the limit of {MAX_RULES}")]
    TooManyRules { count: usize },
}

/// Most rules one policy may have: the rules are tried in turn for every connection, and a
/// policy that needs more is better split by selector.
pub const MAX_RULES: usize = 1000;

/// Problems with the field path of each, e.g. `spec.rules[0].from[0].source.ipBlocks[1]`.
pub type FieldErrors = Vec<(String, AuthorizationError)>;

impl AuthorizationPolicy {
    /// Builds the model, returning every problem. `metadata.name` is checked by the caller.
    pub fn from_resource(resource: &AuthorizationPolicyResource) -> Result<Self, FieldErrors> {
        if let Some((field, reason)) = &resource.unreadable {
            return Err(vec![(
                field.clone(),
                AuthorizationError::Unreadable(reason.clone()),
            )]);
        }
        let mut check = Check::default();
        let spec = &resource.spec;
        let (targets, target_errors) = attachment(resource).targets();
        for (field, error) in target_errors {
            check.fail(&field, error.into());
        }
        let action = match spec.action.as_deref() {
            None | Some("ALLOW") => Action::Allow,
            Some("DENY") => Action::Deny,
            Some("AUDIT") => Action::Audit,
            Some("CUSTOM") => {
                check.fail("spec.action", AuthorizationError::Custom);
                Action::Allow
            }
            Some(other) => {
                check.fail(
                    "spec.action",
                    AuthorizationError::UnknownAction(other.to_string()),
                );
                Action::Allow
            }
        };
        let dry_run = dry_run(&resource.metadata.annotations, &mut check);
        if spec.rules.len() > MAX_RULES {
            check.fail(
                "spec.rules",
                AuthorizationError::TooManyRules {
                    count: spec.rules.len(),
                },
            );
            return Err(check.errors);
        }
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| check.rule(&format!("spec.rules[{index}]"), rule))
            .collect();
        if !check.errors.is_empty() {
            return Err(check.errors);
        }
        Ok(AuthorizationPolicy {
            name: resource.metadata.name.clone().unwrap_or_default(),
            namespace: namespace_of(&resource.metadata).to_string(),
            selector: attachment(resource).selector(),
            targets,
            action,
            rules,
            dry_run,
            invalid: None,
        })
    }

    /// What a policy that cannot be understood becomes, Istio's rule for what cannot be
    /// enforced: a DENY of all traffic to the workloads it selects, until it is fixed. A
    /// broken policy is never dropped (that could open what it was written to close) and never
    /// dry-run (an unreadable annotation cannot be trusted to say so).
    pub fn fail_closed(
        resource: &AuthorizationPolicyResource,
        problems: &FieldErrors,
    ) -> AuthorizationPolicy {
        let reason = problems
            .iter()
            .map(|(field, problem)| format!("{field}: {problem}"))
            .collect::<Vec<_>>()
            .join("; ");
        AuthorizationPolicy {
            name: resource.metadata.name.clone().unwrap_or_default(),
            namespace: namespace_of(&resource.metadata).to_string(),
            selector: attachment(resource).selector(),
            targets: attachment(resource).targets().0,
            action: Action::Deny,
            rules: vec![Rule::default()],
            dry_run: false,
            invalid: Some(reason),
        }
    }

    /// Whether the policy is for waypoints (it has `targetRefs`), not node agents.
    pub fn is_for_waypoints(&self) -> bool {
        self.targets.is_some()
    }

    /// `namespace/name`, as decisions and listings name policies.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the policy applies to, as written.
fn attachment(resource: &AuthorizationPolicyResource) -> Attachment<'_> {
    Attachment {
        selector: resource.spec.selector.as_ref(),
        target_ref: resource.spec.target_ref.as_ref(),
        target_refs: &resource.spec.target_refs,
        namespace: namespace_of(&resource.metadata),
    }
}

/// Reads the dry-run annotation with Go's `strconv.ParseBool` spellings, as Istio does; anything
/// else is rejected rather than silently enforced.
fn dry_run(annotations: &Option<BTreeMap<String, String>>, check: &mut Check) -> bool {
    let Some(value) = annotations
        .as_ref()
        .and_then(|annotations| annotations.get(DRY_RUN_ANNOTATION))
    else {
        return false;
    };
    match value.as_str() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
        "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
        other => {
            check.fail(
                &format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
                AuthorizationError::DryRun(other.to_string()),
            );
            false
        }
    }
}

/// Collects problems while building the model, so every one is reported.
#[derive(Default)]
struct Check {
    errors: FieldErrors,
}

impl Check {
    fn fail(&mut self, field: &str, error: AuthorizationError) {
        self.errors.push((field.to_string(), error));
    }

    fn rule(&mut self, field: &str, rule: &RuleSpec) -> Rule {
        let from = rule
            .from
            .iter()
            .enumerate()
            .filter_map(|(index, from)| {
                let field = format!("{field}.from[{index}].source");
                match &from.source {
                    Some(source) => self.source(&field, source),
                    None => {
                        self.fail(&field, AuthorizationError::Empty);
                        None
                    }
                }
            })
            .collect();
        let to = rule
            .to
            .iter()
            .enumerate()
            .filter_map(|(index, to)| {
                let field = format!("{field}.to[{index}].operation");
                match &to.operation {
                    Some(operation) => self.operation(&field, operation),
                    None => {
                        self.fail(&field, AuthorizationError::Empty);
                        None
                    }
                }
            })
            .collect();
        let when = rule
            .when
            .iter()
            .enumerate()
            .filter_map(|(index, condition)| {
                self.condition(&format!("{field}.when[{index}]"), condition)
            })
            .collect();
        Rule { from, to, when }
    }

    /// An empty source is rejected, as Istio does: it would match every peer.
    fn source(&mut self, field: &str, spec: &SourceSpec) -> Option<Source> {
        if *spec == SourceSpec::default() {
            self.fail(field, AuthorizationError::Empty);
            return None;
        }
        let patterns = |values: &[String]| values.iter().map(|v| StringMatch::parse(v)).collect();
        Some(Source {
            principals: patterns(&spec.principals),
            not_principals: patterns(&spec.not_principals),
            request_principals: patterns(&spec.request_principals),
            not_request_principals: patterns(&spec.not_request_principals),
            namespaces: patterns(&spec.namespaces),
            not_namespaces: patterns(&spec.not_namespaces),
            trust_domains: patterns(&spec.trust_domains),
            not_trust_domains: patterns(&spec.not_trust_domains),
            service_accounts: self
                .service_accounts(&format!("{field}.serviceAccounts"), &spec.service_accounts),
            not_service_accounts: self.service_accounts(
                &format!("{field}.notServiceAccounts"),
                &spec.not_service_accounts,
            ),
            ip_blocks: self.cidrs(&format!("{field}.ipBlocks"), &spec.ip_blocks),
            not_ip_blocks: self.cidrs(&format!("{field}.notIpBlocks"), &spec.not_ip_blocks),
            remote_ip_blocks: self
                .cidrs(&format!("{field}.remoteIpBlocks"), &spec.remote_ip_blocks),
            not_remote_ip_blocks: self.cidrs(
                &format!("{field}.notRemoteIpBlocks"),
                &spec.not_remote_ip_blocks,
            ),
        })
    }

    /// An empty operation is rejected, as Istio does: it would match every connection.
    fn operation(&mut self, field: &str, spec: &OperationSpec) -> Option<Operation> {
        if *spec == OperationSpec::default() {
            self.fail(field, AuthorizationError::Empty);
            return None;
        }
        Some(Operation {
            ports: self.ports(&format!("{field}.ports"), &spec.ports),
            not_ports: self.ports(&format!("{field}.notPorts"), &spec.not_ports),
            hosts: hosts(&spec.hosts),
            not_hosts: hosts(&spec.not_hosts),
            methods: spec.methods.clone(),
            not_methods: spec.not_methods.clone(),
            paths: self.paths(&format!("{field}.paths"), &spec.paths),
            not_paths: self.paths(&format!("{field}.notPaths"), &spec.not_paths),
        })
    }

    fn condition(&mut self, field: &str, spec: &ConditionSpec) -> Option<Condition> {
        if spec.key.is_empty() {
            self.fail(&format!("{field}.key"), AuthorizationError::Empty);
            return None;
        }
        if spec.values.is_empty() && spec.not_values.is_empty() {
            self.fail(field, AuthorizationError::NoValues);
            return None;
        }
        let values = format!("{field}.values");
        let not_values = format!("{field}.notValues");
        let test = match spec.key.as_str() {
            "source.ip" => ConditionTest::SourceIp(Values {
                values: self.cidrs(&values, &spec.values),
                not_values: self.cidrs(&not_values, &spec.not_values),
            }),
            "destination.ip" => ConditionTest::DestinationIp(Values {
                values: self.cidrs(&values, &spec.values),
                not_values: self.cidrs(&not_values, &spec.not_values),
            }),
            "destination.port" => ConditionTest::DestinationPort(Values {
                values: self.ports(&values, &spec.values),
                not_values: self.ports(&not_values, &spec.not_values),
            }),
            "source.namespace" => ConditionTest::SourceNamespace(patterns(spec)),
            "source.principal" => ConditionTest::SourcePrincipal(patterns(spec)),
            "source.trustDomain" => ConditionTest::SourceTrustDomain(patterns(spec)),
            "source.serviceAccount" => ConditionTest::SourceServiceAccount(Values {
                values: self.service_accounts(&values, &texts(&spec.values)),
                not_values: self.service_accounts(&not_values, &texts(&spec.not_values)),
            }),
            "remote.ip" => ConditionTest::RemoteIp(Values {
                values: self.cidrs(&values, &spec.values),
                not_values: self.cidrs(&not_values, &spec.not_values),
            }),
            "request.auth.principal" => ConditionTest::RequestAuth {
                field: AuthField::Principal,
                values: patterns(spec),
            },
            "request.auth.audiences" => ConditionTest::RequestAuth {
                field: AuthField::Audiences,
                values: patterns(spec),
            },
            "request.auth.presenter" => ConditionTest::RequestAuth {
                field: AuthField::Presenter,
                values: patterns(spec),
            },
            key if key.starts_with("request.headers") => {
                let name = bracketed(key, "request.headers")
                    .filter(|names| names.len() == 1)
                    .map(|mut names| names.remove(0).to_ascii_lowercase())
                    .filter(|name| http::HeaderName::from_bytes(name.as_bytes()).is_ok());
                let Some(name) = name else {
                    self.fail(
                        &format!("{field}.key"),
                        AuthorizationError::HeaderKey(key.into()),
                    );
                    return None;
                };
                ConditionTest::RequestHeader {
                    name,
                    values: patterns(spec),
                }
            }
            key if key.starts_with("request.auth.claims") => {
                let Some(path) = bracketed(key, "request.auth.claims") else {
                    self.fail(
                        &format!("{field}.key"),
                        AuthorizationError::ClaimKey(key.into()),
                    );
                    return None;
                };
                ConditionTest::RequestClaim {
                    path,
                    values: patterns(spec),
                }
            }
            _ => ConditionTest::Unsupported(Values {
                values: texts(&spec.values),
                not_values: texts(&spec.not_values),
            }),
        };
        Some(Condition {
            key: spec.key.clone(),
            test,
        })
    }

    fn cidrs<T: AsRef<str>>(&mut self, field: &str, values: &[T]) -> Vec<Cidr> {
        values
            .iter()
            .enumerate()
            .filter_map(|(index, value)| {
                value
                    .as_ref()
                    .parse::<Cidr>()
                    .map_err(|error| self.fail(&format!("{field}[{index}]"), error.into()))
                    .ok()
            })
            .collect()
    }

    fn paths(&mut self, field: &str, values: &[String]) -> Vec<PathPattern> {
        values
            .iter()
            .enumerate()
            .filter_map(|(index, value)| {
                PathPattern::parse(value)
                    .map_err(|error| self.fail(&format!("{field}[{index}]"), error.into()))
                    .ok()
            })
            .collect()
    }

    fn ports(&mut self, field: &str, values: &[Scalar]) -> Vec<u16> {
        values
            .iter()
            .enumerate()
            .filter_map(|(index, value)| {
                let port = value.port();
                if port.is_none() {
                    self.fail(
                        &format!("{field}[{index}]"),
                        AuthorizationError::Port(value.0.clone()),
                    );
                }
                port
            })
            .collect()
    }

    fn service_accounts(&mut self, field: &str, values: &[String]) -> Vec<String> {
        for (index, value) in values.iter().enumerate() {
            let well_formed = value
                .split_once('/')
                .is_some_and(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'));
            if !well_formed {
                self.fail(
                    &format!("{field}[{index}]"),
                    AuthorizationError::ServiceAccount(value.clone()),
                );
            }
        }
        values.to_vec()
    }
}

fn patterns(spec: &ConditionSpec) -> Values<StringMatch> {
    let parse = |values: &[Scalar]| values.iter().map(|v| StringMatch::parse(&v.0)).collect();
    Values {
        values: parse(&spec.values),
        not_values: parse(&spec.not_values),
    }
}

/// Host patterns, lowercased: hosts match without regard to case.
fn hosts(values: &[String]) -> Vec<StringMatch> {
    values
        .iter()
        .map(|host| StringMatch::parse(&host.to_ascii_lowercase()))
        .collect()
}

/// `prefix[a][b]` as `["a", "b"]`: at least one non-empty name, nothing else after `prefix`.
fn bracketed(key: &str, prefix: &str) -> Option<Vec<String>> {
    let mut rest = key.strip_prefix(prefix)?;
    let mut names = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        let name = &inner[..end];
        if name.is_empty() || name.contains('[') {
            return None;
        }
        names.push(name.to_string());
        rest = &inner[end + 1..];
    }
    (!names.is_empty()).then_some(names)
}

fn texts(values: &[Scalar]) -> Vec<String> {
    values.iter().map(|value| value.0.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Result<AuthorizationPolicy, Vec<String>> {
        let value: serde_yaml::Value = serde_yaml::from_str(text).expect("yaml");
        let resource: AuthorizationPolicyResource =
            serde_path_to_error::deserialize(value).expect("well-typed");
        AuthorizationPolicy::from_resource(&resource).map_err(|errors| {
            errors
                .into_iter()
                .map(|(field, error)| format!("{field}: {error}"))
                .collect()
        })
    }

    #[test]
    fn a_policy_over_the_rule_limit_is_refused_whole() {
        let rules = "{}, ".repeat(MAX_RULES + 1);
        let text = format!("metadata: {{name: p, namespace: shop}}\nspec:\n  rules: [{rules}]\n");
        assert_eq!(
            policy(&text),
            Err(vec![format!(
                "spec.rules: has {} rules, over the limit of {MAX_RULES}",
                MAX_RULES + 1
            )])
        );
        let fits = "{}, ".repeat(MAX_RULES);
        let text = format!("metadata: {{name: p, namespace: shop}}\nspec:\n  rules: [{fits}]\n");
        assert_eq!(policy(&text).map(|p| p.rules.len()), Ok(MAX_RULES));
    }

    #[test]
    fn builds_a_full_policy() {
        let policy = policy(
            "metadata: {name: p, namespace: shop, annotations: {istio.io/dry-run: \"true\"}}
spec:
  selector: {matchLabels: {app: cart}}
  action: DENY
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/shop/*\"]
        notNamespaces: [batch]
        ipBlocks: [10.0.0.0/8, 192.168.1.7]
        serviceAccounts: [shop/web]
        requestPrincipals: [\"*\"]
    to:
    - operation: {ports: [\"80\", 8080], notPorts: [\"9090\"], methods: [GET]}
    when:
    - {key: destination.port, values: [443]}
    - {key: source.ip, notValues: [10.1.0.0/16]}
    - {key: \"request.headers[x-user]\", values: [admin]}
",
        )
        .expect("valid");
        assert_eq!(policy.key(), "shop/p");
        assert_eq!(policy.action, Action::Deny);
        assert!(policy.dry_run);
        assert_eq!(policy.selector.value("app"), Some("cart"));
        let rule = &policy.rules[0];
        assert_eq!(
            rule.from[0].principals,
            [StringMatch::Prefix("cluster.local/ns/shop/".into())]
        );
        assert_eq!(
            rule.from[0].ip_blocks,
            [
                "10.0.0.0/8".parse::<Cidr>().expect("cidr"),
                "192.168.1.7/32".parse().expect("cidr")
            ]
        );
        assert_eq!(rule.to[0].ports, [80, 8080]);
        assert_eq!(rule.to[0].not_ports, [9090]);
        assert_eq!(
            rule.when[0].test,
            ConditionTest::DestinationPort(Values {
                values: vec![443],
                not_values: vec![]
            })
        );
        assert!(matches!(rule.when[1].test, ConditionTest::SourceIp(_)));
        assert!(rule.when[2].test.is_l7());
        assert!(rule.from[0].uses_l7() && rule.to[0].uses_l7() && rule.uses_l7());
    }

    #[test]
    fn defaults() {
        let policy = policy("metadata: {name: p}\n").expect("valid");
        assert_eq!(policy.namespace, "default");
        assert_eq!(policy.action, Action::Allow);
        assert!(policy.rules.is_empty());
        assert!(policy.selector.is_empty());
        assert!(!policy.dry_run);
        let rule = &self::policy("metadata: {name: p}\nspec: {rules: [{}]}\n")
            .expect("valid")
            .rules[0];
        assert_eq!(*rule, Rule::default());
        assert!(!rule.uses_l7());
    }

    #[test]
    fn actions() {
        let cases = [
            ("ALLOW", Ok(Action::Allow)),
            ("DENY", Ok(Action::Deny)),
            ("AUDIT", Ok(Action::Audit)),
            (
                "CUSTOM",
                Err("spec.action: CUSTOM is not supported: the mesh has no external authorization"),
            ),
            (
                "allow",
                Err("spec.action: \"allow\" is not an action (ALLOW, DENY, AUDIT, CUSTOM)"),
            ),
            (
                "\"\"",
                Err("spec.action: \"\" is not an action (ALLOW, DENY, AUDIT, CUSTOM)"),
            ),
        ];
        for (action, expected) in cases {
            let result = policy(&format!(
                "metadata: {{name: p}}\nspec: {{action: {action}}}\n"
            ))
            .map(|policy| policy.action);
            assert_eq!(
                result,
                expected.map_err(|e| vec![e.to_string()]),
                "{action}"
            );
        }
    }

    #[test]
    fn dry_run_spellings() {
        let cases = [
            ("\"true\"", Ok(true)),
            ("\"True\"", Ok(true)),
            ("\"1\"", Ok(true)),
            ("\"false\"", Ok(false)),
            ("\"0\"", Ok(false)),
            (
                "\"yes\"",
                Err(
                    "metadata.annotations[istio.io/dry-run]: \"yes\" must be \"true\" or \"false\"",
                ),
            ),
        ];
        for (value, expected) in cases {
            let result = policy(&format!(
                "metadata: {{name: p, annotations: {{istio.io/dry-run: {value}}}}}\n"
            ))
            .map(|policy| policy.dry_run);
            assert_eq!(result, expected.map_err(|e| vec![e.to_string()]), "{value}");
        }
    }

    #[test]
    fn rejects_every_malformed_field() {
        let errors = policy(
            "metadata: {name: p}
spec:
  selector: {matchLabels: {app: web}}
  targetRef: {kind: Gateway, name: gw}
  targetRefs: [{kind: Service, name: web}, {group: gateway.networking.k8s.io, kind: Gateway, name: gw, namespace: other}]
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/8, 10.0.0.x], notRemoteIpBlocks: [1.2.3.4/40]}
    - {}
    - source: {}
    - source: {serviceAccounts: [web, ns/sa, /sa]}
    to:
    - operation: {ports: [\"0\", 65536, http], notPorts: [\"80\"]}
    - operation: {}
    when:
    - {key: destination.port, values: [\"99999\"]}
    - {key: destination.ip, notValues: [nope]}
    - {key: source.ip}
    - {key: \"\", values: [a]}
",
        )
        .expect_err("malformed");
        assert_eq!(
            errors,
            [
                "spec.selector: cannot be used together with targetRefs or targetRef",
                "spec.targetRef.kind: \"\"/Gateway is not a kind a policy attaches to (Gateway, Service, GatewayClass)",
                "spec.targetRefs[1].namespace: \"other\" must be the policy's own namespace",
                "spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0.x\" is not an IP address or CIDR block",
                "spec.rules[0].from[0].source.notRemoteIpBlocks[0]: \"1.2.3.4/40\": prefix length must be at most 32",
                "spec.rules[0].from[1].source: must not be empty",
                "spec.rules[0].from[2].source: must not be empty",
                "spec.rules[0].from[3].source.serviceAccounts[0]: \"web\" is not <namespace>/<serviceaccount>",
                "spec.rules[0].from[3].source.serviceAccounts[2]: \"/sa\" is not <namespace>/<serviceaccount>",
                "spec.rules[0].to[0].operation.ports[0]: \"0\" is not a port number (1-65535)",
                "spec.rules[0].to[0].operation.ports[1]: \"65536\" is not a port number (1-65535)",
                "spec.rules[0].to[0].operation.ports[2]: \"http\" is not a port number (1-65535)",
                "spec.rules[0].to[1].operation: must not be empty",
                "spec.rules[0].when[0].values[0]: \"99999\" is not a port number (1-65535)",
                "spec.rules[0].when[1].notValues[0]: \"nope\" is not an IP address or CIDR block",
                "spec.rules[0].when[2]: at least one of values or notValues must be set",
                "spec.rules[0].when[3].key: must not be empty",
            ]
        );
    }

    #[test]
    fn condition_keys() {
        let cases = [
            ("source.ip", "10.0.0.1", false),
            ("destination.ip", "10.0.0.1", false),
            ("destination.port", "80", false),
            ("source.namespace", "shop", false),
            ("source.principal", "*", false),
            ("request.auth.claims[iss]", "x", true),
            ("connection.sni", "x", true),
            ("remote.ip", "10.0.0.1", true),
            ("experimental.anything", "x", true),
        ];
        for (key, value, l7) in cases {
            let policy = policy(&format!(
                "metadata: {{name: p}}\nspec: {{rules: [{{when: [{{key: \"{key}\", values: [\"{value}\"]}}]}}]}}\n"
            ))
            .expect(key);
            assert_eq!(policy.rules[0].when[0].test.is_l7(), l7, "{key}");
            assert_eq!(policy.rules[0].uses_l7(), l7, "{key}");
        }
    }

    #[test]
    fn serializes_like_istio() {
        let policy = policy(
            "metadata: {name: p, namespace: shop}
spec:
  rules:
  - from: [{source: {notPrincipals: [\"*\"]}}]
    when: [{key: destination.port, values: [\"80\"]}]
",
        )
        .expect("valid");
        let json = serde_json::to_value(&policy).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "name": "p", "namespace": "shop", "selector": {}, "action": "ALLOW", "dryRun": false,
                "rules": [{"from": [{"notPrincipals": ["*"]}], "when": [{"key": "destination.port", "values": [80]}]}]
            })
        );
    }
}
