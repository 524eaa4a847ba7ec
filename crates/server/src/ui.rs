//! The web UI: the files of web/ embedded in the binary (`cargo build`
//! alone makes a working UI; there is no build step), served at `/` and
//! `/ui/NAME` under a strict Content-Security-Policy: scripts and styles
//! from this origin only, none inline, no frames, no other origin.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The UI's own policy (the API's is stricter still: `default-src 'none'`).
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Every file the UI has: name, media type, bytes.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../../web/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../web/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../web/app.css"),
    ),
    (
        "cssom-shim.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../web/cssom-shim.js"),
    ),
    // from npm at the versions web/package-lock.json pins, loaded by the
    // session page only; their licences beside them
    (
        "vendor/xterm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../web/vendor/xterm.js"),
    ),
    (
        "vendor/xterm.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../web/vendor/xterm.css"),
    ),
    (
        "vendor/addon-fit.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../web/vendor/addon-fit.js"),
    ),
    (
        "vendor/LICENSE.xterm",
        "text/plain; charset=utf-8",
        include_bytes!("../../../web/vendor/LICENSE.xterm"),
    ),
    (
        "vendor/LICENSE.addon-fit",
        "text/plain; charset=utf-8",
        include_bytes!("../../../web/vendor/LICENSE.addon-fit"),
    ),
];

fn file(name: &str) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, ty, body)) => {
            let mut r = (*body).into_response();
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ty));
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            );
            // the UI changes with the binary: revalidate, never cache stale
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        None => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    }
}

/// `GET /`: the UI's page.
pub async fn index() -> Response {
    file("index.html")
}

/// `GET /ui/NAME`: one of its files.
pub async fn asset(Path(name): Path<String>) -> Response {
    file(&name)
}
