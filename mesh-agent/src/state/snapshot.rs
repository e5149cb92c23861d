//! One consistent view of the cluster for this node, built from Kubernetes objects, and the lookups on it.

use super::small_map::Labels;
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use std::sync::Arc;

use serde::Serialize;

use super::authorization::AuthorizationPolicy;
use super::endpoint_slice::EndpointSlice;
use super::error::{StateError, StateErrors};
use super::http_route::HttpRoute;
use super::namespace::Namespace;
use super::object::{Object, Sourced};
use super::peer_authentication::PeerAuthentication;
use super::record::{Record, Records};
use super::request_authentication::RequestAuthentication;
use super::service::Service;
use super::use_waypoint::{self, Consumer, WaypointRef, WaypointUse};
use super::validate::{self, ValidationError};
use super::waypoint::{GATEWAY_NAME_LABEL, Waypoint};
use super::workload::Workload;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods that have an IP, sorted by (namespace, name).
    pub workloads: Vec<Arc<Workload>>,
    /// Sorted by (namespace, name).
    pub services: Vec<Arc<Service>>,
    /// IPv4 EndpointSlices, sorted by (namespace, service, name).
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// Istio `AuthorizationPolicy`s, sorted by (namespace, name).
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    /// Istio `PeerAuthentication`s, sorted by (namespace, name).
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    /// Waypoints (Gateways of class `istio-waypoint`), sorted by (namespace, name).
    pub waypoints: Vec<Arc<Waypoint>>,
    /// The Services and pods that name a waypoint, sorted by (kind, namespace, name).
    pub waypoint_uses: Vec<WaypointUse>,
    /// HTTPRoutes and GRPCRoutes attached to Services, sorted by (namespace, name, kind).
    pub http_routes: Vec<Arc<HttpRoute>>,
    /// Istio `RequestAuthentication`s, sorted by (namespace, name).
    pub request_authentications: Vec<Arc<RequestAuthentication>>,
    /// The files the snapshot was read from.
    pub files: Vec<PathBuf>,
    /// Positions in `workloads` and `services` by IP: the proxy asks on every connection.
    #[serde(skip)]
    lookups: Lookups,
}

/// Lookups a connection makes, built once with the snapshot so none of them scans every pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Lookups {
    /// Workloads that own their IP (not hostNetwork, not finished).
    workloads: HashMap<Ipv4Addr, usize>,
    /// Services by ClusterIP.
    services: HashMap<Ipv4Addr, usize>,
    /// For each service (same order as the services), the workloads its selector picks.
    selected: Vec<Vec<usize>>,
    /// For each service (same order), its entry in `waypoint_uses`.
    service_waypoints: Vec<Option<usize>>,
    /// Workloads (by position) that name a waypoint, with their entry in `waypoint_uses`.
    workload_waypoints: HashMap<usize, usize>,
}

impl Lookups {
    /// The first owner of each IP in the (sorted) lists, as a scan would find it.
    fn build(workloads: &[Arc<Workload>], services: &[Arc<Service>]) -> Lookups {
        let mut index = Lookups::default();
        for (i, workload) in workloads.iter().enumerate() {
            if workload.owns_ip() {
                index.workloads.entry(workload.ip).or_insert(i);
            }
        }
        for (i, service) in services.iter().enumerate() {
            if let Some(ip) = service.cluster_ip {
                index.services.entry(ip).or_insert(i);
            }
        }
        index.selected = services
            .iter()
            .map(|service| {
                // Workloads are sorted by namespace first: a service looks only at its own.
                let namespace = service.namespace.as_str();
                let start = workloads.partition_point(|w| w.namespace.as_str() < namespace);
                let end = workloads.partition_point(|w| w.namespace.as_str() <= namespace);
                (start..end)
                    .filter(|&i| workloads[i].owns_ip() && service.selects(&workloads[i]))
                    .collect()
            })
            .collect();
        index
    }
}

impl Snapshot {
    /// Builds a snapshot from objects of any source (files now, the Kubernetes API later).
    /// Fails with every problem found: a state directory is taken whole or not at all.
    pub fn build(
        objects: Vec<Sourced<Object>>,
        files: Vec<PathBuf>,
    ) -> Result<Snapshot, StateErrors> {
        let (snapshot, errors) = Snapshot::assemble(objects, files);
        StateErrors::check(errors)?;
        Ok(snapshot)
    }

    /// Builds a snapshot from the good objects and reports every bad one, each rejected alone
    /// (a source that cannot refuse a whole state, such as the Kubernetes API, serves this).
    /// An AuthorizationPolicy that cannot be understood is not left out: it stands as a DENY of
    /// everything for the workloads it selects ([`AuthorizationPolicy::fail_closed`]).
    pub fn assemble(
        objects: Vec<Sourced<Object>>,
        files: Vec<PathBuf>,
    ) -> (Snapshot, Vec<StateError>) {
        let (records, mut errors) = Records::read(objects);
        let (snapshot, more) = Snapshot::join(&records, files, &Snapshot::default());
        errors.extend(more);
        (snapshot, errors)
    }

    /// Joins records read one by one into a snapshot: what depends on more than one object
    /// (a namespace's enrollment label, that the namespace exists, that no two running pods
    /// claim one IP) is decided here. Every problem of every record is reported; an object
    /// in a namespace that does not exist is left out.
    pub fn join(
        records: &Records,
        files: Vec<PathBuf>,
        previous: &Snapshot,
    ) -> (Snapshot, Vec<StateError>) {
        let mut errors = Vec::new();
        let mut namespaces = BTreeMap::new();
        for record in &records.namespaces {
            errors.extend(record.problems.iter().cloned());
            if let Some(namespace) = &record.model {
                namespaces.insert(namespace.name.clone(), Namespace::clone(namespace));
            }
        }
        let no_labels = Labels::default();
        let workloads = records.pods.iter().filter_map(|record| {
            let pod = admit(record, &namespaces, &mut errors)?;
            let namespace = namespaces.get(&pod.namespace);
            let labels = namespace.map_or(&no_labels, |namespace| &namespace.labels);
            Some((previous.enrolled(pod, labels), &**record))
        });
        let workloads: Vec<(Arc<Workload>, &Record<Workload>)> = workloads.collect();
        let workloads = validate::unique_ips(workloads, &mut errors);
        let mut waypoints = admitted(&records.gateways, &namespaces, &mut errors);
        waypoints.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let uses = waypoint_uses(records, &workloads, &namespaces, &waypoints, &mut errors);
        let services = admitted(&records.services, &namespaces, &mut errors);
        let mut http_routes = admitted(&records.http_routes, &namespaces, &mut errors);
        http_routes.extend(admitted(&records.grpc_routes, &namespaces, &mut errors));
        http_routes
            .sort_by(|a, b| (&a.namespace, &a.name, a.kind).cmp(&(&b.namespace, &b.name, b.kind)));
        let endpoint_slices = admitted(&records.endpoint_slices, &namespaces, &mut errors);
        let authorization_policies =
            admitted(&records.authorization_policies, &namespaces, &mut errors);
        let peer_authentications =
            admitted(&records.peer_authentications, &namespaces, &mut errors);
        let mut request_authentications =
            admitted(&records.request_authentications, &namespaces, &mut errors);
        request_authentications
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let snapshot = Snapshot::new(
            namespaces,
            workloads
                .into_iter()
                .map(|(workload, _)| workload)
                .collect(),
            services,
            files,
        )
        .with_policies(authorization_policies, peer_authentications)
        .with_endpoint_slices(endpoint_slices)
        .with_waypoints(waypoints, uses);
        let snapshot = Snapshot {
            http_routes,
            request_authentications,
            ..snapshot
        };
        (snapshot, errors)
    }

    /// The workload of a pod read alone, enrolled with its namespace's labels: the pod's own
    /// model when that changes nothing, else this snapshot's equal workload, else a new one. A
    /// rebuild so allocates only for what changed.
    fn enrolled(&self, pod: &Arc<Workload>, namespace_labels: &Labels) -> Arc<Workload> {
        let enrollment = pod.enrollment_with(namespace_labels);
        if enrollment == pod.enrollment {
            return pod.clone();
        }
        let key = (pod.namespace.as_str(), pod.name.as_str());
        let held = self
            .workloads
            .binary_search_by(|w| (w.namespace.as_str(), w.name.as_str()).cmp(&key))
            .ok()
            .map(|i| &self.workloads[i])
            .filter(|held| held.enrollment == enrollment && held.same_pod(pod));
        match held {
            Some(held) => held.clone(),
            None => Arc::new(Workload {
                enrollment,
                ..Workload::clone(pod)
            }),
        }
    }

    /// Sets the EndpointSlices, sorting them so equal states compare equal.
    pub fn with_endpoint_slices(mut self, mut slices: Vec<Arc<EndpointSlice>>) -> Snapshot {
        slices.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.name).cmp(&(&b.namespace, &b.service, &b.name))
        });
        self.endpoint_slices = slices;
        self
    }

    /// Assembles a snapshot, sorting workloads and services so equal states compare equal.
    pub fn new(
        namespaces: BTreeMap<String, Namespace>,
        mut workloads: Vec<Arc<Workload>>,
        mut services: Vec<Arc<Service>>,
        mut files: Vec<PathBuf>,
    ) -> Snapshot {
        workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        files.sort();
        Snapshot {
            lookups: Lookups::build(&workloads, &services),
            namespaces,
            workloads,
            services,
            endpoint_slices: Vec::new(),
            files,
            authorization_policies: Vec::new(),
            peer_authentications: Vec::new(),
            waypoints: Vec::new(),
            waypoint_uses: Vec::new(),
            http_routes: Vec::new(),
            request_authentications: Vec::new(),
        }
    }

    /// Sets the waypoints (sorted) and who uses them, and indexes the uses by service and pod.
    pub fn with_waypoints(
        mut self,
        waypoints: Vec<Arc<Waypoint>>,
        mut uses: Vec<WaypointUse>,
    ) -> Snapshot {
        uses.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
        let position = |kind: Consumer, namespace: &str, name: &str| {
            uses.binary_search_by(|u| {
                (u.kind, u.namespace.as_str(), u.name.as_str()).cmp(&(kind, namespace, name))
            })
            .ok()
        };
        self.lookups.service_waypoints = self
            .services
            .iter()
            .map(|s| position(Consumer::Service, &s.namespace, &s.name))
            .collect();
        self.lookups.workload_waypoints = self
            .workloads
            .iter()
            .enumerate()
            .filter_map(|(i, w)| Some((i, position(Consumer::Workload, &w.namespace, &w.name)?)))
            .collect();
        self.waypoints = waypoints;
        self.waypoint_uses = uses;
        self
    }

    /// The waypoint a service names, if it names one (usable or not).
    pub fn service_waypoint(&self, service: &Service) -> Option<&WaypointUse> {
        // Asked on every connection to a Service: a mesh without waypoints pays nothing more.
        if self.waypoint_uses.is_empty() {
            return None;
        }
        let i = self
            .services
            .binary_search_by(|s| (&s.namespace, &s.name).cmp(&(&service.namespace, &service.name)))
            .ok()?;
        let entry = (*self.lookups.service_waypoints.get(i)?)?;
        self.waypoint_uses.get(entry)
    }

    /// The waypoint a pod names for traffic addressed to it, if it names one.
    pub fn workload_waypoint(&self, workload: &Workload) -> Option<&WaypointUse> {
        if self.lookups.workload_waypoints.is_empty() {
            return None;
        }
        let i = self
            .workloads
            .binary_search_by(|w| {
                (&w.namespace, &w.name).cmp(&(&workload.namespace, &workload.name))
            })
            .ok()?;
        let entry = *self.lookups.workload_waypoints.get(&i)?;
        self.waypoint_uses.get(entry)
    }

    pub fn waypoint(&self, waypoint: &WaypointRef) -> Option<&Waypoint> {
        self.waypoints
            .binary_search_by(|w| {
                (&w.namespace, &w.name).cmp(&(&waypoint.namespace, &waypoint.name))
            })
            .ok()
            .map(|i| &*self.waypoints[i])
    }

    /// A waypoint's running pods (those the Gateway controller labels with its name).
    pub fn waypoint_pods<'a>(
        &'a self,
        waypoint: &'a WaypointRef,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        let namespace = waypoint.namespace.as_str();
        let start = self
            .workloads
            .partition_point(|w| w.namespace.as_str() < namespace);
        let end = self
            .workloads
            .partition_point(|w| w.namespace.as_str() <= namespace);
        self.workloads[start..end]
            .iter()
            .filter(move |w| {
                w.owns_ip() && w.labels.value(GATEWAY_NAME_LABEL) == Some(waypoint.name.as_str())
            })
            .map(|w| &**w)
    }

    /// Sets the Istio security policies, sorting them so equal states compare equal.
    pub fn with_policies(
        mut self,
        mut authorization_policies: Vec<Arc<AuthorizationPolicy>>,
        mut peer_authentications: Vec<Arc<PeerAuthentication>>,
    ) -> Snapshot {
        authorization_policies
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        peer_authentications.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.authorization_policies = authorization_policies;
        self.peer_authentications = peer_authentications;
        self
    }

    /// The pod that has this IP; never a hostNetwork pod (the IP is the node's) nor a finished one.
    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Workload> {
        self.lookups
            .workloads
            .get(&ip)
            .and_then(|&i| self.workloads.get(i))
            .map(|workload| &**workload)
    }

    /// Every workload scheduled on `node`, enrolled or not.
    pub fn workloads_on_node<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads
            .iter()
            .filter(move |workload| workload.node == node)
            .map(|workload| &**workload)
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads
            .iter()
            .find(|workload| workload.namespace == namespace && workload.name == name)
            .map(|workload| &**workload)
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|service| service.namespace == namespace && service.name == name)
            .map(|service| &**service)
    }

    /// The service whose cluster IP this is.
    pub fn service_by_ip(&self, ip: Ipv4Addr) -> Option<&Service> {
        self.lookups
            .services
            .get(&ip)
            .and_then(|&i| self.services.get(i))
            .map(|service| &**service)
    }

    /// The EndpointSlices of a service. When it has any, they, not its selector, say where its
    /// traffic goes (a selector-less Service gets its endpoints this way).
    pub fn slices_of<'a>(
        &'a self,
        service: &'a Service,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        // Sorted by (namespace, service, name): the service's slices are one run.
        let key = (service.namespace.as_str(), service.name.as_str());
        fn of(slice: &EndpointSlice) -> (&str, &str) {
            (&slice.namespace, &slice.service)
        }
        let start = self
            .endpoint_slices
            .partition_point(|slice| of(slice) < key);
        let end = self
            .endpoint_slices
            .partition_point(|slice| of(slice) <= key);
        self.endpoint_slices[start..end]
            .iter()
            .map(|slice| &**slice)
    }

    /// The workloads a service sends traffic to (running pods its selector matches).
    pub fn endpoints<'a>(
        &'a self,
        service: &'a Service,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        // A service of this snapshot has its selection indexed; any other is matched by a scan.
        let indexed = self
            .services
            .binary_search_by(|s| (&s.namespace, &s.name).cmp(&(&service.namespace, &service.name)))
            .ok()
            .filter(|&i| std::ptr::eq(&*self.services[i], service))
            .and_then(|i| self.lookups.selected.get(i));
        let (indexed, scanned) = match indexed {
            Some(selected) => (Some(selected.iter().map(|&i| &*self.workloads[i])), None),
            None => (
                None,
                Some(
                    self.workloads
                        .iter()
                        .filter(move |w| w.owns_ip() && service.selects(w))
                        .map(|w| &**w),
                ),
            ),
        };
        indexed
            .into_iter()
            .flatten()
            .chain(scanned.into_iter().flatten())
    }
}

/// The record's model if its namespace exists; its problems, and the missing namespace, go to
/// `errors`.
fn admit<'r, M>(
    record: &'r Record<M>,
    namespaces: &BTreeMap<String, Namespace>,
    errors: &mut Vec<StateError>,
) -> Option<&'r Arc<M>> {
    let homeless = record
        .namespace
        .as_ref()
        .filter(|namespace| !namespaces.contains_key(*namespace));
    if let Some(namespace) = homeless {
        let error = ValidationError::MissingNamespace(namespace.clone());
        errors.push(record.error(error.field(), error));
    }
    errors.extend(record.problems.iter().cloned());
    record.model.as_ref().filter(|_| homeless.is_none())
}

/// Who names which waypoint: each admitted Service, and each pod that owns its IP. A name that
/// cannot be used is a problem of the object that names it, and stays in the table as unusable.
fn waypoint_uses(
    records: &Records,
    workloads: &[(Arc<Workload>, &Record<Workload>)],
    namespaces: &BTreeMap<String, Namespace>,
    waypoints: &[Arc<Waypoint>],
    errors: &mut Vec<StateError>,
) -> Vec<WaypointUse> {
    let no_labels = Labels::default();
    let namespace_labels =
        |namespace: &str| namespaces.get(namespace).map_or(&no_labels, |n| &n.labels);
    let mut uses = Vec::new();
    let mut resolve =
        |kind,
         namespace: &str,
         name: &str,
         labels: &Labels,
         record: &dyn Fn(&use_waypoint::UseWaypointError) -> StateError| {
            let resolved = use_waypoint::resolve(
                kind,
                namespace,
                labels,
                namespace_labels(namespace),
                waypoints,
            );
            if let Err(error) = &resolved {
                errors.push(record(error));
            }
            uses.extend(WaypointUse::of(kind, namespace, name, &resolved));
        };
    for record in &records.services {
        let Some(service) = record
            .model
            .as_ref()
            .filter(|s| namespaces.contains_key(&s.namespace))
        else {
            continue;
        };
        resolve(
            Consumer::Service,
            &service.namespace,
            &service.name,
            &service.labels,
            &|e| record.error(Some(&e.field()), e),
        );
    }
    for (workload, record) in workloads {
        if !workload.owns_ip() {
            continue;
        }
        resolve(
            Consumer::Workload,
            &workload.namespace,
            &workload.name,
            &workload.labels,
            &|e| record.error(Some(&e.field()), e),
        );
    }
    uses
}

/// The models of the admitted records.
fn admitted<M>(
    records: &[Arc<Record<M>>],
    namespaces: &BTreeMap<String, Namespace>,
    errors: &mut Vec<StateError>,
) -> Vec<Arc<M>> {
    records
        .iter()
        .filter_map(|record| admit(record, namespaces, errors).cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::local::document::{Format, parse};
    use crate::state::{Action, Rule};
    use std::path::Path;

    const NAMESPACES: &str = "---
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {mesh-agent.dev/mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
";

    fn pod(namespace: &str, name: &str, node: &str, ip: &str, extra_spec: &str) -> String {
        format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}, labels: {{app: {name}}}}}
spec: {{nodeName: {node}{extra_spec}}}
status: {{podIP: \"{ip}\", phase: Running}}
"
        )
    }

    fn build(text: &str) -> Result<Snapshot, StateErrors> {
        let parsed = parse(Path::new("s.yaml"), text, Format::Yaml);
        StateErrors::check(parsed.errors)?;
        Snapshot::build(parsed.objects, vec!["s.yaml".into()])
    }

    fn messages(result: Result<Snapshot, StateErrors>) -> Vec<String> {
        result
            .expect_err("must be rejected")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn records(text: &str) -> Records {
        let parsed = parse(Path::new("s.yaml"), text, Format::Yaml);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let (records, errors) = Records::read(parsed.objects);
        assert!(errors.is_empty(), "{errors:?}");
        records
    }

    #[test]
    fn a_rebuild_shares_what_did_not_change_and_enrolls_what_did() {
        let text = format!(
            "{NAMESPACES}{}{}",
            pod("demo", "a", "n1", "10.0.0.1", ""),
            pod("plain", "b", "n1", "10.0.0.2", "")
        );
        let records = records(&text);
        let (first, errors) = Snapshot::join(&records, Vec::new(), &Snapshot::default());
        assert!(errors.is_empty(), "{errors:?}");
        let (a, b) = (&first.workloads[0], &first.workloads[1]);
        assert!(a.is_enrolled() && !b.is_enrolled());
        // A pod whose namespace decides nothing is the record's own model; an enrolled one
        // is a copy, which the next rebuild takes over rather than copying again.
        let model = |i: usize| records.pods[i].model.clone().expect("a workload");
        assert!(Arc::ptr_eq(b, &model(1)) && !Arc::ptr_eq(a, &model(0)));
        let (second, _) = Snapshot::join(&records, Vec::new(), &first);
        assert!(Arc::ptr_eq(&second.workloads[0], a));
        assert!(Arc::ptr_eq(&second.workloads[1], b));

        // The namespace loses its label: the same pod records, now not enrolled.
        let unlabelled = text.replacen("labels: {mesh-agent.dev/mode: ambient}", "", 1);
        let mut changed = records.clone();
        changed.namespaces = self::records(&unlabelled).namespaces;
        let (third, _) = Snapshot::join(&changed, Vec::new(), &second);
        assert!(!third.workloads[0].is_enrolled());
        assert!(Arc::ptr_eq(&third.workloads[0], &model(0)));
    }

    #[test]
    fn builds_sorted_workloads_and_lookups() {
        let text = format!(
            "{NAMESPACES}{}{}{}{}",
            pod("plain", "b", "node-a", "10.0.0.2", ""),
            pod("demo", "z", "node-b", "10.0.0.3", ""),
            pod("demo", "a", "node-a", "10.0.0.1", ""),
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: pending, namespace: demo}\nspec: {}\n",
        );
        let snapshot = build(&text).expect("must succeed");
        let names: Vec<&str> = snapshot.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["a", "z", "b"]);
        assert_eq!(
            snapshot
                .workload_by_ip(Ipv4Addr::new(10, 0, 0, 3))
                .expect("must succeed")
                .name,
            "z"
        );
        assert!(
            snapshot
                .workload_by_ip(Ipv4Addr::new(10, 0, 0, 9))
                .is_none()
        );
        let on_a: Vec<&str> = snapshot
            .workloads_on_node("node-a")
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(on_a, ["a", "b"]);
        assert!(
            snapshot
                .workload("demo", "a")
                .expect("must succeed")
                .is_enrolled()
        );
        assert!(
            !snapshot
                .workload("plain", "b")
                .expect("must succeed")
                .is_enrolled()
        );
        assert!(snapshot.workload("demo", "pending").is_none());
    }

    #[test]
    fn host_network_and_terminal_pods_may_share_ips() {
        let text = format!(
            "{NAMESPACES}{}{}{}",
            pod(
                "demo",
                "host-1",
                "node-a",
                "192.168.1.10",
                ", hostNetwork: true"
            ),
            pod(
                "demo",
                "host-2",
                "node-a",
                "192.168.1.10",
                ", hostNetwork: true"
            ),
            pod("demo", "web", "node-a", "10.0.0.1", ""),
        ) + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: done, namespace: demo}\nspec: {nodeName: node-a}\nstatus: {podIP: 10.0.0.1, phase: Succeeded}\n";
        let snapshot = build(&text).expect("must succeed");
        assert_eq!(snapshot.workloads.len(), 4);
        assert!(
            snapshot
                .workload_by_ip(Ipv4Addr::new(192, 168, 1, 10))
                .is_none()
        );
        assert_eq!(
            snapshot
                .workload_by_ip(Ipv4Addr::new(10, 0, 0, 1))
                .expect("must succeed")
                .name,
            "web"
        );
        let host = snapshot.workload("demo", "host-1").expect("must succeed");
        assert_eq!(host.enrollment.reason(), "pod uses hostNetwork");
    }

    fn assemble(text: &str) -> (Snapshot, Vec<String>) {
        let parsed = parse(Path::new("s.yaml"), text, Format::Yaml);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let (snapshot, errors) = Snapshot::assemble(parsed.objects, vec!["s.yaml".into()]);
        (snapshot, errors.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn assembling_rejects_each_bad_object_alone() {
        // A pod in a missing namespace, a second claim on an IP, a duplicate name and a bad
        // Service: each is reported and left out; everything else is there.
        let text = format!(
            "{NAMESPACES}{}{}{}{}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 0}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: ok, namespace: demo}}\nspec: {{clusterIP: 10.96.0.2, ports: [{{port: 80}}]}}\n",
            pod("demo", "a", "n", "10.0.0.1", ""),
            pod("ghost", "b", "n", "10.0.0.2", ""),
            pod("plain", "c", "n", "10.0.0.1", ""),
            pod("demo", "a", "n", "10.0.0.3", ""),
            pod("plain", "d", "n", "10.0.0.4", ""),
        );
        let (snapshot, errors) = assemble(&text);
        let pods: Vec<String> = snapshot
            .workloads
            .iter()
            .map(|w| format!("{}/{} {}", w.namespace, w.name, w.ip))
            .collect();
        assert_eq!(pods, ["demo/a 10.0.0.1", "plain/d 10.0.0.4"]);
        assert!(snapshot.service("demo", "ok").is_some());
        assert!(snapshot.service("demo", "web").is_none());
        assert_eq!(errors.len(), 4, "{errors:#?}");
        for (error, object) in errors.iter().zip([
            "Pod demo/a: defined more than once",
            "Pod ghost/b: metadata.namespace",
            "Pod plain/c: status.podIP",
            "Service demo/web: spec.ports[0].port",
        ]) {
            assert!(error.contains(object), "{error} lacks {object}");
        }
        // The directory source takes a state whole or not at all.
        assert_eq!(messages(build(&text)), errors);
    }

    #[test]
    fn an_authorization_policy_that_cannot_be_understood_stays_as_a_deny_of_all() {
        let text = format!(
            "{NAMESPACES}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: broken, namespace: demo}}\nspec:\n  selector: {{matchLabels: {{app: a}}}}\n  action: ALLOW\n  rules: [{{from: [{{source: {{ipBlocks: [10.0.0.x]}}}}]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: fine, namespace: demo}}\nspec: {{action: DENY, rules: [{{from: [{{source: {{namespaces: [plain]}}}}]}}]}}\n"
        );
        let (snapshot, errors) = assemble(&text);
        assert_eq!(
            errors,
            [
                "s.yaml: AuthorizationPolicy demo/broken: spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.x\" is not an IP address or CIDR block"
            ]
        );
        let policies = &snapshot.authorization_policies;
        assert_eq!(policies.len(), 2);
        let broken = policies.iter().find(|p| p.name == "broken").expect("kept");
        assert_eq!(broken.action, Action::Deny);
        assert_eq!(broken.rules, [Rule::default()]);
        assert_eq!(broken.selector.value("app"), Some("a"));
        assert!(!broken.dry_run);
        assert!(
            broken
                .invalid
                .as_deref()
                .is_some_and(|why| why.contains("ipBlocks[0]")),
            "{broken:?}"
        );
        let fine = policies.iter().find(|p| p.name == "fine").expect("kept");
        assert_eq!(fine.invalid, None);
    }

    #[test]
    fn rejects_pod_in_unknown_namespace() {
        let text = format!(
            "{NAMESPACES}{}",
            pod("ghost", "client", "n", "10.0.0.1", "")
        );
        assert_eq!(
            messages(build(&text)),
            [
                "s.yaml: Pod ghost/client: metadata.namespace: namespace \"ghost\" has no Namespace object"
            ]
        );
    }

    #[test]
    fn rejects_duplicate_objects() {
        let text = format!(
            "{NAMESPACES}{NAMESPACES}{}{}",
            pod("demo", "client", "n", "10.0.0.1", ""),
            pod("demo", "client", "n", "10.0.0.2", ""),
        );
        assert_eq!(
            messages(build(&text)),
            [
                "s.yaml: Namespace demo: defined more than once: first in s.yaml (document 1)",
                "s.yaml: Namespace plain: defined more than once: first in s.yaml (document 2)",
                "s.yaml: Pod demo/client: defined more than once: first in s.yaml (document 5)",
            ]
        );
    }

    #[test]
    fn rejects_two_running_pods_with_one_ip() {
        let text = format!(
            "{NAMESPACES}{}{}",
            pod("demo", "a", "n", "10.0.0.1", ""),
            pod("plain", "b", "n", "10.0.0.1", ""),
        );
        assert_eq!(
            messages(build(&text)),
            [
                "s.yaml: Pod plain/b: status.podIP: 10.0.0.1 is also the IP of Pod demo/a in s.yaml (document 3)"
            ]
        );
    }

    #[test]
    fn rejects_missing_name() {
        let text = format!(
            "{NAMESPACES}---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: demo}}\n"
        );
        assert_eq!(
            messages(build(&text)),
            ["s.yaml: document 3: metadata.name: is required for a Service"]
        );
    }

    #[test]
    fn reports_every_problem() {
        let text = format!(
            "{NAMESPACES}{}{}{}",
            pod("demo", "client", "n", "10.0.0.x", ""),
            pod("demo", "v6", "n", "fd00::1", ""),
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {clusterIP: 10.96.0.999, ports: [{port: 0}]}\n",
        );
        assert_eq!(
            messages(build(&text)),
            [
                "s.yaml: Pod demo/client: status.podIP: \"10.0.0.x\" is not an IPv4 address",
                "s.yaml: Pod demo/v6: status.podIP: fd00::1 is an IPv6 address; only IPv4 is supported for now",
                "s.yaml: Service demo/web: spec.clusterIP: \"10.96.0.999\" is not an IPv4 address (nor \"None\")",
                "s.yaml: Service demo/web: spec.ports[0].port: 0 is out of range 1-65535",
            ]
        );
    }

    fn authorization(namespace: &str, name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
        )
    }

    fn peer(namespace: &str, name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
        )
    }

    #[test]
    fn builds_sorted_security_policies() {
        let text = format!(
            "{NAMESPACES}{}{}{}{}",
            authorization("plain", "b", "{action: DENY, rules: [{}]}"),
            authorization("demo", "z", "{}"),
            authorization(
                "demo",
                "a",
                "{rules: [{to: [{operation: {ports: [\"80\"]}}]}]}"
            ),
            peer("demo", "default", "{mtls: {mode: STRICT}}"),
        );
        let snapshot = build(&text).expect("must succeed");
        let keys: Vec<String> = snapshot
            .authorization_policies
            .iter()
            .map(|policy| policy.key())
            .collect();
        assert_eq!(keys, ["demo/a", "demo/z", "plain/b"]);
        assert_eq!(
            snapshot.authorization_policies[0].rules[0].to[0].ports,
            [80]
        );
        assert_eq!(snapshot.peer_authentications.len(), 1);
        assert_eq!(
            snapshot.peer_authentications[0].mode,
            crate::state::MtlsMode::Strict
        );
    }

    #[test]
    fn rejects_bad_security_policies_with_the_field() {
        let text = format!(
            "{NAMESPACES}{}{}{}{}{}{}",
            authorization("istio-system", "mesh", "{}"),
            authorization(
                "demo",
                "p",
                "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.x]}}]}]}"
            ),
            authorization("demo", "p", "{}"),
            authorization("demo", "ext", "{action: CUSTOM, provider: {name: opa}}"),
            peer("demo", "default", "{mtls: {mode: ON}}"),
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {namespace: demo}\n",
        );
        // Problems of names come first (they are found before objects are read), then each
        // kind's in turn.
        assert_eq!(
            messages(build(&text)),
            [
                "s.yaml: AuthorizationPolicy demo/p: defined more than once: first in s.yaml (document 4)",
                "s.yaml: document 8: metadata.name: is required for a PeerAuthentication",
                "s.yaml: AuthorizationPolicy istio-system/mesh: metadata.namespace: namespace \"istio-system\" has no Namespace object",
                "s.yaml: AuthorizationPolicy demo/p: spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0.x\" is not an IP address or CIDR block",
                "s.yaml: AuthorizationPolicy demo/ext: spec.action: CUSTOM is not supported: the mesh has no external authorization",
                "s.yaml: PeerAuthentication demo/default: spec.mtls.mode: \"ON\" is not an mTLS mode (UNSET, DISABLE, PERMISSIVE, STRICT)",
            ]
        );
    }

    #[test]
    fn services_and_endpoints() {
        let text = format!(
            "{NAMESPACES}{}{}",
            pod("demo", "web", "n", "10.0.0.1", ""),
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n",
        );
        let snapshot = build(&text).expect("must succeed");
        let service = snapshot
            .service_by_ip(Ipv4Addr::new(10, 96, 0, 10))
            .expect("must succeed");
        assert_eq!(
            service,
            snapshot.service("demo", "web").expect("must succeed")
        );
        let endpoints: Vec<&str> = snapshot
            .endpoints(service)
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(endpoints, ["web"]);
    }

    #[test]
    fn a_service_finds_its_own_endpoints_and_slices_only() {
        let service = |namespace: &str, name: &str, ip: &str| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{clusterIP: {ip}, selector: {{app: web}}, ports: [{{port: 80}}]}}\n"
            )
        };
        let slice = |namespace: &str, service: &str, name: &str, ip: &str| {
            format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [{ip}]}}]\n"
            )
        };
        let text = [
            NAMESPACES.to_owned(),
            pod("demo", "web", "n", "10.0.0.1", ""),
            pod("plain", "web", "n", "10.0.0.2", ""),
            pod("demo", "api", "n", "10.0.0.3", ""),
            service("demo", "web", "10.96.0.1"),
            service("demo", "webx", "10.96.0.2"),
            service("plain", "web", "10.96.0.3"),
            slice("plain", "web", "web-b", "10.0.0.2"),
            slice("demo", "webx", "webx-a", "10.0.0.9"),
            slice("plain", "web", "web-a", "10.0.0.2"),
            slice("demo", "web", "web-a", "10.0.0.1"),
        ]
        .concat();
        let snapshot = build(&text).expect("must succeed");
        let lookups = |ip| snapshot.service_by_ip(ip).expect("service");
        let endpoints = |service| -> Vec<String> {
            snapshot
                .endpoints(service)
                .map(|w| format!("{}/{}", w.namespace, w.name))
                .collect()
        };
        let slices = |service| -> Vec<String> {
            snapshot
                .slices_of(service)
                .map(|s| format!("{}/{}", s.namespace, s.name))
                .collect()
        };
        let (web, webx, plain_web) = (
            lookups(Ipv4Addr::new(10, 96, 0, 1)),
            lookups(Ipv4Addr::new(10, 96, 0, 2)),
            lookups(Ipv4Addr::new(10, 96, 0, 3)),
        );
        assert_eq!(endpoints(web), ["demo/web"]);
        assert_eq!(endpoints(webx), ["demo/web"]);
        assert_eq!(endpoints(plain_web), ["plain/web"]);
        assert_eq!(slices(web), ["demo/web-a"]);
        assert_eq!(slices(webx), ["demo/webx-a"]);
        assert_eq!(slices(plain_web), ["plain/web-a", "plain/web-b"]);
        // A Service that is not this snapshot's own is still answered, by a scan.
        let copy = web.clone();
        assert_eq!(endpoints(&copy), ["demo/web"]);
    }

    #[test]
    fn a_bad_endpoint_slice_is_rejected_with_its_field() {
        let text = format!(
            "{NAMESPACES}{}",
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.300]}]\n",
        );
        assert_eq!(
            messages(build(&text)),
            [
                "s.yaml: EndpointSlice demo/web-1: endpoints[0].addresses[0]: \"10.0.0.300\" is not an IPv4 address (the slice's addressType is IPv4)"
            ]
        );
    }

    const WAYPOINT: &str = "---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, gateway.istio.io/managed: istio.io-mesh-controller}
spec: {nodeName: n1, serviceAccountName: waypoint}
status: {podIP: 10.0.0.9, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.2, ports: [{name: tcp, port: 5432}]}
";

    #[test]
    fn services_use_their_namespaces_waypoint_and_waypoint_pods_are_not_captured() {
        let text = format!("{WAYPOINT}{}", pod("shop", "web-1", "n1", "10.0.0.1", ""));
        let snapshot = build(&text).expect("valid");
        assert_eq!(snapshot.waypoints.len(), 1);
        let web = snapshot.service("shop", "web").expect("web");
        let used = snapshot
            .service_waypoint(web)
            .expect("web uses the waypoint");
        assert!(used.is_usable());
        assert_eq!(used.waypoint.to_string(), "shop/waypoint");
        let db = snapshot.service("shop", "db").expect("db");
        assert_eq!(snapshot.service_waypoint(db), None, "opted out with none");
        let pods: Vec<&str> = snapshot
            .waypoint_pods(&used.waypoint)
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(pods, ["waypoint-0"]);
        let waypoint_pod = snapshot.workload("shop", "waypoint-0").expect("pod");
        assert!(!waypoint_pod.is_enrolled());
        assert_eq!(snapshot.workload_waypoint(waypoint_pod), None);
        assert!(
            snapshot
                .workload("shop", "web-1")
                .expect("web-1")
                .is_enrolled()
        );
        // The namespace's waypoint takes services only: its pods are not sent through it.
        let web_1 = snapshot.workload("shop", "web-1").expect("web-1");
        assert_eq!(snapshot.workload_waypoint(web_1), None);
    }

    #[test]
    fn a_waypoint_that_cannot_be_used_is_a_problem_and_stays_unusable() {
        let text = WAYPOINT.replace(
            "gatewayClassName: istio-waypoint",
            "gatewayClassName: istio",
        );
        assert_eq!(
            messages(build(&text)),
            [
                "s.yaml: Service shop/web: metadata.labels[istio.io/use-waypoint]: its namespace's label names waypoint shop/waypoint, which is not a valid istio-waypoint Gateway"
            ]
        );
        let records = records(&text);
        let (snapshot, _) = Snapshot::join(&records, Vec::new(), &Snapshot::default());
        let web = snapshot.service("shop", "web").expect("web is kept");
        let used = snapshot.service_waypoint(web).expect("named");
        assert!(!used.is_usable(), "{used:?}");
    }

    #[test]
    fn mesh_http_routes_are_kept_and_a_bad_one_is_named() {
        let route = "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ingress, namespace: shop}
spec: {parentRefs: [{name: public}], rules: [{}]}
";
        let snapshot = build(&format!("{WAYPOINT}{route}")).expect("valid");
        let names: Vec<&str> = snapshot
            .http_routes
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["split"], "the ingress route is not the mesh's");
        let bad = route.replace("[{backendRefs:", "[{filters: [{type: CORS}], backendRefs:");
        assert_eq!(
            messages(build(&format!("{WAYPOINT}{bad}"))),
            [
                "s.yaml: HTTPRoute shop/split: spec.rules[0].filters[0].type: filter type \"CORS\" is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror)"
            ]
        );
    }
}
