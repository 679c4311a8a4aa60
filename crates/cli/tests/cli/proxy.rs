//! The HTTP/1.1 proxy path byte for byte: a scripted upstream (framings, interim answers,
//! hang-ups, hop-by-hop headers) and a raw TLS client (spoofed headers, pipelining, bodies
//! small and large, connection close, garbage).

use portcullis_testkit::{require_tool, run, temp_dir};

use crate::serve::{Server, pki, python_server};

#[test]
fn the_http1_path_relays_every_framing_pools_upstreams_and_hands_over_the_rest() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts");
    let upstream = scripts.join("raw_upstream.py");
    let (_upstream, port) = python_server(&python, &[upstream.to_str().unwrap()], d);
    let config = format!(
        r#"
[admin]
address = "127.0.0.1:0"

[[listener]]
address = "127.0.0.1:0"

[[domain]]
hostname = "a.test"
certificate = "auto"
[domain.mtls]
mode = "required"
truststore = "trust-a.pem"
[[domain.mapping]]
base_path = "/raw"
upstream = "http://127.0.0.1:{port}"
[[domain.mapping]]
upstream = "builtin:echo"
"#
    );
    let s = Server::start(d, &config);
    let r = run(
        &python,
        &[
            scripts.join("raw_client.py").to_str().unwrap(),
            &s.port.to_string(),
        ],
        d,
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("ALL OK"), "{}", r.stdout);
}
