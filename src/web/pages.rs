//! The two pages and their assets, embedded in the binary (no CDN, nothing fetched at run
//! time). The server fills in only the worker id and the task id, HTML-escaped; the scripts
//! draw everything else from the JSON API and the event streams, putting task text in the
//! page with `textContent` only. A Content-Security-Policy forbids inline and foreign scripts.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{Web, escape};

const INDEX_HTML: &str = include_str!("assets/index.html");
const TASK_HTML: &str = include_str!("assets/task.html");
/// The bar at the top of both pages.
const HEADER_HTML: &str = include_str!("assets/header.html");

/// (name, content type, content) of each asset under `/assets/`.
const ASSETS: [(&str, &str, &str); 5] = [
    ("style.css", "text/css; charset=utf-8", include_str!("assets/style.css")),
    ("common.js", "text/javascript; charset=utf-8", include_str!("assets/common.js")),
    ("list.js", "text/javascript; charset=utf-8", include_str!("assets/list.js")),
    ("task.js", "text/javascript; charset=utf-8", include_str!("assets/task.js")),
    ("cache.js", "text/javascript; charset=utf-8", include_str!("assets/cache.js")),
];

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn html(status: StatusCode, body: String) -> Response {
    let mut resp = (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn fill(template: &str, worker_id: &str, task_id: &str) -> String {
    template
        .replace("{{header}}\n", HEADER_HTML)
        .replace("{{version}}", env!("CARGO_PKG_VERSION"))
        .replace("{{worker_id}}", &escape(worker_id))
        .replace("{{task_id}}", &escape(task_id))
}

/// `/`: the task list.
pub async fn index(State(web): State<Web>) -> Response {
    html(StatusCode::OK, fill(INDEX_HTML, web.inner.manager.worker_id(), ""))
}

/// `/task/<id>`: one task (404 with the same page when the worker does not know it).
pub async fn task(State(web): State<Web>, Path(task_id): Path<String>) -> Response {
    let m = &web.inner.manager;
    let status = if m.status(&task_id).is_ok() { StatusCode::OK } else { StatusCode::NOT_FOUND };
    html(status, fill(TASK_HTML, m.worker_id(), &task_id))
}

/// `/assets/<name>`.
pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_escaped_in_pages() {
        let page = fill(TASK_HTML, "w<1>", "job/<img src=x onerror=alert(1)>\"'");
        assert!(!page.contains("<img"), "{page}");
        assert!(page.contains("job/&lt;img src=x onerror=alert(1)&gt;&quot;&#39;"), "{page}");
        assert!(!page.contains("{{"), "a placeholder was left: {page}");
        assert!(!fill(INDEX_HTML, "w", "").contains("{{"));
    }

    #[test]
    fn pages_have_no_inline_script() {
        for page in [INDEX_HTML, TASK_HTML] {
            for (i, _) in page.match_indices("<script") {
                let tag = &page[i..page[i..].find('>').map(|e| i + e).unwrap_or(page.len())];
                assert!(tag.contains("src="), "inline script in a page: {tag}");
            }
            assert!(!page.contains(" on") || !page.contains("onclick="), "inline handler");
            assert!(!page.contains("style=\""), "inline style (the CSP forbids it)");
        }
    }
}
