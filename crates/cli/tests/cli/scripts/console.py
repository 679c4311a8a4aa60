# Drives the web console in headless Chromium (Playwright, the system's /usr/bin/chromium):
# sign in with a token, issue a certificate, revoke it with confirmation, find the revocation in
# the audit log; hostile names stay text; forged or missing CSRF tokens change nothing; signing
# out ends the session; the signed-out page has no navigation, the navigation is one line at
# 1280 px, a certificate is a readable card, a truststore version lists its certificates, and the
# CA page's proof-of-possession recipes work as printed; the dashboard draws its charts, domains
# are made and edited with a form, truststore bundles are checked before they are saved, the
# chain is drawn; every page has no serious accessibility violation (axe-core) at 1280 px and on
# a phone, and works from the keyboard. Arguments: admin port, token, artifacts directory, the
# portcullis binary, the gateway's port, axe.min.js (empty: the accessibility check is skipped).
import os
import plistlib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile

from playwright.sync_api import expect, sync_playwright

port, token, artifacts, portcullis, gateway_port = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
axe_path = sys.argv[6] if len(sys.argv) > 6 else ""
base = "https://127.0.0.1:%s" % port


def check(cond, what):
    if not cond:
        print("FAILED: " + what, flush=True)
        sys.exit(1)
    print("ok " + what, flush=True)


dialogs = []
with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
    )
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860})
    page = ctx.new_page()
    page.set_default_timeout(20000)

    def on_dialog(d):
        dialogs.append((d.type, d.message))
        d.accept()

    page.on("dialog", on_dialog)

    # Before any script runs, the page already hides the navigation and the sign-out button.
    bare = browser.new_context(ignore_https_errors=True, java_script_enabled=False, viewport={"width": 1280, "height": 800})
    bare_page = bare.new_page()
    bare_page.goto(base + "/ui")
    expect(bare_page.locator("header")).to_be_visible()
    check(not bare_page.locator("#nav").is_visible() and not bare_page.locator("#logout").is_visible()
          and bare_page.locator("#nav a:visible").count() == 0,
          "without its script, the signed-out page shows no navigation")
    bare.close()

    page.goto(base + "/ui")
    expect(page.locator("h1")).to_have_text("Sign in to Portcullis")
    if axe_path:
        page.evaluate(open(axe_path).read() + "\n;0")
        found = page.evaluate("""async () => (await axe.run(document, {resultTypes: ['violations']})).violations
            .filter((v) => v.impact === 'serious' || v.impact === 'critical').map((v) => v.id)""")
        check(not found, "axe-core on the sign-in page: no serious violation %r" % found)

    def signed_out_page_has_no_nav(when):
        expect(page.locator("#nav")).to_be_hidden()
        expect(page.locator("#logout")).to_be_hidden()
        check(page.locator("#nav a:visible").count() == 0 and page.locator("#who").text_content() == "",
              "the signed-out page shows no navigation, name or sign-out button (%s)" % when)

    signed_out_page_has_no_nav("first visit")
    expect(page.locator("#login-hint")).to_contain_text("portcullis admin token create --name NAME")
    check(True, "the sign-in hint gives the real command (--name)")
    page.fill("input[name=token]", "pct_not_a_token")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    check(True, "a wrong token is refused with a clear message")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Dashboard")
    expect(page.locator("#who")).to_have_text("console:console-test")
    cookie = [c for c in ctx.cookies() if c["name"] == "portcullis_console"]
    check(len(cookie) == 1 and cookie[0]["httpOnly"] and cookie[0]["secure"] and cookie[0]["sameSite"] == "Strict",
          "session cookie is Secure, HttpOnly, SameSite=Strict: %r" % cookie)

    # At 1280 px the navigation is one line: every link and the sign-out button on the same row,
    # inside the window, and the header as tall as one line.
    page.set_viewport_size({"width": 1280, "height": 800})
    expect(page.locator("#nav")).to_be_visible()
    items = page.locator("#nav a").all() + [page.locator("#logout")]
    boxes = [i.bounding_box() for i in items]
    middles = [b["y"] + b["height"] / 2 for b in boxes]
    header = page.locator("header").bounding_box()
    check(len(boxes) >= 13 and max(middles) - min(middles) < 4 and header["height"] < 60
          and all(b["x"] >= 0 and b["x"] + b["width"] <= 1280 for b in boxes),
          "the navigation is one line at 1280 px (header %.0f px high, rows %r)" % (header["height"], sorted(set(round(m) for m in middles))))
    page.screenshot(path=artifacts + "/console-nav-1280.png")
    page.set_viewport_size({"width": 1280, "height": 860})

    # Register a CA with proof of possession: the page gives the code and the command.
    page.click("#nav >> text=CAs")
    expect(page.locator("h1")).to_have_text("Certificate authorities")
    code = page.locator("#registration-code").text_content()
    check(code in page.locator("#verification-command").text_content(), "the verification command names the code")
    # Each recipe works as printed, pasted in a shell in an empty directory holding the CA's
    # ca.pem and ca.key, and writes the file the register command names.
    register = page.locator("#register-command").text_content()
    named = re.search(r"--cert (\S+) --verification-cert (\S+)", register)
    check(register.startswith("portcullis ca register ") and named is not None, "the register command: " + register)
    made_by = {}
    for recipe in ["#verification-command", "#verification-openssl"]:
        text = page.locator(recipe).text_content()
        check(code in text, "the recipe %s names the code" % recipe)
        work = tempfile.mkdtemp(prefix="recipe-")
        for f in ["ca.pem", "ca.key"]:
            shutil.copy("rootb/" + f, os.path.join(work, f))
        env = dict(os.environ, PATH=os.path.dirname(os.path.abspath(portcullis)) + os.pathsep + os.environ.get("PATH", ""))
        ran = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=work, env=env, capture_output=True, text=True)
        proof_file = os.path.join(work, named.group(2))
        check(ran.returncode == 0 and os.path.exists(os.path.join(work, named.group(1))) and os.path.exists(proof_file),
              "the recipe %s runs as printed and writes %s: %s" % (recipe, named.group(2), ran.stderr[-400:]))
        made_by[recipe] = open(proof_file).read()
        shutil.rmtree(work)
    made = subprocess.run([portcullis, "pki", "verification-cert", "--ca-cert", "int/ca.pem", "--ca-key", "int/ca.key",
                           "--code", code, "--out", "wrong-proof", "--force"], capture_output=True, text=True)
    check(made.returncode == 0, "a proof signed by another CA's key: " + made.stderr)
    page.fill("textarea[name=certificate_pem]", open("rootb/ca.pem").read())
    page.fill("textarea[name=verification_certificate_pem]", open("wrong-proof/verification.pem").read())
    page.click("text=Register CA")
    expect(page.locator("#ca-error")).to_contain_text("not signed by this CA")
    page.fill("textarea[name=provisioning_template]", "{not json")
    page.click("text=Register CA")
    expect(page.locator("#ca-error")).to_contain_text("not JSON")
    page.fill("textarea[name=provisioning_template]", "")
    # The proof made by the printed OpenSSL recipe is accepted.
    page.fill("textarea[name=verification_certificate_pem]", made_by["#verification-openssl"])
    page.check("input[name=auto_registration]")
    page.click("text=Register CA")
    expect(page.locator("#cas")).to_contain_text("CN=Root B")
    expect(page.locator("#cas tr", has_text="CN=Root B")).to_contain_text("yes")
    check(True, "a wrong proof is refused inline, then the CA is registered with its proof")

    page.click("#nav >> text=Certificates")
    expect(page.locator("h1")).to_have_text("Certificates")
    page.fill("input[name=common_name]", "kiosk-7")
    page.select_option("select[name=status]", "ACTIVE")
    page.click("text=Issue certificate")
    expect(page.locator("#issued")).to_contain_text("CN=kiosk-7")
    hostile = "<img src=x onerror=alert(1)>"
    page.fill("input[name=common_name]", hostile)
    page.click("text=Issue certificate")
    # The subject is shown as RFC 4514 text (`CN=\\<img …\\>`): as text, not as an element.
    expect(page.locator("#issued")).to_contain_text("img src=x onerror=alert(1)")
    page.goto(base + "/ui#/certificates?status=ACTIVE")
    page.reload()
    expect(page.locator("#certificates")).to_contain_text("CN=kiosk-7")
    expect(page.locator("#certificates")).to_contain_text("img src=x onerror=alert(1)")
    check(page.locator("#certificates img").count() == 0, "a certificate field with HTML is shown as text")
    page.screenshot(path=artifacts + "/console-certificates.png", full_page=True)

    page.click("#certificates >> text=CN=kiosk-7")
    expect(page.locator("h1")).to_have_text("CN=kiosk-7")
    kiosk_id = page.url.split("#/certificates/")[1]
    # The chain is drawn from the certificate to its anchor, with the key ids that link them.
    expect(page.locator("#chain li.chain-box").first).to_contain_text("CN=kiosk-7")
    check(page.locator("#chain li.chain-box").count() >= 2 and "subject key id" in page.locator("#chain").text_content()
          and page.locator("#chain li[class^=chain-link]").count() >= 1,
          "the chain is drawn with its links: " + page.locator("#chain").text_content()[:300])
    # The certificate is a readable card of its fields, not a JSON dump (the raw JSON, if any,
    # stays in a closed <details>).
    fields = page.locator("#certificate-fields")
    expect(fields.locator("dt:text-is('Subject') + dd")).to_have_text("CN=kiosk-7")
    for label in ["Status", "Issuer", "Serial", "Not before", "Not after", "Key", "Fingerprint (SHA-256)", "Certificate id"]:
        expect(fields.locator("dt:text-is('%s')" % label)).to_be_visible()
    expect(fields.locator("dt:text-is('Key') + dd")).to_contain_text("bits")
    dumps = page.evaluate("""() => [...document.querySelectorAll('main pre')]
        .filter(p => !p.closest('details:not([open])') && p.textContent.trim().startsWith('{')).length""")
    raw_open = page.evaluate("() => [...document.querySelectorAll('main details')].some(d => d.open && d.textContent.includes('{'))")
    check(dumps == 0 and not raw_open, "the certificate is shown as a card of fields, not as raw JSON")
    expect(page.locator("#decoded")).to_contain_text("clientAuth")
    expect(page.locator("#chain")).to_contain_text("CN=kiosk-7")
    page.click("#revoke")
    expect(page.locator("dl.fields .status-REVOKED")).to_be_visible()
    check([t for t, _ in dialogs] == ["confirm"] and "permanent" in dialogs[0][1],
          "revocation asked for confirmation, and no script from a certificate ran: %r" % dialogs)

    page.click("#nav >> text=Audit log")
    row = page.locator("#audit tr", has_text="ACTIVE → REVOKED")
    expect(row.first).to_contain_text("console:console-test")
    expect(page.locator("#audit tr", has_text="ca.register").first).to_contain_text("console:console-test")
    check(True, "the revocation is in the audit log with who did it")

    # Requests without the session's CSRF token, or with a forged one, change nothing.
    forged = page.evaluate("""async () => {
        const body = JSON.stringify({common_name: 'forged'});
        const h = {'Content-Type': 'application/json'};
        const a = await fetch('/v1/certificates', {method: 'POST', headers: h, body});
        const b = await fetch('/v1/certificates', {method: 'POST', headers: {...h, 'X-CSRF-Token': 'forged'}, body});
        const list = await (await fetch('/v1/certificates?limit=1000')).json();
        return [a.status, b.status, list.items.filter(c => c.subject === 'CN=forged').length];
    }""")
    check(forged == [403, 403, 0], "missing and forged CSRF tokens are refused and nothing is made: %r" % forged)
    # A huge upload is refused with a clear message, and nothing is stored.
    huge = page.evaluate("""async () => {
        const pem = '-----BEGIN CERTIFICATE-----\\n' + 'A'.repeat(11 * 1024 * 1024) + '\\n-----END CERTIFICATE-----\\n';
        // The server answers 413 before the whole body is sent; a browser may then report the
        // request as failed instead of showing the answer. Either way nothing may be stored.
        let status = 0, code = 'network-error';
        try {
            const r = await fetch('/v1/truststores', {method: 'POST', headers: {'Content-Type': 'application/json', 'X-CSRF-Token': state.csrf},
                body: JSON.stringify({name: 'huge', bundle_pem: pem})});
            status = r.status; code = (await r.json()).code;
        } catch (e) { /* connection cut while sending */ }
        const list = await (await fetch('/v1/truststores')).json();
        return [status, code, list.items.filter(t => t.name === 'huge').length];
    }""")
    check(huge[0] in (413, 0) and huge[2] == 0, "an 11 MiB upload is refused and nothing is stored: %r" % (huge,))

    # Device enrollment: a .p12 (modern and legacy) and a .mobileconfig, usable by the tools
    # that import them.
    page.click("#nav >> text=Enroll a device")
    page.fill("input[name=common_name]", "laptop-0042")
    page.fill("input[name=password]", "mdm-secret-1")
    page.fill("input[name=origin]", "https://app.corp.test")
    # The password goes into the profile only when asked (a silent MDM install).
    page.check("input[name=embed_password]")
    page.click("text=Issue and package")
    expect(page.locator("#enrolled")).to_contain_text("CN=laptop-0042")
    files = {}
    for which in ["p12", "p12-legacy", "mobileconfig"]:
        with page.expect_download() as d:
            page.click("#download-" + which)
        path = artifacts + "/" + d.value.suggested_filename
        d.value.save_as(path)
        files[which] = path
    check(files["mobileconfig"].endswith("laptop-0042.mobileconfig"), "download names: %r" % files)
    policy = page.locator("#chrome-policy").text_content()
    check("https://app.corp.test" in policy and "AutoSelectCertificateForUrls" in policy, "Chrome policy shown")
    for which in ["p12", "p12-legacy"]:
        out = subprocess.run(["openssl", "pkcs12", "-in", files[which], "-passin", "pass:mdm-secret-1", "-nodes", "-legacy"
                              if which == "p12-legacy" else "-nodes"], capture_output=True, text=True)
        check(out.returncode == 0 and "CN=laptop-0042" in out.stdout and "PRIVATE KEY" in out.stdout,
              "openssl reads the %s bundle: %s" % (which, out.stderr[-300:]))
    with open(files["mobileconfig"], "rb") as f:
        profile = plistlib.load(f)
    payloads = {p["PayloadType"]: p for p in profile["PayloadContent"]}
    check(profile["PayloadType"] == "Configuration" and set(payloads) == {"com.apple.security.pkcs12", "com.apple.security.root"},
          "the profile holds an identity and a root payload")
    inner = artifacts + "/from-profile.p12"
    with open(inner, "wb") as f:
        f.write(payloads["com.apple.security.pkcs12"]["PayloadContent"])
    out = subprocess.run(["openssl", "pkcs12", "-in", inner, "-passin", "pass:" + payloads["com.apple.security.pkcs12"]["Password"],
                          "-nodes", "-legacy"], capture_output=True, text=True)
    check(out.returncode == 0 and "CN=laptop-0042" in out.stdout, "the profile's bundle opens with its password")

    # Things: create one with attributes, attach a certificate.
    page.click("#nav >> text=Things")
    page.fill("input[name=name]", "pump-17")
    page.fill("input[name=attributes]", "site=berlin, model=x2")
    page.click("text=Create thing")
    expect(page.locator("h1")).to_have_text("pump-17")
    expect(page.locator("dl.fields")).to_contain_text("berlin")
    kiosk = page.evaluate("""async () => (await (await fetch('/v1/certificates?limit=1000')).json())
        .items.find(c => c.subject === 'CN=laptop-0042').id""")
    page.fill("input[name=certificate_id]", kiosk)
    page.click("button:text-is('Attach')")
    expect(page.locator("#thing-certificates")).to_contain_text(kiosk)
    check(True, "a thing is created with attributes and a certificate attached")

    # Fleet provisioning: a template created from the example, then disabled.
    page.click("#nav >> text=Provisioning")
    page.fill("#new-template input[name=name]", "line-7")
    page.fill("#new-template input[name=description]", "sensors from line 7")
    page.click("text=Create template")
    row = page.locator("#templates tr", has_text="line-7")
    expect(row).to_contain_text("sensor-${param:SerialNumber}")
    expect(row.locator(".status-ACTIVE")).to_be_visible()
    row.locator("button:text-is('Disable')").click()
    expect(page.locator("#templates tr", has_text="line-7").locator(".status-INACTIVE")).to_be_visible()
    page.fill("#new-template input[name=name]", "broken")
    page.fill("#new-template textarea[name=template]", '{"thing_name": "x-${param:Nope}"}')
    page.click("text=Create template")
    expect(page.locator("#template-error")).to_contain_text("not declared")
    page.screenshot(path=artifacts + "/console-provisioning.png", full_page=True)
    check(True, "a provisioning template is created, disabled, and a bad one refused with the reason")

    # A SCEP profile for a device under an enabled template: the device will make its own key.
    page.fill("#new-template input[name=name]", "laptops")
    page.fill("#new-template textarea[name=template]", '{"thing_name": "${cert:Subject.CN}"}')
    page.click("text=Create template")
    expect(page.locator("#templates tr", has_text="laptops")).to_be_visible()
    page.click("#nav >> text=Enroll a device")
    page.select_option("select[name=scep_template]", "laptops")
    page.fill("input[name=scep_url]", "https://gateway.corp.test/scep")
    page.fill("input[name=scep_common_name]", "laptop-0043")
    page.click("text=Make SCEP profile")
    with page.expect_download() as d:
        page.click("#download-scep-mobileconfig")
    path = artifacts + "/" + d.value.suggested_filename
    d.value.save_as(path)
    with open(path, "rb") as f:
        profile = plistlib.load(f)
    payloads = {p["PayloadType"]: p for p in profile["PayloadContent"]}
    scep_payload = payloads["com.apple.security.scep"]["PayloadContent"]
    check(scep_payload["URL"] == "https://gateway.corp.test/scep" and scep_payload["Subject"] == [[["CN", "laptop-0043"]]]
          and len(scep_payload["Challenge"]) > 16 and scep_payload["KeyIsExtractable"] is False
          and "com.apple.security.root" in payloads,
          "the SCEP profile: URL, subject, a one-time challenge, a key made on the device, and the CA")

    # Truststores: an oversized file is refused by the page with a clear message; then create,
    # add a version, preview its impact.
    page.click("#nav >> text=Truststores")
    with open(artifacts + "/big.pem", "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\n" + "A" * (300 * 1024) + "\n-----END CERTIFICATE-----\n")
    page.set_input_files("form#new-truststore input[type=file]", artifacts + "/big.pem")
    expect(page.locator("#flash")).to_contain_text("larger than 256 KiB")
    page.fill("input[name=name]", "partners")
    page.fill("textarea[name=bundle_pem]", open("rootb/ca.pem").read())
    # Saving waits for a check of exactly what is in the box: lint, then impact.
    check(page.locator("text=Create truststore").is_disabled(), "a bundle cannot be saved before it is checked")
    page.click("#check-bundle")
    expect(page.locator("#bundle-check")).to_contain_text("1 CA certificates")
    expect(page.locator("#bundle-impact")).to_contain_text("would be refused")
    page.click("text=Create truststore")
    expect(page.locator("h1")).to_have_text("Truststore partners")
    expect(page.locator("#version")).to_contain_text("1 (latest)")
    expect(page.locator("#truststore-certificates tbody tr")).to_have_count(1)
    expect(page.locator("#truststore-certificates")).to_contain_text("CN=Root B")
    page.fill("textarea[name=bundle_pem]", open("trust-a.pem").read())
    page.click("#check-bundle")
    expect(page.locator("#bundle-check")).to_contain_text("2 CA certificates")
    # Edited after the check: checked again before it can be saved.
    page.fill("textarea[name=bundle_pem]", open("trust-a.pem").read() + "\n")
    check(page.locator("text=Add version (it becomes the latest)").is_disabled(), "an edited bundle must be checked again")
    page.click("#check-bundle")
    expect(page.locator("#bundle-impact")).to_contain_text("would be refused")
    check(True, "a truststore upload is linted and its impact previewed before it is saved")
    page.click("text=Add version (it becomes the latest)")
    expect(page.locator("#version")).to_contain_text("2 (latest)")
    expect(page.locator("#truststore-certificates tbody tr")).to_have_count(2)
    expect(page.locator("#truststore-certificates")).to_contain_text("Test Root")
    expect(page.locator("#truststore-certificates")).to_contain_text("CN=int")
    page.click("#version-1 > summary")
    expect(page.locator("#certificates-v1")).to_contain_text("CN=Root B")
    check(True, "a truststore version lists its certificates, and an earlier version's open on demand")
    page.click("#preview-button")
    expect(page.locator("#preview")).to_contain_text("certificates seen in the last 30 days")
    page.select_option("#version", "1")
    page.click("#activate-version")
    expect(page.locator("#version")).to_contain_text("3 (latest)")
    expect(page.locator("#truststore-certificates tbody tr")).to_have_count(1)
    expect(page.locator("#truststore-certificates")).to_contain_text("CN=Root B")
    check("1 CA certificates" in page.locator("main").text_content(), "version 1's CAs are live again as version 3")
    check(True, "truststore versions and the impact preview")
    page.click("#nav >> text=Domains")
    expect(page.locator("#domains")).to_contain_text("a.test")
    # Add a domain from the browser: a mistake is caught by the gateway's check, then it works.
    page.fill("input[name=hostname]", "b.test")
    page.click("#domain-advanced summary")
    page.fill("textarea[name=spec]", '{"certificate": "auto", "mtls": {"mode": "sometimes"}, "mapping": [{"upstream": "builtin:echo"}]}')
    page.click("text=Save domain")
    expect(page.locator("#domain-error")).to_contain_text("sometimes")
    page.fill("textarea[name=spec]", '{"certificate": "auto", "mtls": {"mode": "required", "truststore": "registry:partners"}, "mapping": [{"base_path": "/api", "upstream": "builtin:echo"}]}')
    page.click("text=Save domain")
    expect(page.locator("#domains")).to_contain_text("b.test")
    expect(page.locator("#domains tr", has_text="b.test")).to_contain_text("/api")
    check(True, "a domain is added from the browser after a refused mistake")
    # The form: a domain made with fields only, then edited.
    page.fill("input[name=hostname]", "c.test")
    page.select_option("select[name=mtls_mode]", "required")
    page.select_option("select[name=truststore]", "registry:partners")
    expect(page.locator("#truststore-warnings")).to_contain_text("CA certificates")
    page.fill("input[name=base_path_0]", "/form")
    page.fill("input[name=upstream_0]", "builtin:echo")
    page.click("#add-mapping")
    page.fill("input[name=base_path_1]", "/rules")
    page.fill("input[name=upstream_1]", "builtin:echo")
    page.select_option("select[name=authorization_1]", "policy")
    page.select_option("select[name=security_policy]", "TLS_1_3")
    page.click("text=Save domain")
    expect(page.locator("#domains tr", has_text="c.test")).to_contain_text("/form")
    saved = page.evaluate("async () => (await (await fetch('/v1/domains/c.test')).json()).spec")
    check(saved["security_policy"] == "TLS_1_3" and saved["mtls"]["truststore"] == "registry:partners"
          and [(m["base_path"], m["authorization"]) for m in saved["mapping"]] == [("/form", "none"), ("/rules", "policy")],
          "a domain made with the form's fields is stored as set: %r" % saved)
    page.click("button[aria-label='Edit c.test']")
    expect(page.locator("input[name=base_path_1]")).to_have_value("/rules")
    page.click("button[aria-label='Remove mapping 2']")
    page.select_option("select[name=certificate_kind]", "acme")
    page.fill("input[name=acme_contact]", "mailto:ops@c.test")
    page.click("#domain-advanced summary")
    expect(page.locator("#domain-json")).to_have_value(re.compile('"certificate": "acme".*"mailto:ops@c.test"', re.S))
    page.select_option("select[name=certificate_kind]", "auto")
    page.click("text=Save domain")
    expect(page.locator("#domains tr", has_text="c.test")).not_to_contain_text("/rules")
    page.screenshot(path=artifacts + "/console-domains.png", full_page=True)
    check(True, "the domain form edits a stored domain, and its JSON view follows the fields")
    page.click("#nav >> text=Webhooks")
    expect(page.locator("main")).to_contain_text("No webhooks")

    # Explain: why a partner is refused, and that another one gets in.
    page.click("#nav >> text=Explain")
    expect(page.locator("h1")).to_have_text("Explain a decision")
    page.fill("textarea[name=certificate_pem]", open("bob.chain.pem").read())
    page.fill("input[name=path]", "/orders")
    page.click("form#explain button[type=submit]")
    expect(page.locator("#decision")).to_contain_text("DENY")
    expect(page.locator("#explained")).to_contain_text("untrusted-issuer")
    page.screenshot(path=artifacts + "/console-explain.png", full_page=True)
    page.fill("textarea[name=certificate_pem]", open("alice.chain.pem").read())
    page.click("form#explain button[type=submit]")
    expect(page.locator("#decision")).to_contain_text("ALLOW")
    check(True, "explain shows the untrusted partner's refusal and the trusted one's admission")
    # Policies: inline errors for a broken document (JSON, then policy grammar), then a working
    # policy, a new version, and the simulator.
    page.click("#nav >> text=Policies")
    expect(page.locator("h1")).to_have_text("Policies")
    page.fill("input[name=name]", "partners-read")
    page.fill("textarea[name=document]", '{"Statement": [')
    page.click("text=Create policy")
    expect(page.locator("#policy-error")).to_contain_text("Not JSON")
    page.fill("textarea[name=document]", '{"Statement": [{"Effect": "Allow", "Action": "http:GET", "Resource": "orders"}]}')
    page.click("text=Create policy")
    expect(page.locator("#policy-error")).to_contain_text("Statement[0].Resource")
    page.fill("textarea[name=document]", '{"Statement": [{"Effect": "Allow", "Action": "http:GET", "Resource": "route:a.test/orders*"}]}')
    page.click("text=Create policy")
    expect(page.locator("h1")).to_have_text("Policy partners-read")
    page.fill("textarea[name=certificate_pem]", open("alice.chain.pem").read())
    page.fill("input[name=resource]", "route:a.test/orders/7")
    page.click("form#simulate button[type=submit]")
    expect(page.locator("#simulation")).to_contain_text("ALLOW")
    page.fill("input[name=resource]", "route:a.test/admin")
    page.click("form#simulate button[type=submit]")
    expect(page.locator("#simulation")).to_contain_text("DENY")
    page.fill("textarea[name=document]", '{"Statement": [{"Effect": "Allow", "Action": ["http:GET", "http:POST"], "Resource": "route:a.test/*"}]}')
    page.click("text=Save as the new default version")
    expect(page.locator("#edit-policy")).to_contain_text("version 2 of 2")
    page.fill("textarea[name=certificate_pem]", open("alice.chain.pem").read())
    page.fill("input[name=resource]", "route:a.test/admin")
    page.click("form#simulate button[type=submit]")
    expect(page.locator("#simulation")).to_contain_text("ALLOW")
    check(True, "policy editor: inline errors, versions, and the simulator's allow and deny")

    # Other CAs' revocation sources: none followed here (no domain asks for them).
    page.click("#nav >> text=Truststores")
    page.click("#revocation-sources")
    expect(page.locator("main")).to_contain_text("No CRL distribution point followed.")
    expect(page.locator("main")).to_contain_text("No OCSP responder asked.")
    check(True, "the revocation sources page lists what is followed")

    # A partner's keep-alive connection, listed and closed from the console.
    tls = ssl.create_default_context(cafile="data/ca/ca.pem")
    tls.load_cert_chain("alice.chain.pem", "alice.key")
    tls.set_alpn_protocols(["http/1.1"])
    held = tls.wrap_socket(socket.create_connection(("127.0.0.1", gateway_port), timeout=20), server_hostname="a.test")
    held.sendall(b"GET /held HTTP/1.1\r\nHost: a.test\r\n\r\n")
    check(held.recv(12).startswith(b"HTTP/1.1 200"), "a keep-alive connection is served")
    page.click("#nav >> text=Connections")
    row = page.locator("#connections tr", has_text="CN=alice")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("http/1.1")
    row.locator("button").click()
    expect(page.locator("main")).to_contain_text("No open HTTP connections.")
    held.settimeout(10)
    try:
        while held.recv(65536):
            pass
        closed = True
    except socket.timeout:
        closed = False
    except (ssl.SSLError, ConnectionResetError, OSError):
        closed = True
    check(closed, "the console lists the live connection and closes it (the client sees the close)")

    page.click("#nav >> text=MQTT sessions")
    expect(page.locator("main")).to_contain_text("No MQTT sessions.")

    page.click("#nav >> text=Dashboard")
    expect(page.locator("#expiring-7")).to_be_visible()
    expect(page.locator("#handshake-rate .value")).not_to_have_text("…", timeout=15000)
    expect(page.locator("#failures")).to_contain_text("untrusted-issuer")
    expect(page.locator("#statuses")).to_contain_text("200")
    expect(page.locator("#nodes")).to_contain_text("up", timeout=15000)
    check(True, "the dashboard shows handshake failures by reason, requests by status and the nodes")
    # The charts: drawn from the node's last hour, each an image with its text alternative.
    for chart in ["chart-handshakes", "chart-requests", "chart-latency", "chart-connections", "chart-failures", "chart-expiry"]:
        expect(page.locator("#%s svg" % chart)).to_be_visible()
        label = page.locator("#%s svg" % chart).get_attribute("aria-label")
        check(label and len(label) > 20, "chart %s has a text alternative: %r" % (chart, label))
    expect(page.locator("#chart-handshakes path.line").first).to_be_attached(timeout=15000)
    expect(page.locator("#chart-failures")).to_contain_text("untrusted-issuer")
    check(page.locator("#chart-requests svg").get_attribute("aria-label").count("2xx") == 1,
          "the request chart names its series")
    page.screenshot(path=artifacts + "/console-dashboard.png", full_page=True)
    page.screenshot(path=artifacts + "/console-dashboard-readme.png")

    # Accessibility and the phone: every page, at 1280 px and at 390 px, has no serious or
    # critical axe-core violation, and nothing but tables (which scroll) is wider than a phone.
    pages = ["#/", "#/certificates", "#/cas", "#/things", "#/policies", "#/provisioning", "#/truststores",
             "#/truststores/partners", "#/domains", "#/webhooks", "#/connections", "#/sessions", "#/explain",
             "#/enroll", "#/audit", "#/revocation", "#/certificates/" + kiosk_id, "#/things/pump-17",
             "#/policies/partners-read"]
    if axe_path:
        axe_source = open(axe_path).read()
        problems = []
        for width, height, tag in [(1280, 860, "1280"), (390, 844, "phone")]:
            page.set_viewport_size({"width": width, "height": height})
            for hash_ in pages:
                page.goto(base + "/ui" + hash_)
                expect(page.locator("main h1")).to_be_visible()
                page.wait_for_load_state("networkidle")
                # Injected through the debugging protocol, which the page's CSP does not govern.
                page.evaluate(axe_source + "\n;0")
                found = page.evaluate("""async () => (await axe.run(document, {resultTypes: ['violations']})).violations
                    .filter((v) => v.impact === 'serious' || v.impact === 'critical')
                    .map((v) => v.id + ' (' + v.impact + '): ' + v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(', '))""")
                if found:
                    problems.append("axe-core at %s px, %s: %r" % (width, hash_, found))
                if tag == "phone":
                    wide = page.evaluate("""() => Array.from(document.querySelectorAll('main *'))
                        .filter((e) => !e.closest('table, pre, textarea') && e.getBoundingClientRect().right > window.innerWidth + 1)
                        .map((e) => e.tagName + (e.id ? '#' + e.id : '') + '.' + e.className).slice(0, 5)""")
                    if wide:
                        problems.append("on a phone, %s is wider than the screen: %r" % (hash_, wide))
            page.goto(base + "/ui#/")
            expect(page.locator("#chart-handshakes svg")).to_be_visible()
            page.screenshot(path=artifacts + "/console-dashboard-%s.png" % tag, full_page=True)
        check(not problems, "every page, at 1280 px and on a phone, has no serious accessibility violation and fits: %s"
              % ("\n".join(problems) or "%d pages" % len(pages)))
        page.set_viewport_size({"width": 1280, "height": 860})
    else:
        print("SKIP: accessibility check (no axe-core)", flush=True)

    # The keyboard alone: Tab reaches the navigation, Enter opens a page, and a form is filled
    # and sent without the mouse.
    page.goto(base + "/ui#/")
    expect(page.locator("main h1")).to_have_text("Dashboard")
    page.locator("body").focus()
    reached = False
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement && document.activeElement.textContent === 'Things'"):
            reached = True
            break
    check(reached, "Tab reaches the navigation's links")
    page.keyboard.press("Enter")
    expect(page.locator("main h1")).to_have_text("Things")
    page.locator("input[name=name]").focus()
    page.keyboard.type("keyboard-thing")
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_contain_text("keyboard-thing")
    check(True, "the console works from the keyboard: navigation, and a form sent with Enter")

    # A session that ends (here: its cookie is gone) takes the page back to the sign-in, without
    # navigation; signing in again works.
    ctx.clear_cookies()
    page.click("#nav >> text=Things")
    expect(page.locator("h1")).to_have_text("Sign in to Portcullis")
    signed_out_page_has_no_nav("after a 401")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Things")
    expect(page.locator("#nav")).to_be_visible()

    page.click("#logout")
    expect(page.locator("h1")).to_have_text("Sign in to Portcullis")
    signed_out_page_has_no_nav("after signing out")
    after = page.evaluate("async () => (await fetch('/v1/cas')).status")
    check(after == 401, "after signing out the API answers 401 (%r)" % after)
    browser.close()
print("ALL OK", flush=True)
