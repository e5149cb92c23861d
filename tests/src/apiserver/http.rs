//! Request handling: bearer-token check, routing of `/api/v1/…` and `/apis/{group}/{version}/…`
//! paths, paged lists, and watches as chunked newline-delimited JSON events.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, channel::Channel, combinators::BoxBody};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::selector::{FieldSelector, LabelSelector};
use super::store::{Change, Kind, kind_by_path};
use super::{Shared, Verb};

pub type Body = BoxBody<Bytes, Infallible>;

/// A Status object, the body of every error the API server returns.
pub fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    })
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status(code, reason, message))
}

fn bad_request(message: &str) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn not_found(message: &str) -> Response<Body> {
    error(StatusCode::NOT_FOUND, "NotFound", message)
}

/// What a path names: a kind, maybe a namespace, maybe one object.
struct Target {
    kind: &'static Kind,
    namespace: Option<String>,
    name: Option<String>,
}

pub async fn handle<B>(shared: Arc<Shared>, request: Request<B>) -> Response<Body> {
    let authorized = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.trim() == shared.token);
    let path = request.uri().path().to_string();
    let query = match parse_query(request.uri().query().unwrap_or_default()) {
        Ok(q) => q,
        Err(bad) => return bad_request(&format!("malformed query string: {bad}")),
    };
    let watch = query.get("watch").is_some_and(|v| v == "true" || v == "1");
    let target = route(&path);
    let verb = match (&target, watch) {
        (Some(Target { name: Some(_), .. }), _) => Verb::Get,
        (Some(_), true) => Verb::Watch,
        (Some(_), false) => Verb::List,
        (None, _) => Verb::Other,
    };
    shared.count(verb, &path);
    if !authorized {
        return error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if request.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the test API server only serves GET",
        );
    }
    let Some(target) = target else {
        return not_found("the server could not find the requested resource");
    };
    if target.kind.custom && !shared.lock().istio_installed {
        return not_found("the server could not find the requested resource");
    }
    let (fields, labels) = match selectors(target.kind, &query) {
        Ok(s) => s,
        Err(message) => return bad_request(&message),
    };
    match (&target.name, watch) {
        (Some(name), _) => get(&shared, &target, name),
        (None, true) => watch_response(shared, target, fields, labels, &query),
        (None, false) => list(&shared, &target, &fields, &labels, &query),
    }
}

fn route(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let named = |plural: &str, namespace: Option<&str>, name: Option<&str>| {
        let kind = kind_by_path(group, version, plural)?;
        (kind.namespaced || namespace.is_none()).then(|| Target {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
        })
    };
    match rest {
        [plural] => named(plural, None, None),
        ["namespaces", ns, plural] => named(plural, Some(ns), None),
        ["namespaces", ns, plural, name] => named(plural, Some(ns), Some(name)),
        [plural, name] => named(plural, None, Some(name)),
        _ => None,
    }
}

fn selectors(
    kind: &Kind,
    query: &HashMap<String, String>,
) -> Result<(FieldSelector, LabelSelector), String> {
    let fields = FieldSelector::parse(
        query.get("fieldSelector").map_or("", String::as_str),
        kind.fields,
    )
    .map_err(|e| format!("{e}"))?;
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| format!("{e}"))?;
    Ok((fields, labels))
}

/// The object as served under the requested kind's apiVersion.
fn served(kind: &Kind, mut object: Value) -> Value {
    object["apiVersion"] = json!(kind.api_version());
    object["kind"] = json!(kind.kind);
    object
}

fn in_scope(target: &Target, fields: &FieldSelector, labels: &LabelSelector, o: &Value) -> bool {
    let namespace = o.pointer("/metadata/namespace").and_then(Value::as_str);
    target
        .namespace
        .as_deref()
        .is_none_or(|ns| namespace == Some(ns))
        && fields.matches(o)
        && labels.matches(o)
}

fn get(shared: &Shared, target: &Target, name: &str) -> Response<Body> {
    let namespace = target.namespace.as_deref().unwrap_or_default();
    match shared.lock().get(target.kind, namespace, name) {
        Some(object) => json_response(StatusCode::OK, &served(target.kind, object)),
        None => not_found(&format!("{} \"{name}\" not found", target.kind.plural)),
    }
}

fn list(
    shared: &Shared,
    target: &Target,
    fields: &FieldSelector,
    labels: &LabelSelector,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => 0,
        Some(Ok(limit)) => limit,
        Some(Err(_)) => return bad_request("limit must be a non-negative integer"),
    };
    let mut store = shared.lock();
    let (items, list_rv) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match store.take_snapshot(token) {
            Some(rest) => rest,
            None => {
                return error(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                );
            }
        },
        None => {
            let items: Vec<Value> = store
                .objects(target.kind, target.namespace.as_deref())
                .into_iter()
                .filter(|o| in_scope(target, fields, labels, o))
                .collect();
            (items, store.resource_version())
        }
    };
    let (page, token) = if limit > 0 && items.len() > limit {
        let mut page = items;
        let rest = page.split_off(limit);
        let remaining = rest.len();
        (page, Some((store.save_snapshot(rest, list_rv), remaining)))
    } else {
        (items, None)
    };
    drop(store);
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let Some((token, remaining)) = token {
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(remaining);
    }
    let items: Vec<Value> = page.into_iter().map(|o| served(target.kind, o)).collect();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", target.kind.kind),
            "apiVersion": target.kind.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    )
}

/// A watch's parameters, checked before the 200 goes out.
struct WatchSpec {
    target: Target,
    fields: FieldSelector,
    labels: LabelSelector,
    /// `None`: start with the current objects as ADDED (no or `0` resourceVersion).
    from: Option<u64>,
    timeout: Duration,
    bookmarks: bool,
}

fn watch_response(
    shared: Arc<Shared>,
    target: Target,
    fields: FieldSelector,
    labels: LabelSelector,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return bad_request(&format!("invalid resource version: {rv:?}")),
        },
    };
    let timeout = match query.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None => shared.config.watch_timeout,
        Some(Ok(secs)) => Duration::from_secs(secs),
        Some(Err(_)) => return bad_request("timeoutSeconds must be a non-negative integer"),
    };
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let spec = WatchSpec {
        target,
        fields,
        labels,
        from,
        timeout,
        bookmarks,
    };
    let (sender, body) = Channel::<Bytes, Infallible>::new(16);
    let task = tokio::spawn(run_watch(shared.clone(), spec, sender));
    shared.track_watch(task.abort_handle());
    let mut response = Response::new(body.boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

type Sender = http_body_util::channel::Sender<Bytes, Infallible>;

async fn send(sender: &mut Sender, event_type: &str, object: &Value) -> bool {
    let line = format!("{}\n", json!({"type": event_type, "object": object}));
    // Bounded: a client that stops reading ends its watch instead of stalling the server.
    matches!(
        tokio::time::timeout(Duration::from_secs(10), sender.send_data(Bytes::from(line))).await,
        Ok(Ok(()))
    )
}

async fn expired(sender: &mut Sender, requested: u64, oldest: u64) {
    let message = format!("too old resource version: {requested} ({oldest})");
    send(
        sender,
        "ERROR",
        &status(StatusCode::GONE, "Expired", &message),
    )
    .await;
}

/// The watch event (if any) one change makes for a watcher whose selectors decide what it sees.
fn event_for(spec: &WatchSpec, change: Change) -> Option<(&'static str, Value)> {
    let scope = |o: &Value| in_scope(&spec.target, &spec.fields, &spec.labels, o);
    let was = change.old.as_ref().is_some_and(scope);
    let kind = spec.target.kind;
    match (was, change.new) {
        (false, Some(new)) if scope(&new) => Some(("ADDED", served(kind, new))),
        (true, Some(new)) if scope(&new) => Some(("MODIFIED", served(kind, new))),
        // Stopped matching: DELETED with the previous state at the change's resourceVersion.
        (true, _) => change.old.map(|mut old| {
            old["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            ("DELETED", served(kind, old))
        }),
        _ => None,
    }
}

/// What a watch does next, decided under the store's lock.
enum Step {
    Send(Vec<Change>),
    End,
    Expired(u64, u64),
}

async fn run_watch(shared: Arc<Shared>, spec: WatchSpec, mut sender: Sender) {
    let kind = spec.target.kind;
    let start = Instant::now();
    let deadline = start + spec.timeout;
    // The apiserver's last bookmark comes shortly before the deadline (2 s, less for short watches).
    let last_bookmark_at = deadline - (spec.timeout / 2).min(Duration::from_secs(2));
    let interval = shared
        .config
        .bookmark_interval
        .max(Duration::from_millis(10));
    let mut next_bookmark = start + interval;
    let mut last_bookmark_sent = false;
    let mut notified = shared.notify.subscribe();
    let drop_epoch = shared.drop_epoch.load(Ordering::SeqCst);
    let expire_epoch = shared.expire_epoch.load(Ordering::SeqCst);

    let (mut cursor, initial) = {
        let store = shared.lock();
        match spec.from {
            None => {
                let objects = store.objects(kind, spec.target.namespace.as_deref());
                (store.resource_version(), objects)
            }
            Some(rv) => (rv, Vec::new()),
        }
    };
    for object in initial {
        if in_scope(&spec.target, &spec.fields, &spec.labels, &object)
            && !send(&mut sender, "ADDED", &served(kind, object)).await
        {
            return;
        }
    }
    loop {
        let step = {
            let store = shared.lock();
            if shared.expire_epoch.load(Ordering::SeqCst) != expire_epoch {
                Step::Expired(cursor, store.floor())
            } else if shared.drop_epoch.load(Ordering::SeqCst) != drop_epoch
                || (kind.custom && !store.istio_installed)
            {
                Step::End
            } else {
                match store.changes_since(kind, cursor) {
                    Ok(changes) => {
                        cursor = cursor.max(store.resource_version());
                        Step::Send(changes)
                    }
                    Err(gone) => Step::Expired(gone.requested, gone.oldest),
                }
            }
        };
        let changes = match step {
            Step::Send(changes) => changes,
            Step::End => return,
            Step::Expired(requested, oldest) => {
                expired(&mut sender, requested, oldest).await;
                return;
            }
        };
        for change in changes {
            if let Some((event_type, object)) = event_for(&spec, change)
                && !send(&mut sender, event_type, &object).await
            {
                return;
            }
        }
        let bookmark = json!({
            "kind": kind.kind, "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": cursor.to_string()},
        });
        tokio::select! {
            changed = notified.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(next_bookmark), if spec.bookmarks => {
                next_bookmark += interval;
                if !send(&mut sender, "BOOKMARK", &bookmark).await {
                    return;
                }
            }
            () = tokio::time::sleep_until(last_bookmark_at), if spec.bookmarks && !last_bookmark_sent => {
                last_bookmark_sent = true;
                if !send(&mut sender, "BOOKMARK", &bookmark).await {
                    return;
                }
            }
            () = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// `?&a=b&c=d%3De` as kube writes it: empty pairs skipped, `%XX` and `+` decoded.
fn parse_query(query: &str) -> Result<HashMap<String, String>, String> {
    let mut pairs = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        pairs.insert(decode(key)?, decode(value)?);
    }
    Ok(pairs)
}

fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad escape in {text:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("not UTF-8: {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_as_kube_writes_them() {
        let q = parse_query("&fieldSelector=spec.nodeName%3Dn1&limit=500&x").expect("parse");
        assert_eq!(q["fieldSelector"], "spec.nodeName=n1");
        assert_eq!(q["limit"], "500");
        assert_eq!(q["x"], "");
        assert_eq!(
            parse_query("labelSelector=a+in+%28b%29").expect("parse")["labelSelector"],
            "a in (b)"
        );
        assert!(parse_query("a=%zz").is_err());
        assert!(parse_query("a=%4").is_err());
        assert!(parse_query("a=%ff").is_err());
    }

    #[test]
    fn routes() {
        let t = route("/api/v1/namespaces/shop/pods").expect("route");
        assert_eq!(
            (t.kind.kind, t.namespace.as_deref(), t.name),
            ("Pod", Some("shop"), None)
        );
        let t = route("/api/v1/namespaces/shop").expect("route");
        assert_eq!(
            (t.kind.kind, t.name.as_deref()),
            ("Namespace", Some("shop"))
        );
        let t = route("/apis/security.istio.io/v1beta1/authorizationpolicies").expect("route");
        assert_eq!(t.kind.api_version(), "security.istio.io/v1beta1");
        assert!(route("/api/v1/namespaces/shop/namespaces").is_none());
        assert!(route("/apis/apps/v1/deployments").is_none());
        assert!(route("/").is_none());
    }
}
