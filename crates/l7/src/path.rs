//! The one normalisation of a request target. The proxy matches rules
//! against the normalised path and forwards that same path upstream, so a
//! request cannot be judged in one spelling and served in another.
//!
//! Steps, in order (RFC 3986 section 6.2.2):
//! 1. refuse what has no single meaning: an encoded `/` (`%2F`), `\`
//!    (`%5C`), NUL or other control character, a raw `\`, control
//!    character, space or non-ASCII byte, a `%` not followed by two hex
//!    digits;
//! 2. decode percent-encoded unreserved characters (`%7E` -> `~`, `%2e` ->
//!    `.`), upper-case the hex of the others (`%3b` -> `%3B`), and encode the
//!    few printable characters a path may not hold raw (`|` -> `%7C`);
//! 3. merge runs of `/`: servers that merge them before resolving `..`
//!    (nginx) would otherwise serve `/a//../b` as `/b` where RFC 3986 gives
//!    `/a/b`;
//! 4. remove dot segments (RFC 3986 section 5.2.4), and refuse `..;x` and
//!    `.;x` segments, which servlet containers read as `..` and `.`.
//!
//! The query is kept as it is and never matched.

use std::fmt;

/// Why a target was refused. Each is a request the proxy answers with 400.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with /")]
    NotAbsolute,
    #[error("an encoded slash (%2F) in the path is ambiguous; send / or leave it out")]
    EncodedSlash,
    #[error("an encoded backslash (%5C) in the path is ambiguous")]
    EncodedBackslash,
    #[error("an encoded NUL (%00) in the path")]
    EncodedNul,
    #[error("an encoded control character (%{0:02X}) in the path")]
    EncodedControl(u8),
    #[error("a backslash in the path is ambiguous; use /")]
    Backslash,
    #[error("a control character (0x{0:02x}) in the target")]
    Control(u8),
    #[error("a space in the target")]
    Space,
    #[error("a non-ASCII byte (0x{0:02x}) in the target; percent-encode it")]
    NonAscii(u8),
    #[error("a % not followed by two hex digits")]
    BadPercent,
    #[error("a {0:?} in the path")]
    Forbidden(char),
    #[error("a dot segment with parameters (.;x or ..;x) is ambiguous")]
    DotParameter,
    #[error("not a request target (origin-form /path, absolute-form http://host/path, or *)")]
    BadTarget,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters a path holds raw (RFC 3986 `pchar` and `/`).
fn is_path_char(b: u8) -> bool {
    is_unreserved(b) || b"!$&'()*+,;=:@/".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_encoded(out: &mut String, b: u8) {
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 15)]));
}

fn check_raw(b: u8) -> Result<(), PathError> {
    match b {
        b'\\' => Err(PathError::Backslash),
        b' ' => Err(PathError::Space),
        0..=0x1f | 0x7f => Err(PathError::Control(b)),
        0x80.. => Err(PathError::NonAscii(b)),
        _ => Ok(()),
    }
}

/// Normalises an absolute path (no query), as described in the module
/// documentation. The result starts with `/`, holds no `.` or `..`
/// segment and no `//`, and normalising it again changes nothing.
pub fn normalize_path(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Steps 1 to 3: one pass that decodes, re-encodes and merges slashes.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadPercent);
            };
            let v = h << 4 | l;
            match v {
                b'/' => return Err(PathError::EncodedSlash),
                b'\\' => return Err(PathError::EncodedBackslash),
                0 => return Err(PathError::EncodedNul),
                1..=0x1f | 0x7f => return Err(PathError::EncodedControl(v)),
                v if is_unreserved(v) => decoded.push(char::from(v)),
                v => push_encoded(&mut decoded, v),
            }
            i += 3;
            continue;
        }
        check_raw(b)?;
        match b {
            b'/' if decoded.ends_with('/') => {}
            b if is_path_char(b) => decoded.push(char::from(b)),
            b'?' | b'#' => return Err(PathError::Forbidden(char::from(b))),
            // `"<>[]^`{|}`: no delimiter role in a path; the encoded form
            // means the same to every server.
            b => push_encoded(&mut decoded, b),
        }
        i += 1;
    }
    // Step 4: RFC 3986 section 5.2.4 on whole segments. Each segment is
    // pushed or popped once, so the cost is linear in the length.
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => {
                if let Some((head, _)) = s.split_once(';') {
                    if head == "." || head == ".." {
                        return Err(PathError::DotParameter);
                    }
                }
                out.push(s);
            }
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if result.is_empty() {
        result.push('/');
    }
    Ok(result)
}

/// A normalised request target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The normalised path, `*` for the asterisk form. What rules match
    /// and what is forwarded.
    pub path: String,
    /// The query without its `?`, unchanged.
    pub query: Option<String>,
    /// The authority of an absolute-form target (`http://host:8080/x`).
    pub authority: Option<String>,
}

impl Target {
    /// The origin-form target to forward: path and query.
    pub fn origin_form(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

/// Normalises a request target (RFC 9112 section 3.2): origin-form
/// (`/path?query`), absolute-form (`http://authority/path?query`) or
/// asterisk-form (`*`). Authority-form (CONNECT) is refused: the proxy
/// never tunnels.
pub fn normalize_target(target: &str) -> Result<Target, PathError> {
    if target == "*" {
        return Ok(Target {
            path: "*".into(),
            query: None,
            authority: None,
        });
    }
    let (authority, rest) = if target.starts_with('/') {
        (None, target)
    } else {
        let lower = target.get(..8).map(str::to_ascii_lowercase).unwrap_or_default();
        let skip = if lower.starts_with("http://") {
            7
        } else if lower.starts_with("https://") {
            8
        } else {
            return Err(PathError::BadTarget);
        };
        let after = &target[skip..];
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let auth = &after[..end];
        if auth.is_empty() {
            return Err(PathError::BadTarget);
        }
        for b in auth.bytes() {
            check_raw(b)?;
            if b == b'@' {
                // userinfo in a request target is deprecated and only
                // ever used to confuse (RFC 9110 section 4.2.4).
                return Err(PathError::BadTarget);
            }
        }
        (Some(auth.to_string()), &after[end..])
    };
    let (raw_path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let path = if raw_path.is_empty() && authority.is_some() {
        "/".to_string()
    } else {
        normalize_path(raw_path)?
    };
    if let Some(q) = query {
        for b in q.bytes() {
            check_raw(b)?;
            if b == b'#' {
                return Err(PathError::Forbidden('#'));
            }
        }
    }
    Ok(Target {
        path,
        query: query.map(str::to_string),
        authority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalize_path(p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    /// RFC 3986 section 5.2.4, the two worked examples (the relative one
    /// made absolute, since request paths are), and section 5.4.1's
    /// normal examples whose reference is a path, resolved against the
    /// base `http://a/b/c/d;p?q` as merge (5.2.3) gives them.
    #[test]
    fn rfc_3986_5_2_4_remove_dot_segments() {
        assert_eq!(n("/a/b/c/./../../g"), "/a/g");
        assert_eq!(n("/mid/content=5/../6"), "/mid/6");
        // 5.4.1: merged base path "/b/c/" + reference.
        for (reference, want) in [
            ("g", "/b/c/g"),
            ("./g", "/b/c/g"),
            ("g/", "/b/c/g/"),
            (".", "/b/c/"),
            ("./", "/b/c/"),
            ("..", "/b/"),
            ("../", "/b/"),
            ("../g", "/b/g"),
            ("../..", "/"),
            ("../../", "/"),
            ("../../g", "/g"),
        ] {
            assert_eq!(n(&format!("/b/c/{reference}")), want, "{reference}");
        }
        // 5.4.2 abnormal examples: more .. than segments, and names that
        // only look like dot segments.
        assert_eq!(n("/b/c/../../../g"), "/g");
        assert_eq!(n("/b/c/../../../../g"), "/g");
        assert_eq!(n("/./g"), "/g");
        assert_eq!(n("/../g"), "/g");
        assert_eq!(n("/b/c/g."), "/b/c/g.");
        assert_eq!(n("/b/c/.g"), "/b/c/.g");
        assert_eq!(n("/b/c/g.."), "/b/c/g..");
        assert_eq!(n("/b/c/..g"), "/b/c/..g");
        assert_eq!(n("/b/c/./../g"), "/b/g");
        assert_eq!(n("/b/c/./g/."), "/b/c/g/");
        assert_eq!(n("/b/c/g/./h"), "/b/c/g/h");
        assert_eq!(n("/b/c/g/../h"), "/b/c/h");
        assert_eq!(n("/b/c/g;x=1/./y"), "/b/c/g;x=1/y");
        assert_eq!(n("/b/c/g;x=1/../y"), "/b/c/y");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/."), "/");
    }

    /// RFC 3986 sections 2.3 and 6.2.2.2: unreserved characters are
    /// decoded, other escapes keep an upper-case hex form.
    #[test]
    fn percent_encoding_is_normalised() {
        assert_eq!(n("/%7Euser/%61%62c"), "/~user/abc");
        assert_eq!(n("/a%2db%5Fc%2E"), "/a-b_c.");
        assert_eq!(n("/a%3bb%3Fc%20d"), "/a%3Bb%3Fc%20d");
        // Encoded dots are dot segments once decoded.
        assert_eq!(n("/public/%2e%2e/admin"), "/admin");
        assert_eq!(normalize_path("/public/%2E%2E%2Fadmin"), Err(PathError::EncodedSlash));
    }

    #[test]
    fn slashes_merge_before_dot_segments() {
        // nginx reads /public//../admin as /admin; so must we.
        assert_eq!(n("/public//../admin"), "/admin");
        assert_eq!(n("//a///b//"), "/a/b/");
    }

    #[test]
    fn ambiguous_forms_are_refused() {
        for (p, want) in [
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%2fb", PathError::EncodedSlash),
            ("/a%5cb", PathError::EncodedBackslash),
            ("/a%00", PathError::EncodedNul),
            ("/a%0A", PathError::EncodedControl(0x0a)),
            ("/a\\b", PathError::Backslash),
            ("/a\0b", PathError::Control(0)),
            ("/a\tb", PathError::Control(9)),
            ("/a b", PathError::Space),
            ("/a\u{e9}", PathError::NonAscii(0xc3)),
            ("/a%2", PathError::BadPercent),
            ("/a%zz", PathError::BadPercent),
            ("/a#b", PathError::Forbidden('#')),
            ("/public/..;/admin", PathError::DotParameter),
            ("/public/%2e%2e;x/admin", PathError::DotParameter),
            ("/public/.;/admin", PathError::DotParameter),
            ("a/b", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
        ] {
            assert_eq!(normalize_path(p), Err(want), "{p:?}");
        }
        // Parameters on ordinary segments are fine.
        assert_eq!(n("/a/..x;y/b;c"), "/a/..x;y/b;c");
    }

    #[test]
    fn unsafe_printables_are_encoded() {
        assert_eq!(n("/a|b{c}"), "/a%7Cb%7Bc%7D");
    }

    #[test]
    fn targets() {
        let t = normalize_target("/a/./b/../c?x=/../y&z=%2F").unwrap();
        assert_eq!(t.path, "/a/c");
        assert_eq!(t.query.as_deref(), Some("x=/../y&z=%2F"));
        assert_eq!(t.origin_form(), "/a/c?x=/../y&z=%2F");
        let t = normalize_target("HTTP://api.example.com:8080/x/../y").unwrap();
        assert_eq!(t.authority.as_deref(), Some("api.example.com:8080"));
        assert_eq!(t.path, "/y");
        assert_eq!(normalize_target("http://h").unwrap().origin_form(), "/");
        assert_eq!(normalize_target("http://h?q").unwrap().origin_form(), "/?q");
        assert_eq!(normalize_target("*").unwrap().path, "*");
        assert_eq!(normalize_target("example.com:443"), Err(PathError::BadTarget));
        assert_eq!(normalize_target("http://u@h/"), Err(PathError::BadTarget));
        assert_eq!(normalize_target("/a?b c"), Err(PathError::Space));
        assert_eq!(normalize_target("/a?b\0"), Err(PathError::Control(0)));
    }

    #[test]
    fn normal_form_is_a_fixed_point() {
        for p in ["/a/../b//c/./%7e%41%3b", "/x/%2e./y", "/..%2e/a", "/a/b/..", "/%2E"] {
            let once = n(p);
            assert_eq!(n(&once), once, "{p}");
        }
    }
}
