//! The web UI in a real browser: crates/cli/tests/web/ui.mjs (Playwright
//! from npm, Debian's Chromium) against the server on loopback: sign in,
//! validation beside the fields, a job's live log, its patch, apply,
//! cancel, the status filter, phone width, sign out, and HTML and script
//! injected through output, a file name and a prompt showing as text.

use super::*;

/// Where scripts/install-test-tools.sh puts playwright-core.
const PLAYWRIGHT: &str = "/opt/agentvm-web-tests/node_modules";
const CHROMIUM: &str = "/usr/bin/chromium";

#[test]
fn the_web_ui_runs_a_job_in_a_real_browser() {
    let have = Path::new(PLAYWRIGHT).join("playwright-core").is_dir()
        && Path::new(CHROMIUM).exists()
        && sh(Path::new("/"), "command -v node").status.success();
    if !have {
        skip(
            "the web UI in a real browser (Playwright and Chromium)",
            "apt-get install chromium nodejs and npm install playwright-core into /opt/agentvm-web-tests (scripts/install-test-tools.sh does)",
        );
        return;
    }
    let (t, repo, s) = setup(&[]);
    // ESM finds packages by walking up from the script: run a copy beside
    // a link to the installed node_modules
    let run = t.path().join("web-test");
    std::fs::create_dir(&run).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web/ui.mjs");
    std::fs::copy(&src, run.join("ui.mjs")).unwrap();
    std::os::unix::fs::symlink(PLAYWRIGHT, run.join("node_modules")).unwrap();
    // AGENTVM_SCREENSHOTS=docs/screenshots refreshes the README's pictures
    let shots = std::env::var("AGENTVM_SCREENSHOTS").unwrap_or_default();
    let o = std::process::Command::new("node")
        .arg(run.join("ui.mjs"))
        .env("AGENTVM_URL", &s.url)
        .env("AGENTVM_KEY", &s.key)
        .env("AGENTVM_REPO", &repo)
        .env("CHROMIUM", CHROMIUM)
        .env("SHOTS", &shots)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("step: all passed"),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // the page and its files carry the UI's policy
    let (code, h, body) = s.req("GET", "/", None, None);
    assert_eq!(code, 200);
    let csp = h
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        csp.contains("script-src 'self'")
            && csp.contains("frame-ancestors 'none'")
            && !csp.contains("unsafe"),
        "{csp}"
    );
    assert!(
        body.contains("/ui/app.js") && !body.contains("<script>"),
        "an inline script: {body}"
    );
    assert_eq!(s.req("GET", "/ui/nothing.js", None, None).0, 404);
}

/// The browser libraries in web/vendor are the npm packages
/// web/package-lock.json pins, byte for byte: `npm ci` of the lockfile
/// into a scratch directory gives the same files.
#[test]
fn vendored_browser_libraries_are_what_the_lockfile_pins() {
    if !sh(Path::new("/"), "command -v npm").status.success() {
        skip(
            "the vendored browser libraries against web/package-lock.json",
            "apt-get install npm (scripts/install-test-tools.sh does)",
        );
        return;
    }
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");
    let t = tempdir();
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(web.join(f), t.path().join(f)).unwrap();
    }
    let o = sh(
        t.path(),
        "npm ci --ignore-scripts --no-audit --no-fund --silent",
    );
    assert!(o.status.success(), "npm ci: {o:?}");
    let m = t.path().join("node_modules/@xterm");
    for (vendored, from) in [
        ("xterm.js", "xterm/lib/xterm.js"),
        ("xterm.css", "xterm/css/xterm.css"),
        ("addon-fit.js", "addon-fit/lib/addon-fit.js"),
        ("LICENSE.xterm", "xterm/LICENSE"),
        ("LICENSE.addon-fit", "addon-fit/LICENSE"),
    ] {
        let a = std::fs::read(web.join("vendor").join(vendored)).unwrap();
        let b = std::fs::read(m.join(from)).unwrap();
        assert!(
            a == b,
            "web/vendor/{vendored} is not {from} of the lockfile's package"
        );
    }
    // and nothing else is vendored
    let mut names: Vec<String> = std::fs::read_dir(web.join("vendor"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "LICENSE.addon-fit",
            "LICENSE.xterm",
            "addon-fit.js",
            "xterm.css",
            "xterm.js"
        ]
    );
}
