//! A deterministic generator of a large cluster's API objects, as the API server sends them.
//!
//! Namespaces (every third enrolled with `mesh-agent.dev/mode=ambient`), Deployment-style pods
//! with everything a real pod carries (owner references, managed fields, annotations, env, probes,
//! volumes, two containers with ports, conditions, container statuses) so that what the agent
//! slims away is really there, Services with selectors and named target ports, an EndpointSlice
//! per Service listing its pods, AuthorizationPolicies and a few PeerAuthentications. Every
//! object is valid for the agent; pod IPs are unique within `10.<pod octet>.<node>.0/24` per
//! node, Service IPs within `10.<service octet>.0.0/16`, both avoiding a reserved octet (the
//! simulated cluster's own `10.X.0.0/16`).
//!
//! ```
//! use mesh_tests::state_gen::{StateSpec, generate};
//! let state = generate(&StateSpec::at_scale(&["node-a".into()]).scaled(0.01));
//! assert_eq!(state.pods.len(), 100);
//! ```

use serde_json::{Value, json};

/// What to generate.
#[derive(Debug, Clone)]
pub struct StateSpec {
    pub namespaces: usize,
    /// Every `enroll_every`-th namespace (from the first) carries the ambient label.
    pub enroll_every: usize,
    pub pods: usize,
    /// Each Service selects the pods of one app; pods are spread round-robin over the apps.
    pub services: usize,
    pub authorization_policies: usize,
    pub peer_authentications: usize,
    /// Node names; pods are spread round-robin over them. The agent's own nodes belong here,
    /// so that it has local pods.
    pub nodes: Vec<String>,
    /// A second octet of `10.0.0.0/8` not to use for pods or Services.
    pub reserved_octet: Option<u8>,
}

impl StateSpec {
    /// The issue's scale: 10,000 pods, 5,000 Services, 1,000 AuthorizationPolicies, over
    /// 100 namespaces and `own_nodes` plus generated nodes up to 100.
    pub fn at_scale(own_nodes: &[String]) -> Self {
        let mut nodes = own_nodes.to_vec();
        for i in nodes.len()..100 {
            nodes.push(format!("worker-{i:03}"));
        }
        Self {
            namespaces: 100,
            enroll_every: 3,
            pods: 10_000,
            services: 5_000,
            authorization_policies: 1_000,
            peer_authentications: 4,
            nodes,
            reserved_octet: None,
        }
    }

    /// The same state with `factor` times as many pods, Services and policies (at least one
    /// each); namespaces and nodes stay.
    pub fn scaled(mut self, factor: f64) -> Self {
        let scale = |n: usize| ((n as f64 * factor).round() as usize).max(1);
        self.pods = scale(self.pods);
        self.services = scale(self.services);
        self.authorization_policies = scale(self.authorization_policies);
        self
    }

    pub fn reserving(mut self, octet: u8) -> Self {
        self.reserved_octet = Some(octet);
        self
    }

    /// The second octets of pod and Service addresses.
    fn octets(&self) -> (u8, u8) {
        let pick = |preferred: u8| {
            if self.reserved_octet == Some(preferred) {
                preferred + 1
            } else {
                preferred
            }
        };
        (pick(100), pick(96))
    }
}

/// The generated objects, by kind, in the order they are best applied.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub namespaces: Vec<Value>,
    pub pods: Vec<Value>,
    pub services: Vec<Value>,
    pub endpoint_slices: Vec<Value>,
    pub authorization_policies: Vec<Value>,
    pub peer_authentications: Vec<Value>,
}

impl State {
    /// Every object, namespaces first.
    pub fn objects(&self) -> impl Iterator<Item = &Value> {
        self.namespaces
            .iter()
            .chain(&self.pods)
            .chain(&self.services)
            .chain(&self.endpoint_slices)
            .chain(&self.authorization_policies)
            .chain(&self.peer_authentications)
    }

    pub fn len(&self) -> usize {
        self.objects().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the objects as compact JSON: what the API server sends for a full list.
    pub fn json_bytes(&self) -> usize {
        self.objects().map(|o| o.to_string().len()).sum()
    }
}

const WORDS: [&str; 16] = [
    "cart",
    "checkout",
    "catalog",
    "payments",
    "search",
    "users",
    "orders",
    "inventory",
    "ship",
    "reviews",
    "ads",
    "email",
    "auth",
    "ledger",
    "quotes",
    "images",
];
const CREATED: &str = "2026-11-20T08:00:00Z";
const STARTED: &str = "2026-11-20T08:00:04Z";

/// A deterministic 64-bit mix of `n` (splitmix64's finalizer).
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A UUID-shaped id, unique per (`kind`, `n`).
fn uid(kind: u64, n: usize) -> String {
    let (a, b) = (mix(kind << 40 | n as u64), mix(!(kind << 40 | n as u64)));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) as u16,
        a as u16 & 0xfff,
        b as u16 & 0xfff,
        b >> 16
    )
}

/// `len` characters of Kubernetes' name-suffix alphabet, from `seed`.
fn suffix(seed: u64, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = mix(seed);
    (0..len)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
            x = mix(x);
            c
        })
        .collect()
}

struct App {
    name: String,
    namespace: String,
    service_account: String,
    template_hash: String,
}

/// Pod `p`'s node index and address (unique: host `.p / nodes + 2` in the node's /24).
fn pod_placement(spec: &StateSpec, p: usize) -> (usize, String) {
    let (pod_octet, _) = spec.octets();
    let nodes = spec.nodes.len().max(1);
    let node = p % nodes;
    // 254 hosts per node /24, and 256 /24s per octet, the next octet after that.
    let (host, octet3) = (p / nodes + 2, node % 256);
    let octet2 = pod_octet as usize + node / 256;
    (node, format!("10.{octet2}.{octet3}.{host}"))
}

fn node_ip(node: usize) -> String {
    format!("172.16.{}.{}", node / 250, node % 250 + 1)
}

/// Generates `spec`'s objects. Panics when the addresses run out (more than 253 pods per node,
/// or more than 65,000 Services), which no spec of this module's reaches.
pub fn generate(spec: &StateSpec) -> State {
    assert!(
        spec.pods.div_ceil(spec.nodes.len().max(1)) <= 253,
        "more than 253 pods per node"
    );
    assert!(spec.services <= 65_000, "more than 65,000 Services");
    let namespaces: Vec<String> = (0..spec.namespaces.max(1))
        .map(|n| format!("{}-{n:03}", WORDS[n % WORDS.len()]))
        .collect();
    let apps: Vec<App> = (0..spec.services.max(1))
        .map(|a| {
            let namespace = namespaces[a % namespaces.len()].clone();
            let name = format!("{}-{a:04}", WORDS[(a / namespaces.len()) % WORDS.len()]);
            App {
                service_account: name.clone(),
                template_hash: suffix(a as u64, 10),
                name,
                namespace,
            }
        })
        .collect();
    let mut pods_of_app: Vec<Vec<(String, String, String, usize)>> = vec![Vec::new(); apps.len()];
    let mut pods = Vec::with_capacity(spec.pods);
    for p in 0..spec.pods {
        let a = p % apps.len();
        let (node, ip) = pod_placement(spec, p);
        let pod = pod(spec, &apps[a], p, node, &ip);
        let name = pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        pods_of_app[a].push((name, uid(1, p), ip, node));
        pods.push(pod);
    }
    let (_, service_octet) = spec.octets();
    let mut services = Vec::with_capacity(apps.len());
    let mut endpoint_slices = Vec::with_capacity(apps.len());
    for (a, app) in apps.iter().enumerate() {
        let ip = format!("10.{service_octet}.{}.{}", (a + 1) / 256, (a + 1) % 256);
        services.push(service(app, a, &ip));
        endpoint_slices.push(endpoint_slice(spec, app, a, &pods_of_app[a]));
    }
    let namespace_objects = namespaces
        .iter()
        .enumerate()
        .map(|(n, name)| namespace(name, n, n % spec.enroll_every.max(1) == 0))
        .collect();
    let authorization_policies = (0..spec.authorization_policies)
        .map(|i| authorization_policy(&apps, &namespaces, i))
        .collect();
    let peer_authentications = (0..spec.peer_authentications)
        .map(|i| peer_authentication(&apps, &namespaces, i))
        .collect();
    State {
        namespaces: namespace_objects,
        pods,
        services,
        endpoint_slices,
        authorization_policies,
        peer_authentications,
    }
}

fn namespace(name: &str, n: usize, enrolled: bool) -> Value {
    let mut labels = json!({
        "kubernetes.io/metadata.name": name,
        "team": WORDS[n % WORDS.len()],
        "environment": "production",
    });
    if enrolled {
        labels[crate::MODE_LABEL] = json!(crate::MODE_AMBIENT);
    }
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {
            "name": name, "uid": uid(0, n), "creationTimestamp": CREATED, "labels": labels,
            "managedFields": [{
                "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
                "time": CREATED, "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:team": {}, "f:environment": {},
                             "f:kubernetes.io/metadata.name": {}}}}
            }]
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}

/// The managed fields the API server records for a Deployment's pod: the controller's spec, the
/// kubelet's status, the CNI's annotations.
fn pod_managed_fields(owner_uid: &str) -> Value {
    let container = |ports: Value| {
        json!({".": {}, "f:env": {".": {}, "k:{\"name\":\"POD_NAME\"}": {".": {}, "f:name": {},
                "f:valueFrom": {".": {}, "f:fieldRef": {}}}, "k:{\"name\":\"LOG_LEVEL\"}": {".": {},
                "f:name": {}, "f:value": {}}},
               "f:image": {}, "f:imagePullPolicy": {}, "f:name": {}, "f:ports": ports,
               "f:resources": {".": {}, "f:limits": {".": {}, "f:memory": {}},
                               "f:requests": {".": {}, "f:cpu": {}, "f:memory": {}}},
               "f:terminationMessagePath": {}, "f:terminationMessagePolicy": {}})
    };
    let port = |n: u16| {
        (
            format!("k:{{\"containerPort\":{n},\"protocol\":\"TCP\"}}"),
            json!({".": {}, "f:containerPort": {}, "f:name": {}, "f:protocol": {}}),
        )
    };
    let ports = |list: &[u16]| {
        let mut map = serde_json::Map::new();
        map.insert(".".into(), json!({}));
        for &n in list {
            let (k, v) = port(n);
            map.insert(k, v);
        }
        Value::Object(map)
    };
    let condition = |t: &str| {
        (
            format!("k:{{\"type\":\"{t}\"}}"),
            json!({".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}}),
        )
    };
    let mut conditions = serde_json::Map::new();
    conditions.insert(".".into(), json!({}));
    for t in [
        "ContainersReady",
        "Initialized",
        "PodReadyToStartContainers",
        "PodScheduled",
        "Ready",
    ] {
        let (k, v) = condition(t);
        conditions.insert(k, v);
    }
    json!([
        {
            "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
            "time": CREATED, "fieldsType": "FieldsV1",
            "fieldsV1": {
                "f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {},
                    "f:app.kubernetes.io/name": {}, "f:app.kubernetes.io/part-of": {},
                    "f:pod-template-hash": {}, "f:version": {}},
                    "f:annotations": {".": {}, "f:kubectl.kubernetes.io/restartedAt": {},
                    "f:prometheus.io/port": {}, "f:prometheus.io/scrape": {}},
                    "f:ownerReferences": {".": {}, format!("k:{{\"uid\":\"{owner_uid}\"}}"): {}}},
                "f:spec": {
                    "f:containers": {"k:{\"name\":\"app\"}": container(ports(&[8080, 9090])),
                                     "k:{\"name\":\"log-shipper\"}": container(ports(&[24224]))},
                    "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {},
                    "f:schedulerName": {}, "f:securityContext": {}, "f:serviceAccount": {},
                    "f:serviceAccountName": {}, "f:terminationGracePeriodSeconds": {},
                    "f:volumes": {".": {}, "k:{\"name\":\"config\"}": {".": {}, "f:configMap": {}, "f:name": {}}}
                }
            }
        },
        {
            "manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": STARTED,
            "fieldsType": "FieldsV1", "subresource": "status",
            "fieldsV1": {"f:status": {"f:conditions": Value::Object(conditions),
                "f:containerStatuses": {}, "f:hostIP": {}, "f:hostIPs": {}, "f:phase": {},
                "f:podIP": {}, "f:podIPs": {".": {}, "k:{\"ip\":\"…\"}": {".": {}, "f:ip": {}}},
                "f:startTime": {}}}
        },
        {
            "manager": "calico", "operation": "Update", "apiVersion": "v1", "time": STARTED,
            "fieldsType": "FieldsV1", "subresource": "status",
            "fieldsV1": {"f:metadata": {"f:annotations": {"f:cni.projectcalico.org/containerID": {},
                "f:cni.projectcalico.org/podIP": {}, "f:cni.projectcalico.org/podIPs": {}}}}
        }
    ])
}

fn pod(spec: &StateSpec, app: &App, p: usize, node: usize, ip: &str) -> Value {
    let replica_set = format!("{}-{}", app.name, app.template_hash);
    let name = format!("{replica_set}-{}", suffix(p as u64 | 1 << 40, 5));
    let owner_uid = uid(2, p % spec.services.max(1));
    let container_id = |c: u64| {
        format!(
            "containerd://{:016x}{:016x}",
            mix(p as u64 * 2 + c),
            mix(!(p as u64 * 2 + c))
        )
    };
    let image = format!(
        "registry.example.com/{}/{}:1.{}.{}",
        app.namespace,
        app.name,
        p % 7,
        p % 13
    );
    let probe = |path: &str| {
        json!({"httpGet": {"path": path, "port": "http", "scheme": "HTTP"}, "initialDelaySeconds": 5,
               "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3})
    };
    let token_volume = format!("kube-api-access-{}", suffix(p as u64 | 2 << 40, 5));
    let mounts = json!([{"name": "config", "mountPath": "/etc/app", "readOnly": true},
                        {"name": token_volume, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]);
    let condition = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": STARTED});
    let status = |name: &str, image: &str, c: u64| {
        json!({"name": name, "state": {"running": {"startedAt": STARTED}}, "lastState": {},
               "ready": true, "restartCount": p % 3, "image": image,
               "imageID": format!("{image}@sha256:{:016x}{:016x}{:016x}{:016x}", mix(c), mix(c + 1), mix(c + 2), mix(c + 3)),
               "containerID": container_id(c), "started": true,
               "volumeMounts": [{"name": token_volume, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                                 "readOnly": true, "recursiveReadOnly": "Disabled"}]})
    };
    let node_name = &spec.nodes[node];
    let conditions = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    .map(condition);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "generateName": format!("{replica_set}-"), "namespace": app.namespace,
            "uid": uid(1, p), "creationTimestamp": CREATED,
            "labels": {"app": app.name, "app.kubernetes.io/name": app.name,
                       "app.kubernetes.io/part-of": app.namespace, "pod-template-hash": app.template_hash,
                       "version": "v1"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": CREATED, "prometheus.io/scrape": "true",
                            "prometheus.io/port": "9090",
                            "cni.projectcalico.org/containerID": format!("{:016x}{:016x}", mix(p as u64), mix(p as u64 + 7)),
                            "cni.projectcalico.org/podIP": format!("{ip}/32"),
                            "cni.projectcalico.org/podIPs": format!("{ip}/32")},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replica_set,
                                 "uid": owner_uid, "controller": true, "blockOwnerDeletion": true}],
            "managedFields": pod_managed_fields(&owner_uid)
        },
        "spec": {
            "volumes": [
                {"name": "config", "configMap": {"name": format!("{}-config", app.name), "defaultMode": 420}},
                {"name": token_volume, "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
                ]}}
            ],
            "containers": [
                {
                    "name": "app", "image": image, "args": ["--listen=:8080", "--metrics=:9090"],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                              {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
                        {"name": "LOG_LEVEL", "value": "info"},
                        {"name": "DATABASE_URL", "value": format!("postgres://{}.{}.svc.cluster.local:5432/app", app.name, app.namespace)},
                        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.observability:4317"},
                        {"name": "GOMAXPROCS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}}
                    ],
                    "resources": {"limits": {"memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "256Mi"}},
                    "volumeMounts": mounts,
                    "livenessProbe": probe("/healthz"), "readinessProbe": probe("/ready"),
                    "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                    "securityContext": {"runAsNonRoot": true, "allowPrivilegeEscalation": false,
                                        "capabilities": {"drop": ["ALL"]}}
                },
                {
                    "name": "log-shipper", "image": "registry.example.com/platform/fluent-bit:3.1.4",
                    "ports": [{"name": "forward", "containerPort": 24224, "protocol": "TCP"}],
                    "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}}],
                    "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "10m", "memory": "32Mi"}},
                    "volumeMounts": mounts,
                    "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent"
                }
            ],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": app.service_account, "serviceAccount": app.service_account,
            "nodeName": node_name, "securityContext": {"fsGroup": 1000},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {
            "phase": "Running",
            "conditions": conditions,
            "hostIP": node_ip(node), "hostIPs": [{"ip": node_ip(node)}],
            "podIP": ip, "podIPs": [{"ip": ip}], "startTime": STARTED,
            "containerStatuses": [status("app", &image, p as u64 * 2),
                                  status("log-shipper", "registry.example.com/platform/fluent-bit:3.1.4", p as u64 * 2 + 1)],
            "qosClass": "Burstable"
        }
    })
}

fn service(app: &App, a: usize, ip: &str) -> Value {
    let last_applied = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"annotations": {}, "labels": {"app": app.name}, "name": app.name, "namespace": app.namespace},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": "http"},
                           {"name": "metrics", "port": 9090, "targetPort": 9090}],
                 "selector": {"app": app.name}}
    });
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": app.name, "namespace": app.namespace, "uid": uid(3, a), "creationTimestamp": CREATED,
            "labels": {"app": app.name, "app.kubernetes.io/part-of": app.namespace},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{last_applied}\n")},
            "managedFields": [{
                "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
                "time": CREATED, "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                                            "f:labels": {".": {}, "f:app": {}, "f:app.kubernetes.io/part-of": {}}},
                             "f:spec": {"f:internalTrafficPolicy": {}, "f:ports": {".": {},
                                 "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}},
                                 "k:{\"port\":9090,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                                 "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}}
            }]
        },
        "spec": {
            "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster", "sessionAffinity": "None", "type": "ClusterIP",
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                      {"name": "metrics", "port": 9090, "targetPort": 9090, "protocol": "TCP"}],
            "selector": {"app": app.name}
        },
        "status": {"loadBalancer": {}}
    })
}

fn endpoint_slice(
    spec: &StateSpec,
    app: &App,
    a: usize,
    pods: &[(String, String, String, usize)],
) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(name, uid, ip, node)| {
            json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": spec.nodes[*node], "zone": format!("zone-{}", node % 3),
                   "targetRef": {"kind": "Pod", "namespace": app.namespace, "name": name, "uid": uid}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-{}", app.name, suffix(a as u64 | 3 << 40, 5)),
            "generateName": format!("{}-", app.name), "namespace": app.namespace,
            "uid": uid(4, a), "creationTimestamp": CREATED,
            "labels": {"app": app.name, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                       "kubernetes.io/service-name": app.name},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": STARTED},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": app.name, "uid": uid(3, a),
                                 "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{
                "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "discovery.k8s.io/v1",
                "time": STARTED, "fieldsType": "FieldsV1",
                "fieldsV1": {"f:addressType": {}, "f:endpoints": {}, "f:ports": {},
                             "f:metadata": {"f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
                                            "f:generateName": {}, "f:labels": {".": {}, "f:app": {},
                                            "f:endpointslice.kubernetes.io/managed-by": {}, "f:kubernetes.io/service-name": {}},
                                            "f:ownerReferences": {".": {}, format!("k:{{\"uid\":\"{}\"}}", uid(3, a)): {}}}}
            }]
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "metrics", "port": 9090, "protocol": "TCP"}]
    })
}

/// Policies of the kinds real clusters have: allow an app's callers by identity and port, allow
/// a namespace's own traffic, deny other namespaces' traffic to an admin port.
fn authorization_policy(apps: &[App], namespaces: &[String], i: usize) -> Value {
    let app = &apps[i % apps.len()];
    let caller = &apps[(i * 7 + 3) % apps.len()];
    let principal = |a: &App| format!("cluster.local/ns/{}/sa/{}", a.namespace, a.service_account);
    let spec = match i % 4 {
        0 | 1 => json!({
            "selector": {"matchLabels": {"app": app.name}}, "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [principal(caller), principal(&apps[(i * 13 + 5) % apps.len()])]}}],
                       "to": [{"operation": {"ports": ["8080"]}}]},
                      {"from": [{"source": {"namespaces": ["observability"]}}],
                       "to": [{"operation": {"ports": ["9090"]}}]}]
        }),
        2 => json!({
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"namespaces": [app.namespace, namespaces[(i + 1) % namespaces.len()]]}}]},
                      {"from": [{"source": {"ipBlocks": ["10.0.0.0/8"], "notPrincipals": [principal(caller)]}}],
                       "to": [{"operation": {"ports": ["8080", "9090"]}}]}]
        }),
        _ => json!({
            "selector": {"matchLabels": {"app": app.name, "version": "v1"}}, "action": "DENY",
            "rules": [{"from": [{"source": {"notNamespaces": [app.namespace]}}],
                       "to": [{"operation": {"ports": ["15000", "9901"]}}]}]
        }),
    };
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": format!("{}-policy-{i:04}", app.name), "namespace": app.namespace,
                     "uid": uid(5, i), "creationTimestamp": CREATED, "generation": 1,
                     "labels": {"app": app.name},
                     "managedFields": [{"manager": "kubectl", "operation": "Apply",
                         "apiVersion": "security.istio.io/v1", "time": CREATED, "fieldsType": "FieldsV1",
                         "fieldsV1": {"f:spec": {"f:action": {}, "f:rules": {}, "f:selector": {}}}}]},
        "spec": spec
    })
}

/// A mesh-wide-style STRICT default per namespace for the first few, one with a port exception.
fn peer_authentication(apps: &[App], namespaces: &[String], i: usize) -> Value {
    let namespace = &namespaces[i % namespaces.len()];
    let spec = if i.is_multiple_of(2) {
        json!({"mtls": {"mode": "STRICT"}})
    } else {
        let app = apps
            .iter()
            .find(|a| &a.namespace == namespace)
            .unwrap_or(&apps[0]);
        json!({"selector": {"matchLabels": {"app": app.name}}, "mtls": {"mode": "STRICT"},
               "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}})
    };
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": format!("default-{i}"), "namespace": namespace, "uid": uid(6, i),
                     "creationTimestamp": CREATED, "generation": 1},
        "spec": spec
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::Ipv4Addr;

    use k8s_openapi::api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    };

    use super::*;

    fn own_nodes() -> Vec<String> {
        vec!["mt000001-n1".into(), "mt000001-n2".into()]
    }

    #[test]
    fn the_issue_scale_has_the_issue_counts() {
        let state = generate(&StateSpec::at_scale(&own_nodes()).reserving(100));
        assert_eq!(state.namespaces.len(), 100);
        assert_eq!(state.pods.len(), 10_000);
        assert_eq!(state.services.len(), 5_000);
        assert_eq!(state.endpoint_slices.len(), 5_000);
        assert_eq!(state.authorization_policies.len(), 1_000);
        assert_eq!(state.peer_authentications.len(), 4);
        let enrolled = state
            .namespaces
            .iter()
            .filter(|ns| ns["metadata"]["labels"][crate::MODE_LABEL] == crate::MODE_AMBIENT)
            .count();
        assert_eq!(enrolled, 34);
        // The agent's own nodes have their share of pods, some of them in enrolled namespaces.
        for node in own_nodes() {
            let local: Vec<&Value> = state
                .pods
                .iter()
                .filter(|p| p["spec"]["nodeName"] == node.as_str())
                .collect();
            assert_eq!(local.len(), 100, "{node}");
        }
        // A pod is as large as the API server's are (5–10 KiB of JSON).
        let bytes = state.pods[0].to_string().len();
        assert!((5_000..10_000).contains(&bytes), "{bytes} bytes");
    }

    #[test]
    fn it_is_deterministic() {
        let spec = StateSpec::at_scale(&own_nodes()).scaled(0.05);
        assert_eq!(generate(&spec), generate(&spec));
    }

    #[test]
    fn objects_are_valid_kubernetes_objects_with_unique_names_and_addresses() {
        let state = generate(&StateSpec::at_scale(&own_nodes()).scaled(0.2).reserving(100));
        for ns in &state.namespaces {
            serde_json::from_value::<Namespace>(ns.clone()).expect("a Namespace");
        }
        let mut names = BTreeSet::new();
        let mut ips = BTreeSet::new();
        let mut pods_by_app: BTreeMap<(String, String), BTreeSet<Ipv4Addr>> = BTreeMap::new();
        let namespaces: BTreeSet<&str> = state
            .namespaces
            .iter()
            .filter_map(|ns| ns["metadata"]["name"].as_str())
            .collect();
        for object in &state.pods {
            let pod: Pod = serde_json::from_value(object.clone()).expect("a Pod");
            let ns = pod.metadata.namespace.clone().expect("namespace");
            assert!(namespaces.contains(ns.as_str()));
            let name = pod.metadata.name.clone().expect("name");
            assert!(names.insert((ns.clone(), name)), "duplicate pod name");
            let ip: Ipv4Addr = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .expect("podIP")
                .parse()
                .expect("an IPv4 address");
            assert!(ip.octets()[0] == 10 && ip.octets()[1] != 100, "{ip}");
            assert!(ips.insert(ip), "duplicate pod IP {ip}");
            let spec = pod.spec.expect("spec");
            assert!(spec.node_name.is_some() && spec.containers.len() == 2);
            let app = pod.metadata.labels.expect("labels")["app"].clone();
            pods_by_app.entry((ns, app)).or_default().insert(ip);
        }
        let mut service_ips = BTreeSet::new();
        for (object, slice) in state.services.iter().zip(&state.endpoint_slices) {
            let service: Service = serde_json::from_value(object.clone()).expect("a Service");
            let spec = service.spec.expect("spec");
            let ip: Ipv4Addr = spec.cluster_ip.expect("clusterIP").parse().expect("IPv4");
            assert!(ip.octets()[0] == 10 && !ips.contains(&ip), "{ip}");
            assert!(service_ips.insert(ip), "duplicate Service IP {ip}");
            let ns = service.metadata.namespace.expect("namespace");
            let app = spec.selector.expect("selector")["app"].clone();
            let selected = pods_by_app
                .get(&(ns.clone(), app.clone()))
                .cloned()
                .unwrap_or_default();
            assert!(!selected.is_empty(), "{ns}/{app} selects no pod");
            let slice: EndpointSlice = serde_json::from_value(slice.clone()).expect("a slice");
            assert_eq!(
                slice.metadata.labels.expect("labels")["kubernetes.io/service-name"],
                service.metadata.name.expect("name")
            );
            let addresses: BTreeSet<Ipv4Addr> = slice
                .endpoints
                .iter()
                .flat_map(|e| &e.addresses)
                .map(|a| a.parse().expect("IPv4"))
                .collect();
            assert_eq!(addresses, selected, "the slice lists the selected pods");
        }
        for policy in state
            .authorization_policies
            .iter()
            .chain(&state.peer_authentications)
        {
            let ns = policy["metadata"]["namespace"].as_str().expect("namespace");
            assert!(namespaces.contains(ns));
            assert!(policy["spec"].is_object());
        }
        let policy_names: BTreeSet<(&str, &str)> = state
            .authorization_policies
            .iter()
            .filter_map(|p| {
                Some((
                    p["metadata"]["namespace"].as_str()?,
                    p["metadata"]["name"].as_str()?,
                ))
            })
            .collect();
        assert_eq!(policy_names.len(), state.authorization_policies.len());
    }
}
