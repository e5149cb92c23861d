//! The simulated cluster: two node namespaces joined by a routed veth link, and a namespace per
//! pod wired to its node exactly the way Calico wires one:
//!
//! ```text
//!  pod netns                      node netns (mt<id>-n1)               node netns (mt<id>-n2)
//!  eth0 10.X.1.10/32  <-veth->  veth1a2b3c4d 169.254.1.1/32
//!  default via 169.254.1.1      10.X.1.10/32 dev veth1a2b3c4d    eth0 192.168.X.1/24 <-> eth0 192.168.X.2/24
//!                               10.X.2.0/24 via 192.168.X.2              10.X.1.0/24 via 192.168.X.1
//! ```
//!
//! Nodes are indexed from 0: node 0 is `mt<id>-n1` (`.1` addresses). X is random per cluster,
//! names are unique per run, and everything is deleted on drop, panics included.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::Read,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use tokio::net::{TcpListener, TcpStream};

use serde::Deserialize as _;

pub mod waypoint;

use crate::{
    agent::{ADMIN_PORT, Agent, AgentOptions, READY_PATH, READY_PORT, Registry, agent_binary},
    apiserver::{ApiServer, ApiServerConfig},
    command::{self, COMMAND_TIMEOUT},
    netns::Netns,
    state_yaml::{self, Labels, PodObject},
    traffic::{self, FlowReport, HttpResponse, PeerReport, Server},
};

/// How many nodes a cluster has.
pub const NODES: usize = 2;
/// The gateway address every pod routes through; each host-side veth owns it, as with Calico.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The last octet of the first pod address on each node.
const FIRST_POD_HOST: u8 = 10;

/// A namespace and its labels.
#[derive(Clone, Debug)]
pub struct NamespaceSpec {
    pub name: String,
    pub labels: Labels,
}

/// A pod to create: where it runs and what the state says about it.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    /// 0-based node index.
    pub node: usize,
    pub service_account: String,
    pub labels: Labels,
}

impl PodSpec {
    /// A pod with service account `default` and no labels.
    pub fn new(namespace: &str, name: &str, node: usize) -> PodSpec {
        PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            node,
            service_account: "default".into(),
            labels: Labels::new(),
        }
    }

    pub fn service_account(mut self, name: &str) -> PodSpec {
        self.service_account = name.into();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> PodSpec {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// What to build. Pods in a namespace that was not declared get an unlabelled one.
#[derive(Clone, Debug, Default)]
pub struct ClusterSpec {
    pub namespaces: Vec<NamespaceSpec>,
    pub pods: Vec<PodSpec>,
    /// The binary for agents and the CLI; `None`: [`agent_binary`] (`$MESH_AGENT_BIN`, …).
    pub agent_binary: Option<PathBuf>,
}

impl ClusterSpec {
    pub fn new() -> ClusterSpec {
        ClusterSpec::default()
    }

    pub fn namespace(mut self, name: &str, labels: &[(&str, &str)]) -> ClusterSpec {
        self.namespaces.push(NamespaceSpec {
            name: name.into(),
            labels: labels_of(labels),
        });
        self
    }

    pub fn pod(mut self, pod: PodSpec) -> ClusterSpec {
        self.pods.push(pod);
        self
    }

    /// The demo's cluster: namespace `shop` enrolled (`mesh-agent.dev/mode=ambient`), `legacy`
    /// not; on node `i` (0-based) the pods `shop/web-<i+1>` (service account `web`, `app=web`)
    /// and `legacy/batch-<i+1>` (service account `batch`, `app=batch`).
    pub fn shop_and_legacy() -> ClusterSpec {
        let mut spec = ClusterSpec::new()
            .namespace("shop", &[(crate::MODE_LABEL, crate::MODE_AMBIENT)])
            .namespace("legacy", &[]);
        for node in 0..NODES {
            let n = node + 1;
            spec = spec
                .pod(
                    PodSpec::new("shop", &format!("web-{n}"), node)
                        .service_account("web")
                        .label("app", "web"),
                )
                .pod(
                    PodSpec::new("legacy", &format!("batch-{n}"), node)
                        .service_account("batch")
                        .label("app", "batch"),
                );
        }
        spec
    }

    /// Runs this binary instead of the one [`agent_binary`] finds.
    pub fn agent_binary(mut self, path: impl Into<PathBuf>) -> ClusterSpec {
        self.agent_binary = Some(path.into());
        self
    }
}

/// A node: its namespace (named like the Kubernetes node) and addresses.
pub struct Node {
    /// 0-based.
    pub index: usize,
    /// The Kubernetes node name, which is also the netns name (`mt<id>-n<index+1>`).
    pub name: String,
    /// The address on the node-to-node link (`eth0`), `192.168.X.<index+1>`.
    pub link_ip: Ipv4Addr,
    /// `10.X.<index+1>.0/24`.
    pub pod_cidr: String,
    netns: Netns,
}

impl Node {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Runs a command in the node namespace; returns stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        self.netns.exec(args)
    }
}

/// A pod: its namespace, address, and the host-side veth its node routes it through.
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// 0-based node index.
    pub node: usize,
    pub ip: Ipv4Addr,
    pub uid: String,
    pub service_account: String,
    /// The node-side end of the pod's veth (`veth` + 8 hex), carrying `169.254.1.1/32`.
    pub host_veth: String,
    netns: Netns,
}

impl Pod {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// `<namespace>/<name>`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `<pod ip>:port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddrV4::new(self.ip, port).into()
    }

    /// Runs a command in the pod namespace; returns stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        self.netns.exec(args)
    }

    /// A TCP connection from this pod, failing after [`traffic::CONNECT_TIMEOUT`].
    pub async fn connect(&self, to: SocketAddr) -> Result<TcpStream> {
        self.netns.connect(to).await
    }

    /// A listener on `0.0.0.0:port` in this pod.
    pub async fn listen(&self, port: u16) -> Result<TcpListener> {
        self.netns.listen(port).await
    }

    pub async fn echo_server(&self, port: u16) -> Result<Server> {
        Ok(Server::echo(self.listen(port).await?))
    }

    pub async fn sink_server(&self, port: u16) -> Result<Server> {
        Ok(Server::sink(self.listen(port).await?))
    }

    pub async fn counter_server(&self, port: u16) -> Result<Server> {
        Ok(Server::counter(self.listen(port).await?))
    }

    /// The HTTP echo of the Gateway API conformance suite ([`crate::http_echo`]), as this pod.
    pub async fn http_echo_server(&self, port: u16) -> Result<Server> {
        Ok(crate::http_echo::server(
            self.listen(port).await?,
            &self.namespace,
            &self.name,
        ))
    }

    pub async fn peer_server(&self, port: u16) -> Result<Server> {
        Ok(Server::peer_reporter(self.listen(port).await?))
    }

    /// Connects to an echo server at `to` and checks `len` bytes come back intact and in order.
    pub async fn send_and_verify(&self, to: SocketAddr, len: usize) -> Result<FlowReport> {
        let stream = self.connect(to).await?;
        traffic::send_and_verify(stream, len)
            .await
            .with_context(|| format!("from pod {}", self.id()))
    }

    /// Connects to a sink server at `to`, sends `len` bytes, half-closes, checks the reply.
    pub async fn send_to_sink(&self, to: SocketAddr, len: usize) -> Result<FlowReport> {
        let stream = self.connect(to).await?;
        traffic::send_to_sink(stream, len)
            .await
            .with_context(|| format!("from pod {}", self.id()))
    }

    /// Connects to a peer server at `to`: which source address did it see?
    pub async fn ask_peer(&self, to: SocketAddr) -> Result<PeerReport> {
        let stream = self.connect(to).await?;
        traffic::read_peer(stream)
            .await
            .with_context(|| format!("from pod {}", self.id()))
    }
}

/// What the state files currently say.
struct ClusterState {
    namespaces: BTreeMap<String, Labels>,
    /// Keyed by (namespace, name); `false` means left out of the state (deleted pod).
    pods: BTreeMap<(String, String), (PodObject, bool)>,
}

/// The simulated cluster. Dropping it kills remaining agents, then deletes every namespace.
pub struct Cluster {
    // Fields drop in this order after `Drop::drop`: pod namespaces, then node namespaces.
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    id: String,
    octet: u8,
    state: Mutex<ClusterState>,
    agents: Arc<Registry>,
    agent_seq: AtomicUsize,
    agent_binary: Option<PathBuf>,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    state_dir: PathBuf,
    /// When set ([`Cluster::serve_api`]): the state files are mirrored into this API server and
    /// agents read it instead of the state directory.
    api: Option<ApiServer>,
    /// The objects each mirrored state file holds.
    mirrored: Mutex<BTreeMap<String, Vec<ObjectKey>>>,
    /// Bumped on every mirrored write, as a label of [`SYNC_NAMESPACE`].
    sync: AtomicUsize,
}

/// An API object's kind, namespace and name.
type ObjectKey = (String, String, String);

/// A namespace the API mirror relabels on every write, so each write changes the agents' state
/// (and its generation) even when it changes nothing else, as a state-directory write does.
pub const SYNC_NAMESPACE: &str = "mesh-tests-sync";
/// The API server's port on node 0's link address, where both nodes reach it.
pub const API_PORT: u16 = 6443;

impl Cluster {
    /// Builds the namespaces, links, addresses and routes, and writes the state files.
    /// Needs root. Takes about 50 ms per pod.
    pub fn new(spec: ClusterSpec) -> Result<Cluster> {
        ensure!(
            crate::is_root(),
            "building a cluster needs root (network namespaces)"
        );
        let namespaces = validate(&spec)?;
        let dir = tempfile::Builder::new()
            .prefix("mesh-tests-")
            .tempdir()
            .context("creating the cluster's temp dir")?;
        let dir_path = dir.path().to_owned();
        let state_dir = dir_path.join("state");
        fs::create_dir(&state_dir).context("creating the state dir")?;

        // Retry with a fresh id if another run picked the same one.
        let mut attempt = 0;
        let (id, first) = loop {
            let id = format!("{:06x}", random_u64() & 0xff_ffff);
            match Netns::create(&format!("mt{id}-n1")) {
                Ok(ns) => break (id, ns),
                Err(e) if attempt < 5 && format!("{e:#}").contains("exists") => attempt += 1,
                Err(e) => return Err(e),
            }
        };
        let octet = 1 + (random_u64() % 254) as u8;
        let mut cluster = Cluster {
            pods: Vec::new(),
            nodes: Vec::new(),
            id,
            octet,
            state: Mutex::new(ClusterState {
                namespaces,
                pods: BTreeMap::new(),
            }),
            agents: Arc::new(Registry::default()),
            agent_seq: AtomicUsize::new(0),
            agent_binary: spec.agent_binary.clone(),
            dir: Some(dir),
            dir_path,
            state_dir,
            api: None,
            mirrored: Mutex::new(BTreeMap::new()),
            sync: AtomicUsize::new(0),
        };
        // From here on, an error drops `cluster`, which removes what was built so far.
        let mut first = Some(first);
        for index in 0..NODES {
            let netns = match first.take() {
                Some(ns) => ns,
                None => Netns::create(&format!("mt{}-n{}", cluster.id, index + 1))?,
            };
            cluster.nodes.push(Node {
                index,
                name: netns.name().to_owned(),
                link_ip: Ipv4Addr::new(192, 168, octet, index as u8 + 1),
                pod_cidr: format!("10.{octet}.{}.0/24", index + 1),
                netns,
            });
        }
        cluster.wire_nodes()?;
        let mut per_node = [0u8; NODES];
        let mut veths = BTreeSet::new();
        for pod in &spec.pods {
            let host = FIRST_POD_HOST + per_node[pod.node];
            per_node[pod.node] += 1;
            let host_veth = loop {
                let name = format!("veth{:08x}", random_u64() as u32);
                if veths.insert(name.clone()) {
                    break name;
                }
            };
            cluster.add_pod(pod, host, host_veth)?;
        }
        cluster.write_state()?;
        Ok(cluster)
    }

    /// The 6-hex-digit run id in every namespace name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// X in `192.168.X.0/24` and `10.X.0.0/16`.
    pub fn octet(&self) -> u8 {
        self.octet
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `index` (0-based); panics if out of range.
    pub fn node(&self, index: usize) -> &Node {
        self.nodes
            .get(index)
            .unwrap_or_else(|| panic!("the cluster has nodes 0..{NODES}, not {index}"))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Pod `namespace/name`; panics if there is none.
    pub fn pod(&self, namespace: &str, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .unwrap_or_else(|| panic!("no pod {namespace}/{name} in this cluster"))
    }

    /// Every netns name of this cluster, pods first.
    pub fn netns_names(&self) -> Vec<String> {
        let pods = self.pods.iter().map(|p| p.netns.name().to_owned());
        pods.chain(self.nodes.iter().map(|n| n.name.clone()))
            .collect()
    }

    /// The cluster's temp dir (state dir, agent logs); kept after a panic.
    pub fn temp_dir(&self) -> &Path {
        &self.dir_path
    }

    /// The directory passed to the agents as `--state`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// (Re)writes every state file: `namespace-<ns>.yaml`, `pod-<ns>-<name>.yaml`.
    pub fn write_state(&self) -> Result<()> {
        let state = self.lock_state();
        for (name, labels) in &state.namespaces {
            self.write_state_file(
                &state_yaml::namespace_file(name),
                &state_yaml::namespace_yaml(name, labels),
            )?;
        }
        for (pod, present) in state.pods.values() {
            let file = state_yaml::pod_file(&pod.namespace, &pod.name);
            if *present {
                self.write_state_file(&file, &state_yaml::pod_yaml(pod))?;
            } else {
                self.remove_state_file(&file)?;
            }
        }
        Ok(())
    }

    /// Replaces a namespace's labels (creating the namespace if new) and rewrites its file.
    pub fn set_namespace_labels(&self, namespace: &str, labels: &[(&str, &str)]) -> Result<()> {
        let labels = labels_of(labels);
        let yaml = state_yaml::namespace_yaml(namespace, &labels);
        self.lock_state()
            .namespaces
            .insert(namespace.into(), labels);
        self.write_state_file(&state_yaml::namespace_file(namespace), &yaml)
    }

    /// Replaces a pod's labels and rewrites its file.
    pub fn set_pod_labels(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<()> {
        let (yaml, present) = {
            let mut state = self.lock_state();
            let (pod, present) = state
                .pods
                .get_mut(&(namespace.to_owned(), name.to_owned()))
                .with_context(|| format!("no pod {namespace}/{name}"))?;
            pod.labels = labels_of(labels);
            (state_yaml::pod_yaml(pod), *present)
        };
        if present {
            self.write_state_file(&state_yaml::pod_file(namespace, name), &yaml)?;
        }
        Ok(())
    }

    /// Removes a pod from the state (`present = false`, as if deleted) or puts it back.
    /// Its network namespace stays.
    pub fn set_pod_in_state(&self, namespace: &str, name: &str, present: bool) -> Result<()> {
        let yaml = {
            let mut state = self.lock_state();
            let entry = state
                .pods
                .get_mut(&(namespace.to_owned(), name.to_owned()))
                .with_context(|| format!("no pod {namespace}/{name}"))?;
            entry.1 = present;
            state_yaml::pod_yaml(&entry.0)
        };
        let file = state_yaml::pod_file(namespace, name);
        if present {
            self.write_state_file(&file, &yaml)
        } else {
            self.remove_state_file(&file)
        }
    }

    /// Writes any file into the state dir, atomically (e.g. broken YAML). With an API server
    /// ([`Cluster::serve_api`]) the file's objects are applied to it too, and the objects it held
    /// before and no longer does are deleted, as `kubectl apply --prune` of that file would.
    pub fn write_state_file(&self, file: &str, contents: &str) -> Result<()> {
        state_yaml::write_atomic(&self.state_dir, file, contents)?;
        self.mirror(file, contents)
    }

    /// Removes a file from the state dir; a missing file is fine. With an API server, its
    /// objects are deleted there.
    pub fn remove_state_file(&self, file: &str) -> Result<()> {
        match fs::remove_file(self.state_dir.join(file)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing state file {file}"));
            }
            _ => {}
        }
        self.mirror(file, "")
    }

    /// Serves the cluster's state from a test API server in node 0's namespace, on its link
    /// address (port [`API_PORT`]); agents started afterwards read it with `--kubeconfig`.
    pub async fn serve_api(&mut self) -> Result<()> {
        self.serve_api_with(ApiServerConfig::default()).await
    }

    /// [`Cluster::serve_api`] with these server settings (e.g. the Istio kinds not installed).
    pub async fn serve_api_with(&mut self, config: ApiServerConfig) -> Result<()> {
        let node = &self.nodes[0];
        let listener = node
            .netns
            .listen_on(SocketAddr::from((node.link_ip, API_PORT)))
            .await?;
        self.api = Some(ApiServer::start(listener, config)?);
        let mut files: Vec<PathBuf> = fs::read_dir(&self.state_dir)?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        files.sort();
        for path in files {
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .context("state file name")?
                .to_owned();
            let contents = fs::read_to_string(&path)?;
            self.mirror(&file, &contents)?;
        }
        Ok(())
    }

    /// The API server of [`Cluster::serve_api`], if any.
    pub fn api(&self) -> Option<&ApiServer> {
        self.api.as_ref()
    }

    fn mirror(&self, file: &str, contents: &str) -> Result<()> {
        let Some(api) = &self.api else {
            return Ok(());
        };
        let mut now = Vec::new();
        for document in serde_yaml::Deserializer::from_str(contents) {
            let value = serde_json::Value::deserialize(document)
                .with_context(|| format!("{file}: the API mirror takes only valid YAML"))?;
            if value.is_null() {
                continue;
            }
            let key = |field: &str| {
                value["metadata"][field]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            };
            now.push((
                value["kind"].as_str().unwrap_or_default().to_owned(),
                key("namespace"),
                key("name"),
            ));
            api.apply(value.clone())
                .with_context(|| format!("{file}: applying {value}"))?;
        }
        let before = self
            .mirrored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(file.to_owned(), now.clone())
            .unwrap_or_default();
        for (kind, namespace, name) in before.iter().filter(|o| !now.contains(o)) {
            api.delete(kind, namespace, name)
                .with_context(|| format!("{file}: deleting {kind} {namespace}/{name}"))?;
        }
        let sync = self.sync.fetch_add(1, Ordering::SeqCst) + 1;
        api.apply(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": SYNC_NAMESPACE, "labels": {"mesh-tests/write": sync.to_string()}}
        }))?;
        Ok(())
    }

    /// The CA directory the cluster's agents share (`ca-cert.pem`, `ca-key.pem`, ... once an
    /// agent has started).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir_path.join("ca")
    }

    /// Starts `mesh-agent run --node <node name> --state <state dir> --ca-dir <ca dir>` in node `node`'s namespace
    /// (network namespace only: the host's mounts, bpffs and cgroup2 included, stay visible) and
    /// waits until `GET 127.0.0.1:15021/healthz/ready` answers 200 (20 s; the error carries the
    /// agent's log).
    pub async fn start_agent(&self, node: usize) -> Result<Agent> {
        self.start_agent_with(node, AgentOptions::default()).await
    }

    pub async fn start_agent_with(&self, node: usize, options: AgentOptions) -> Result<Agent> {
        let node = self.node(node);
        let run = ["run".to_string(), "--node".into(), node.name.clone()];
        let mut agent = self.spawn(&node.netns, node.index, &node.name, &run, &options)?;
        if options.wait_ready {
            self.wait_agent_ready(&mut agent, options.ready_timeout)
                .await?;
        }
        Ok(agent)
    }

    /// Starts `mesh-agent <subcommand...>` in `netns` with the cluster's state source, its CA
    /// directory and `options`, logging to a file of the cluster's temp dir named after `name`.
    fn spawn(
        &self,
        netns: &Netns,
        node_index: usize,
        name: &str,
        subcommand: &[String],
        options: &AgentOptions,
    ) -> Result<Agent> {
        let binary = match &options.binary {
            Some(b) => b.clone(),
            None => self.agent_binary()?,
        };
        let seq = self.agent_seq.fetch_add(1, Ordering::SeqCst);
        let log_path = self.dir_path.join(format!("agent-{name}-{seq}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = netns.command(&binary.to_string_lossy());
        // If this process dies without unwinding (abort, SIGKILL), the agent goes too instead of
        // keeping its cgroup attachment alive. The signal follows the *thread* that spawned the
        // agent: start agents from async code on a runtime thread, not from a short-lived thread.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.args(subcommand);
        let served = self
            .api
            .as_ref()
            .map(|api| api.kubeconfig_path().to_owned());
        match options.kubeconfig.clone().or(served) {
            Some(kubeconfig) => cmd.arg("--kubeconfig").arg(kubeconfig),
            None => cmd.arg("--state").arg(&self.state_dir),
        };
        cmd
            // One trust root per cluster, shared by its agents as Istio's plug-in CA would be.
            .arg("--ca-dir")
            .arg(self.ca_dir())
            .args(&options.args)
            // tracing-subscriber colours even a file unless told not to.
            .env("NO_COLOR", "1")
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} in {name}", binary.display()))?;
        Ok(Agent::new(
            node_index,
            name,
            child,
            log_path,
            self.agents.clone(),
        ))
    }

    /// Polls the agent's readiness endpoint until it answers 200; fails at once if the agent exits.
    pub async fn wait_agent_ready(&self, agent: &mut Agent, timeout: Duration) -> Result<()> {
        let node = self.node(agent.node_index());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = agent.try_exit()? {
                bail!(
                    "agent on {} exited ({status}) before it was ready; log:\n{}",
                    node.name,
                    agent.log_tail(200)
                );
            }
            let last = match self.readiness(node.index).await {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => format!("HTTP {} {}", r.status, r.body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "agent on {} not ready within {timeout:?} (last probe: {last}); log:\n{}",
                    node.name,
                    agent.log_tail(200)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET http://127.0.0.1:15021/healthz/ready` inside node `node`'s namespace.
    pub async fn readiness(&self, node: usize) -> Result<HttpResponse> {
        let ready = SocketAddr::from(([127, 0, 0, 1], READY_PORT));
        self.node(node).netns.http_get(ready, READY_PATH).await
    }

    /// `GET http://127.0.0.1:15000<path>` (the agent's admin API) inside node `node`'s namespace.
    pub async fn admin_get(&self, node: usize, path: &str) -> Result<HttpResponse> {
        let admin = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT));
        self.node(node).netns.http_get(admin, path).await
    }

    /// Runs `mesh-agent <args>` in node `node`'s namespace; returns stdout, or an error with
    /// the exit status, stderr and stdout.
    pub fn cli(&self, node: usize, args: &[&str]) -> Result<String> {
        let binary = self.agent_binary()?;
        let node = self.node(node);
        let mut cmd = node.netns.command(&binary.to_string_lossy());
        cmd.args(args).env("NO_COLOR", "1");
        command::stdout_of(&mut cmd, COMMAND_TIMEOUT)
            .with_context(|| format!("mesh-agent CLI on {}", node.name))
    }

    /// `mesh-agent uninstall -o json` in node `node`'s namespace: takes the pinned data plane
    /// away (a stopped agent leaves it failing closed).
    pub fn uninstall(&self, node: usize) -> Result<serde_json::Value> {
        self.cli_json(node, &["uninstall", "-o", "json"])
    }

    /// [`Cluster::cli`], parsed as JSON.
    pub fn cli_json(&self, node: usize, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.cli(node, args)?;
        serde_json::from_str(&out)
            .with_context(|| format!("`mesh-agent {}` did not print JSON:\n{out}", args.join(" ")))
    }

    /// Runs any command in node `node`'s namespace, e.g. `&["tc", "filter", "show", "dev", veth, "ingress"]`.
    pub fn node_exec(&self, node: usize, args: &[&str]) -> Result<String> {
        self.node(node).netns.exec(args)
    }

    /// `ip <args>` in node `node`'s namespace.
    pub fn ip(&self, node: usize, args: &[&str]) -> Result<String> {
        self.node(node).netns.ip(args)
    }

    /// `bpftool <args>` in node `node`'s namespace (`net show` is per namespace).
    pub fn bpftool(&self, node: usize, args: &[&str]) -> Result<String> {
        let mut all = vec!["bpftool"];
        all.extend_from_slice(args);
        self.node(node).netns.exec(&all)
    }

    /// Runs any command in pod `namespace/name`'s namespace.
    pub fn pod_exec(&self, namespace: &str, name: &str, args: &[&str]) -> Result<String> {
        self.pod(namespace, name).netns.exec(args)
    }

    /// The binary [`Cluster::start_agent`] and [`Cluster::cli`] run.
    pub fn agent_binary(&self) -> Result<PathBuf> {
        match &self.agent_binary {
            Some(path) => Ok(path.clone()),
            None => agent_binary(),
        }
    }

    /// Options that run the agent under `prefix` (a command and its arguments, such as
    /// `prlimit --nofile=128:128`), through a script `name` in the cluster's temp dir.
    pub fn wrapped_agent(&self, name: &str, prefix: &str) -> Result<AgentOptions> {
        use std::os::unix::fs::PermissionsExt;
        let script = self.dir_path.join(name);
        let text = format!(
            "#!/bin/sh\nexec {prefix} {} \"$@\"\n",
            self.agent_binary()?.display()
        );
        std::fs::write(&script, text).with_context(|| format!("writing {}", script.display()))?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        Ok(AgentOptions {
            binary: Some(script),
            ..AgentOptions::default()
        })
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, ClusterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wire_nodes(&self) -> Result<()> {
        let [a, b] = [&self.nodes[0], &self.nodes[1]];
        command::stdout_of(
            std::process::Command::new("ip").args([
                "link",
                "add",
                "eth0",
                "netns",
                a.netns.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                b.netns.name(),
            ]),
            COMMAND_TIMEOUT,
        )?;
        for (node, other) in [(a, b), (b, a)] {
            let ns = &node.netns;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", node.link_ip),
                "dev",
                "eth0",
            ])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&[
                "route",
                "add",
                &other.pod_cidr,
                "via",
                &other.link_ip.to_string(),
            ])?;
        }
        Ok(())
    }

    fn add_pod(&mut self, spec: &PodSpec, host: u8, host_veth: String) -> Result<()> {
        let node = &self.nodes[spec.node];
        let ip = Ipv4Addr::new(10, self.octet, spec.node as u8 + 1, host);
        let netns = Netns::create(&format!("mt{}-{}-{}", self.id, spec.namespace, spec.name))?;
        let pod = Pod {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            node: spec.node,
            ip,
            uid: uuid(),
            service_account: spec.service_account.clone(),
            host_veth,
            netns,
        };
        let object = PodObject {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            labels: spec.labels.clone(),
            node_name: node.name.clone(),
            service_account: pod.service_account.clone(),
            pod_ip: ip,
            host_ip: node.link_ip,
        };
        let (node_ns, pod_ns) = (node.netns.name().to_owned(), pod.netns.name().to_owned());
        // Keep `pod` in the cluster before wiring, so a failure below still deletes its netns.
        let veth = pod.host_veth.clone();
        self.pods.push(pod);
        self.lock_state().pods.insert(
            (object.namespace.clone(), object.name.clone()),
            (object, true),
        );
        let pod = self.pods.last().expect("just pushed");
        let node = &self.nodes[spec.node];

        command::stdout_of(
            std::process::Command::new("ip").args([
                "link", "add", &veth, "netns", &node_ns, "type", "veth", "peer", "name", "eth0",
                "netns", &pod_ns,
            ]),
            COMMAND_TIMEOUT,
        )?;
        let gateway = GATEWAY.to_string();
        pod.netns
            .ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        pod.netns.ip(&["link", "set", "eth0", "up"])?;
        pod.netns
            .ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"])?;
        pod.netns
            .ip(&["route", "add", "default", "via", &gateway, "dev", "eth0"])?;
        node.netns.ip(&["link", "set", &veth, "up"])?;
        node.netns
            .ip(&["addr", "add", &format!("{gateway}/32"), "dev", &veth])?;
        node.netns.ip(&[
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            &veth,
            "scope",
            "link",
        ])?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first: nothing may still be attached to a namespace being deleted. Then the
        // data plane they pinned, which outlives them by design.
        self.agents.kill_all();
        for node in 0..self.nodes.len() {
            // A killed agent's handover socket can answer a moment longer on a loaded machine,
            // and uninstall refuses while it does: try again for a while rather than leave the
            // pins (and the programs they hold) behind.
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match self.uninstall(node) {
                    Ok(_) => break,
                    Err(e)
                        if format!("{e:#}").contains("an agent is serving this node")
                            && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => {
                        warn!("mesh-tests: uninstalling from node {node}: {e:#}");
                        break;
                    }
                }
            }
        }
        // Then the namespaces (fields drop after this), then the temp dir unless kept.
        let keep = std::thread::panicking() || std::env::var_os("MESH_TESTS_KEEP").is_some();
        let pods = std::mem::take(&mut self.pods);
        drop(pods);
        let nodes = std::mem::take(&mut self.nodes);
        drop(nodes);
        if let Some(dir) = self.dir.take() {
            if keep {
                let path = dir.keep();
                warn!(
                    "mesh-tests: kept cluster {} files (state, agent logs) in {}",
                    self.id,
                    path.display()
                );
            } else if let Err(e) = dir.close() {
                warn!("mesh-tests: removing {}: {e}", self.dir_path.display());
            }
        }
    }
}

fn validate(spec: &ClusterSpec) -> Result<BTreeMap<String, Labels>> {
    let mut namespaces = BTreeMap::new();
    for ns in &spec.namespaces {
        ensure!(
            namespaces
                .insert(ns.name.clone(), ns.labels.clone())
                .is_none(),
            "namespace {} declared twice",
            ns.name
        );
    }
    let mut seen = BTreeSet::new();
    let mut per_node = [0usize; NODES];
    for pod in &spec.pods {
        ensure!(
            pod.node < NODES,
            "pod {}/{}: node {} does not exist (nodes are 0..{NODES})",
            pod.namespace,
            pod.name,
            pod.node
        );
        ensure!(
            seen.insert((pod.namespace.clone(), pod.name.clone())),
            "pod {}/{} declared twice",
            pod.namespace,
            pod.name
        );
        ensure!(
            !pod.name.is_empty()
                && !pod.namespace.is_empty()
                && !format!("{}{}", pod.namespace, pod.name).contains('/'),
            "bad pod name {}/{}",
            pod.namespace,
            pod.name
        );
        per_node[pod.node] += 1;
        ensure!(per_node[pod.node] <= 200, "at most 200 pods per node");
        namespaces.entry(pod.namespace.clone()).or_default();
    }
    Ok(namespaces)
}

fn labels_of(labels: &[(&str, &str)]) -> Labels {
    labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if let Err(e) = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        panic!("reading /dev/urandom: {e}");
    }
    u64::from_le_bytes(bytes)
}

/// A random version-4 UUID, as the API server assigns to `metadata.uid`.
fn uuid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}
