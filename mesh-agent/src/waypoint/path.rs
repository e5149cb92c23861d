//! The request path as the waypoint's policy and routes see it: dot segments removed (RFC 3986
//! section 5.2.4), as Istio's default path normalization does.

/// `path` without `.` and `..` segments; `..` never climbs above the root.
pub fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (index, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {
                // A trailing `.` leaves the directory: `/a/.` is `/a/`.
                if index == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if index == last {
                    out.push("");
                }
            }
            other => out.push(other),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_go() {
        for (path, normalized) in [
            ("/a/b", "/a/b"),
            ("/public/../admin", "/admin"),
            ("/a/./b", "/a/b"),
            ("/../../etc", "/etc"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a//b", "/a//b"),
            ("/", "/"),
            ("/..", "/"),
        ] {
            assert_eq!(remove_dot_segments(path), normalized, "{path}");
        }
    }
}
