//! Bounds on a state file checked before any parser sees it: its size, and how deeply its
//! YAML or JSON nests. The YAML parser's cost grows about quadratically with nesting (200,000
//! `[` took it 171 s) and its memory with size, so both are refused up front, in one linear pass.

/// Largest state file read (the Kubernetes API server refuses requests over 3 MiB; a `kubectl
/// get -o yaml` List of a large namespace can be bigger, so a few times that).
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// Deepest nesting of mappings and sequences accepted (serde_json's own limit is 128; the
/// deepest Kubernetes object the agent reads nests about 12 levels).
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    #[error("is {size} bytes, over the limit of {MAX_FILE_BYTES} bytes")]
    TooLarge { size: u64 },
    #[error("nests deeper than {MAX_DEPTH} levels (line {line})")]
    TooDeep { line: usize },
}

/// Fails when `text` nests deeper than [`MAX_DEPTH`], counting block collections by their
/// indentation (and `- ` items opened on one line) and flow collections by their brackets.
/// Over-counts rather than under-counts: brackets in block scalars count too.
pub fn check_depth(text: &str) -> Result<(), BoundsError> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for (index, line) in text.lines().enumerate() {
        let too_deep = || BoundsError::TooDeep { line: index + 1 };
        let content = line.trim_start_matches(' ');
        if flow == 0 {
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let indent = line.len() - content.len();
            while indents.last().is_some_and(|&top| top >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let (items, rest) = sequence_items(content);
        let block = indents.len() + items;
        if block + flow > MAX_DEPTH {
            return Err(too_deep());
        }
        flow = scan_flow(rest, flow, block, MAX_DEPTH).ok_or_else(too_deep)?;
    }
    Ok(())
}

/// `- - x` opens two sequence items on one line: their count, and the rest of the line.
fn sequence_items(content: &str) -> (usize, &str) {
    let mut items = 0;
    let mut rest = content;
    while let Some(after) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("-\t")) {
        items += 1;
        rest = after.trim_start();
    }
    (items, rest)
}

/// Follows flow brackets through one line, starting `flow` levels deep under `block` block
/// levels: the flow depth after it, or `None` past `max`. A quote opens a string only where a
/// value starts (the line's start, after `: `, and in flow context after `[`, `{` or `,`);
/// outside flow context a bracket opens a collection only there too, inside it every bracket
/// outside a string counts (flow plain scalars cannot hold them). A `#` after whitespace
/// starts a comment.
fn scan_flow(line: &str, mut flow: usize, block: usize, max: usize) -> Option<usize> {
    let bytes = line.as_bytes();
    let mut quote: Option<u8> = None;
    let mut value_starts = true;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(q) = quote {
            if q == b'"' && b == b'\\' {
                i += 1;
            } else if b == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        let starts_here = value_starts;
        value_starts = false;
        match b {
            b'"' | b'\'' if starts_here => quote = Some(b),
            b'[' | b'{' if flow > 0 || starts_here => {
                flow += 1;
                if block + flow > max {
                    return None;
                }
                value_starts = true;
            }
            b']' | b'}' if flow > 0 => flow -= 1,
            b',' if flow > 0 => value_starts = true,
            b'#' if i == 0 || bytes[i - 1] == b' ' || bytes[i - 1] == b'\t' => break,
            b' ' | b'\t' => value_starts = starts_here || (i > 0 && bytes[i - 1] == b':'),
            _ => {}
        }
        i += 1;
    }
    Some(flow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_objects_pass() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  labels: {app: web, \"x\": '[y'}\nspec:\n  containers:\n  - name: c\n    args: [\"a[b\", '{']\n    command:\n    - sh\n    - -c\n    - echo [unbalanced\n";
        assert_eq!(check_depth(pod), Ok(()));
        let json =
            r#"{"apiVersion": "v1", "kind": "List", "items": [{"metadata": {"name": "a]"}}]}"#;
        assert_eq!(check_depth(json), Ok(()));
    }

    #[test]
    fn deep_flow_nesting_is_refused_with_its_line() {
        let deep = format!("a: 1\nb: {}", "[".repeat(200_000));
        assert_eq!(check_depth(&deep), Err(BoundsError::TooDeep { line: 2 }));
        let json = format!(
            "{}1{}",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert!(check_depth(&json).is_err());
        let fits = format!(
            "{}1{}",
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        assert_eq!(check_depth(&fits), Ok(()));
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let mut text = String::new();
        for level in 0..=MAX_DEPTH {
            text.push_str(&" ".repeat(level));
            text.push_str("k:\n");
        }
        assert!(check_depth(&text).is_err());
        let items = format!("{}x\n", "- ".repeat(MAX_DEPTH + 1));
        assert!(check_depth(&items).is_err());
    }

    #[test]
    fn dedenting_closes_levels() {
        let text = (0..10_000)
            .map(|_| "a:\n  b:\n    c: [1, {d: 2}]\n")
            .collect::<String>();
        assert_eq!(check_depth(&text), Ok(()));
    }

    #[test]
    fn a_quote_inside_a_flow_scalar_hides_no_bracket() {
        let text = format!("a: [x'{}]", "[".repeat(MAX_DEPTH + 1));
        assert!(check_depth(&text).is_err());
    }

    #[test]
    fn brackets_in_plain_scalars_and_comments_do_not_count() {
        let text = (0..1000)
            .map(|_| "regex: a[b{c  # [[[[\n")
            .collect::<String>();
        assert_eq!(check_depth(&text), Ok(()));
    }
}
