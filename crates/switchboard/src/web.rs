//! The web client, embedded at compile time so the binary is all an
//! operator needs. `build.rs` lists every file under `web/` (so whatever the
//! client adds is served without touching this crate) with its content type.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));

/// Shown only if the binary was built without `web/index.html`.
const NO_CLIENT: &str = "<!doctype html><title>Switchboard</title>\
    <p>This build of Switchboard has no web client (web/index.html was missing).</p>";

fn find(path: &str) -> Option<(&'static str, &'static [u8])> {
    ASSETS
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, ctype, body)| (*ctype, *body))
}

/// The call page (`/` and `/r/<room>`); its script reads the room from the path.
pub(crate) fn page() -> Response {
    let body = find("index.html").map_or(NO_CLIENT.as_bytes(), |(_, b)| b);
    respond("text/html; charset=utf-8", body)
}

/// Any other embedded file by its path below `web/`. Lookup is by exact
/// name in a fixed table, so `..` or encoded tricks simply find nothing.
pub(crate) fn asset(path: &str) -> Response {
    match find(path) {
        Some((ctype, body)) => respond(ctype, body),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

fn respond(ctype: &'static str, body: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, ctype),
            // The client is small and changes with every release; always
            // revalidate rather than run a stale script against a new server.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_web_file_is_embedded_with_a_type() {
        // The client as it is on disk now: each regular file must be in the table.
        let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");
        let Ok(entries) = std::fs::read_dir(&web) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_file() && !name.starts_with('.') {
                assert!(find(&name).is_some(), "{name} is not embedded");
            }
        }
        assert_eq!(
            find("app.js").map(|(t, _)| t),
            Some("text/javascript; charset=utf-8")
        );
        assert!(find("../Cargo.toml").is_none());
    }
}
