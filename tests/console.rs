//! The console (`/admin/ui`) in a real browser: Debian's headless Chromium, driven over the
//! WebDriver protocol (its chromedriver, spoken to as plain HTTP on loopback). The page asks
//! for the admin token; it lists keys and teams with each window, makes a key (its secret
//! shown once, and working), shows spend per day as a chart, and revokes the key (refused
//! from then on). A screenshot is kept as evidence. scripts/test installs the browser.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::billing::*;
use common::{config_file, start_mock, Driver, Launch, MockOptions, CHAT};
use serde_json::{json, Value};

on_both_drivers!(
    the_console_makes_lists_and_revokes_a_key_in_a_real_browser,
    a_browsers_stored_credentials_cannot_change_anything_for_another_site,
);

const ADMIN: &str = "admin-token-console-0001";
const CONFIGURED: &str = "sk-aura-console-config-01";
const BODY: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;

/// chromedriver on a free loopback port, killed on drop.
struct ChromeDriver {
    child: Child,
    addr: SocketAddr,
}

impl ChromeDriver {
    fn start() -> ChromeDriver {
        for needed in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
            assert!(
                std::path::Path::new(needed).exists(),
                "{needed} is missing: run scripts/test (it installs Debian's chromium and chromium-driver)"
            );
        }
        let port = common::dead_port();
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let driver = ChromeDriver { child, addr };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::park_timeout(Duration::from_millis(50));
        }
        driver
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let r = common::request(
            self.addr,
            method,
            path,
            &[("content-type", "application/json")],
            body.as_bytes(),
        );
        let answer: Value = serde_json::from_str(&r.text()).unwrap_or(Value::Null);
        assert_eq!(r.status, 200, "{method} {path}: {answer}");
        answer["value"].clone()
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A browser session.
struct Browser<'d> {
    driver: &'d ChromeDriver,
    session: String,
}

impl<'d> Browser<'d> {
    fn open(driver: &'d ChromeDriver, profile: &std::path::Path) -> Browser<'d> {
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,1000", "--no-proxy-server",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let session = driver.call("POST", "/session", capabilities);
        let session = session["sessionId"].as_str().unwrap().to_string();
        Browser { driver, session }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.driver.call(method, &path, body)
    }

    /// Every request the page makes carries this header (Chrome's DevTools protocol).
    fn send_header(&self, name: &str, value: &str) {
        self.call(
            "POST",
            "/goog/cdp/execute",
            json!({"cmd": "Network.enable", "params": {}}),
        );
        let headers = json!({ name: value });
        self.call(
            "POST",
            "/goog/cdp/execute",
            json!({"cmd": "Network.setExtraHTTPHeaders", "params": {"headers": headers}}),
        );
    }

    fn script(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
    }

    /// Polls `script` until it answers something other than null or false.
    fn until(&self, what: &str, script: &str, args: Value) -> Value {
        common::poll(what, Duration::from_secs(15), || {
            let got = self.script(script, args.clone());
            if got.is_null() || got == json!(false) {
                Err(got.to_string())
            } else {
                Ok(got)
            }
        })
    }

    fn element(&self, css: &str) -> String {
        let found = self.call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            json!({"text": text}),
        );
    }

    fn click(&self, css: &str) {
        let id = self.element(css);
        self.call("POST", &format!("/element/{id}/click"), json!({}));
    }

    fn screenshot(&self, path: &std::path::Path) -> usize {
        let png = self.call("GET", "/screenshot", Value::Null);
        let png = aura::auth::base64_decode(png.as_str().unwrap()).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::write(path, &png).unwrap();
        png.len()
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let path = format!("/session/{}", self.session);
        let _ = common::request(self.driver.addr, "DELETE", &path, &[], b"");
    }
}

fn the_console_makes_lists_and_revokes_a_key_in_a_real_browser(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let control: SocketAddr = format!("127.0.0.1:{}", common::dead_port())
        .parse()
        .unwrap();
    let text = format!(
        r#"
key_mode = "virtual"
admin_token = "{ADMIN}"
admin_listen = "{control}"

[teams.research]
budgets = [{{ period = "daily", limit_dollars = 5.0 }}, {{ period = "monthly", limit_dollars = 100.0 }}]
rpm = 600

[keys.configured]
key = "{CONFIGURED}"
team = "research"

[[upstreams]]
name = "mock"
url = "{}"
models = ["gpt-4o-mini"]
key = "sk-provider-console"
"#,
        mock.url()
    );
    let path = config_file(&format!("console-{driver:?}"), &text);
    let aura = Launch::new("", driver)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .start();
    for _ in 0..3 {
        assert_eq!(post(&aura, CONFIGURED, CHAT, &[], BODY), 200);
    }
    // Without the token the page is refused, and a browser is asked for it.
    let refused = common::request(control, "GET", "/admin/ui", &[], b"");
    assert_eq!(refused.status, 401);
    assert!(refused
        .header("www-authenticate")
        .is_some_and(|v| v.starts_with("Basic")));
    let chromedriver = ChromeDriver::start();
    let profile = std::env::temp_dir().join(format!(
        "aura-console-profile-{}-{driver:?}",
        std::process::id()
    ));
    let browser = Browser::open(&chromedriver, &profile);
    // Logged in as a browser is once it asked: Basic credentials, the token as the password
    // (so every change the page makes goes through the checks a browser's calls get).
    let basic = format!("Basic {}", base64(format!("admin:{ADMIN}").as_bytes()));
    browser.send_header("Authorization", &basic);
    browser.call(
        "POST",
        "/url",
        json!({"url": format!("http://{control}/admin/ui")}),
    );
    browser.until(
        "the page loaded its data",
        "return document.body.dataset.loaded || null",
        json!([]),
    );
    // The config's key and the team, each window shown; the chart has 30 days.
    let listed = browser.script(
        "return [...document.querySelectorAll('#keys tr')].map(r => r.dataset.alias)",
        json!([]),
    );
    assert_eq!(listed, json!(["configured"]));
    let team = browser.script(
        "return document.querySelector('#teams tr[data-team=research]').textContent",
        json!([]),
    );
    let team = team.as_str().unwrap();
    assert!(
        team.contains("daily") && team.contains("monthly") && team.contains("600 rpm"),
        "{team}"
    );
    let bars = browser.script(
        "return document.querySelectorAll('#chart rect').length",
        json!([]),
    );
    assert_eq!(bars, json!(30));
    // Make a key in the team, with a daily budget.
    browser.type_into("#new-alias", "console-made");
    browser.type_into("#new-daily", "2.5");
    browser.script(
        "document.getElementById('new-team').value = arguments[0]",
        json!(["research"]),
    );
    browser.click("#create");
    let secret = browser.until(
        "the new key's secret",
        "const s = document.getElementById('secret-value').textContent; return s.startsWith('sk-aura-') ? s : null",
        json!([]),
    );
    let secret = secret.as_str().unwrap().to_string();
    let row = browser.until(
        "the new key listed",
        "const r = document.querySelector('#keys tr[data-alias=\"console-made\"]'); return r ? r.textContent : null",
        json!([]),
    );
    let row = row.as_str().unwrap();
    assert!(
        row.contains("admin") && row.contains("research") && row.contains("daily"),
        "{row}"
    );
    assert_eq!(
        post(&aura, &secret, CHAT, &[], BODY),
        200,
        "the console's key works"
    );
    let auth = bearer(ADMIN);
    let made = common::request(
        control,
        "GET",
        "/admin/keys/console-made",
        &[("authorization", &auth)],
        b"",
    );
    assert_eq!(made.json()["team"], "research", "{}", made.text());
    // Rotate it: a new secret shown, which works; the old one too, in its hour of grace.
    browser.click("#keys tr[data-alias=\"console-made\"] button.rotate");
    let rotated = browser.until(
        "the rotated secret",
        "const s = document.getElementById('secret-value').textContent; return s !== arguments[0] && s.startsWith('sk-aura-') ? s : null",
        json!([secret]),
    );
    let rotated = rotated.as_str().unwrap().to_string();
    assert_eq!(
        post(&aura, &rotated, CHAT, &[], BODY),
        200,
        "the rotated secret works"
    );
    assert_eq!(
        post(&aura, &secret, CHAT, &[], BODY),
        200,
        "the old one, in its grace"
    );
    let evidence =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("console-{driver:?}.png"));
    let bytes = browser.screenshot(&evidence);
    println!("console screenshot: {} ({bytes} bytes)", evidence.display());
    assert!(bytes > 10_000, "a {bytes}-byte screenshot");
    // Revoke it: two clicks (the first arms the button).
    let revoke = "#keys tr[data-alias=\"console-made\"] button.revoke";
    browser.click(revoke);
    browser.click(revoke);
    browser.until(
        "the key gone from the list",
        "return !document.querySelector('#keys tr[data-alias=\"console-made\"]')",
        json!([]),
    );
    assert_eq!(post(&aura, &rotated, CHAT, &[], BODY), 401, "a revoked key");
    let status = browser.script(
        "return document.getElementById('status').textContent",
        json!([]),
    );
    assert!(
        status.as_str().unwrap().contains("Revoked console-made"),
        "{status}"
    );
    drop(browser);
    let _ = std::fs::remove_dir_all(&profile);
}

/// Review: once the console was opened, the browser kept the token (Basic) and sent it with any
/// site's form. A change by Basic credentials now needs the console's own header (which no
/// other site can set) and no other site's origin, and a JSON content type; a bearer token
/// (never sent by a browser on its own) needs neither.
fn a_browsers_stored_credentials_cannot_change_anything_for_another_site(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let path = config_file(
        &format!("console-csrf-{driver:?}"),
        &format!("admin_token = \"{ADMIN}\"\n[keys.configured]\nkey = \"{CONFIGURED}\"\n"),
    );
    let aura = Launch::new(&mock.url(), driver)
        .arg("--config")
        .arg(path.to_str().unwrap())
        .start();
    assert_eq!(post(&aura, CONFIGURED, CHAT, &[], BODY), 200);
    let spent = common::poll(
        "the spend in the store",
        Duration::from_secs(10),
        || match nano(&usage_of(&aura, CONFIGURED)["usage_dollars"]) {
            0 => Err("none".into()),
            spent => Ok(spent),
        },
    );
    // "admin:<token>", as a browser sends it.
    let basic = format!("Basic {}", base64(format!("admin:{ADMIN}").as_bytes()));
    let reset = "/admin/keys/configured/reset";
    let call = |headers: &[(&str, &str)], body: &str| {
        let mut all = vec![("authorization", basic.as_str())];
        all.extend_from_slice(headers);
        aura.client()
            .request("POST", reset, &all, body.as_bytes())
            .status
    };
    // A form from another site: no console header; or the header but another site's fetch.
    assert_eq!(call(&[], ""), 403);
    assert_eq!(
        call(
            &[("x-aura-console", "1"), ("sec-fetch-site", "cross-site")],
            ""
        ),
        403
    );
    // A text/plain body that reads as JSON is no admin call.
    assert_eq!(
        call(
            &[("x-aura-console", "1"), ("content-type", "text/plain")],
            "{}"
        ),
        400
    );
    assert_eq!(
        nano(&usage_of(&aura, CONFIGURED)["usage_dollars"]),
        spent,
        "nothing was reset"
    );
    // Reads need no header; the console's own call, and a bearer token, change things.
    let r = aura.client().request(
        "GET",
        "/admin/keys",
        &[("authorization", basic.as_str())],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        call(
            &[("x-aura-console", "1"), ("sec-fetch-site", "same-origin")],
            ""
        ),
        200
    );
    let (status, _) = admin_json(&aura, ADMIN, "POST", reset, "");
    assert_eq!(status, 200);
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
