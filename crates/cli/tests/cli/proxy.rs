//! The HTTP/1.1 proxy path byte for byte: a scripted upstream (framings, interim answers,
//! hang-ups, hop-by-hop headers) and a raw TLS client (spoofed headers, pipelining, bodies
//! small and large, connection close, garbage).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use portcullis_testkit::{require_tool, run, temp_dir};

use crate::serve::{Server, pki};

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_http1_path_relays_every_framing_pools_upstreams_and_hands_over_the_rest() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts");
    let mut upstream = Command::new(&python)
        .arg(scripts.join("raw_upstream.py"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(upstream.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let _upstream = Killed(upstream);
    let port: u16 = port.trim().parse().expect("the upstream prints its port");
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
