//! `GET /admin/ui`: the console. One static page (`ui.html`: plain HTML, CSS and JavaScript,
//! no build step, no framework) that calls the admin API from the browser with the
//! credentials it was opened with: keys and teams with each window's limit, spend and
//! remaining; making, rotating and revoking keys; spend per day as a chart. It renders every
//! value as text (never as markup), and its content security policy lets it reach nothing but
//! this listener.

use http::StatusCode;

use super::Answer;

const PAGE: &str = include_str!("ui.html");

/// Inline script and style are the page's own; it fetches only from where it came from, and
/// no other page may frame it.
const HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("cache-control", "no-store"),
    ("referrer-policy", "no-referrer"),
];

pub(super) fn page() -> Answer {
    Answer {
        status: StatusCode::OK,
        content_type: "text/html; charset=utf-8",
        body: PAGE.as_bytes().to_vec(),
        headers: HEADERS,
    }
}
