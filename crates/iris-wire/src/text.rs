//! Text a service sends back to its caller: values echoed in errors, kept short, and text put
//! in HTML pages, escaped. The worker's and the controller's answers both need them.

/// How much of a value an error message echoes.
const ECHO_LEN: usize = 64;

/// `s`, cut to `ECHO_LEN` (64) characters with a mark when longer: errors echo what the request
/// said without carrying megabytes of it back.
pub fn short(s: &str) -> String {
    match s.char_indices().nth(ECHO_LEN) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Escapes text for HTML (element content and quoted attribute values).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn html_is_escaped() {
        assert_eq!(
            super::escape("<script>alert('1')</script>&"),
            "&lt;script&gt;alert(&#39;1&#39;)&lt;/script&gt;&amp;"
        );
    }
}
