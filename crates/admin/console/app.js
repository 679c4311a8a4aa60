// The Portcullis console: a small single-page app over the admin API. Every value from the API
// is put into the page with textContent (never as HTML), so names and certificate fields cannot
// run script. State-changing calls carry the session's CSRF token.
"use strict";

const state = { caller: null, csrf: "", timer: null, lastSample: null };

// h("tag.class", {attr: value, onclick: fn}, child, …): children are nodes or text.
function h(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag);
  if (classes.length) el.className = classes.join(" ");
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Replaces the page's content; like h(), it takes nodes, text, lists of them, and skips nothing
// (null, undefined, false).
function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes.flat(Infinity).filter((n) => n !== null && n !== undefined && n !== false));
}

function flash(message, bad) {
  const f = document.getElementById("flash");
  f.textContent = message;
  f.className = bad ? "bad" : "";
  f.hidden = false;
  clearTimeout(flash.t);
  flash.t = setTimeout(() => { f.hidden = true; }, 6000);
}

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const opts = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (r.status === 401 && path !== "/ui/login") {
    state.caller = null;
    loginPage(data && data.code === "session-expired" ? "Your session expired; sign in again." : "");
    throw new ApiError(401, data && data.code, (data && data.message) || "not signed in");
  }
  if (!r.ok) throw new ApiError(r.status, data && data.code, (data && data.message) || text || r.statusText);
  return data === null ? text : data;
}

function date(unix) {
  if (unix === null || unix === undefined) return "—";
  return new Date(unix * 1000).toISOString().replace("T", " ").replace(".000Z", " UTC");
}

function statusCell(s) { return h("span.status-" + s, { text: s }); }

// ----------------------------------------------------------------------------------------------
// Sign-in

function loginPage(message) {
  // Signed out (or the session ended): no navigation, no name, no sign-out button.
  document.getElementById("nav").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("who").removeAttribute("title");
  stopTimer();
  const token = h("input", { type: "password", name: "token", autocomplete: "off", required: true, placeholder: "pct_…" });
  const err = h("p.error", { id: "login-error", text: message || "" });
  const form = h("form", {
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const s = await api("POST", "/ui/login", { token: token.value });
        state.caller = s.caller; state.csrf = s.csrf;
        signedIn();
      } catch (x) { err.textContent = x.message; }
    },
  }, h("label", {}, "API token", token), h("button", { type: "submit", text: "Sign in" }), err);
  show(h("div.login", {},
    h("h1", { text: "Sign in to Portcullis" }),
    h("p.muted", { id: "login-hint", text: "Use an admin API token (portcullis admin token create --name NAME), or open this page with the admin client certificate in your browser." }),
    form));
}

function signedIn() {
  document.getElementById("nav").hidden = false;
  const who = document.getElementById("who");
  who.textContent = state.caller;
  who.title = "Signed in as " + state.caller;
  route();
}

// ----------------------------------------------------------------------------------------------
// Dashboard

function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) for (const p of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[p[1]] = p[2];
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

function sum(samples, name, pred) {
  return samples.filter((s) => s.name === name && (!pred || pred(s.labels))).reduce((a, s) => a + s.value, 0);
}

function card(label, value, id) {
  return h("div.card", { id }, h("div.label", { text: label }), h("div.value", { text: value }));
}

// ----------------------------------------------------------------------------------------------
// Charts, drawn in SVG here (no library, nothing fetched); colours come from the stylesheet
// (the strict CSP allows no inline style). Each chart is an image with a text alternative.

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// The smallest of 1, 2, 2.5, 5 × 10^n at or above v.
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v - 1e-9) return m * p;
  return 10 * p;
}

function short(v) {
  if (v >= 10000) return Math.round(v / 1000) + "k";
  if (v >= 1000) return (v / 1000).toFixed(1) + "k";
  return String(Math.round(v * 100) / 100);
}

function legend(series) {
  return h("span.legend", {}, series.map((x) => h("span.key." + x.cls, { text: x.name })));
}

// Lines over the last hour: series [{name, cls, values: [[unixSeconds, value or null], …]}].
function lineChart(id, title, unit, series) {
  const W = 560, H = 190, L = 46, R = 10, T = 10, B = 26;
  const now = Date.now() / 1000, from = now - 3600;
  const all = series.flatMap((x) => x.values.map((p) => p[1])).filter((v) => typeof v === "number");
  const max = niceMax(Math.max(0, ...all));
  const x = (t) => L + ((t - from) / 3600) * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const last = (ser) => { const v = ser.values.filter((p) => typeof p[1] === "number").pop(); return v ? v[1] : null; };
  const summary = series.map((ser) => `${ser.name} ${last(ser) === null ? "no data" : short(last(ser)) + " " + unit}`).join(", ");
  const body = [];
  for (const f of [0, 0.5, 1]) {
    body.push(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(max * f), y2: y(max * f) }));
    body.push(svg("text", { class: "axis", x: L - 6, y: y(max * f) + 4, "text-anchor": "end" }, short(max * f)));
  }
  for (const m of [60, 45, 30, 15, 0]) {
    body.push(svg("text", { class: "axis", x: x(now - m * 60), y: H - 8, "text-anchor": m === 60 ? "start" : m === 0 ? "end" : "middle" }, m ? `−${m} min` : "now"));
  }
  for (const ser of series) {
    let d = "", pen = false;
    for (const [t, v] of ser.values) {
      if (typeof v !== "number" || t < from) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(t).toFixed(1)} ${y(v).toFixed(1)}`;
      pen = true;
    }
    if (d) body.push(svg("path", { class: "line " + ser.cls, d }));
    const lone = ser.values.filter((p) => typeof p[1] === "number" && p[0] >= from);
    if (lone.length === 1) body.push(svg("circle", { class: "dot " + ser.cls, cx: x(lone[0][0]), cy: y(lone[0][1]), r: 3 }));
  }
  return h("figure.chart", { id },
    h("figcaption", {}, h("span.title", { text: `${title} (${unit})` }), legend(series)),
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}, last hour: ${summary}` },
      svg("title", {}, `${title}, last hour: ${summary}`), body));
}

// Horizontal bars: entries [[label, value], …], largest first.
function barChart(id, title, entries, empty) {
  if (!entries.length) return h("figure.chart", { id }, h("figcaption", {}, h("span.title", { text: title })), h("p.muted", { text: empty }));
  const rowH = 24, W = 560, L = 190, R = 60;
  const max = Math.max(...entries.map((e) => e[1]));
  const H = entries.length * rowH + 6;
  const body = entries.flatMap(([label, v], i) => [
    svg("text", { class: "axis label", x: L - 8, y: i * rowH + 17, "text-anchor": "end" }, label.length > 28 ? label.slice(0, 27) + "…" : label),
    svg("rect", { class: "bar", x: L, y: i * rowH + 5, height: rowH - 8, width: Math.max(2, ((W - L - R) * v) / max) }),
    svg("text", { class: "axis", x: L + Math.max(2, ((W - L - R) * v) / max) + 6, y: i * rowH + 17 }, short(v)),
  ]);
  const summary = entries.map(([k, v]) => `${k} ${short(v)}`).join(", ");
  return h("figure.chart", { id },
    h("figcaption", {}, h("span.title", { text: title })),
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${summary}` }, svg("title", {}, `${title}: ${summary}`), body));
}

// Stacked columns per week ahead: kinds [{name, cls, dates: [unixSeconds, …]}]; what expired
// already is the first column.
function expiryTimeline(id, kinds, weeks) {
  const W = 560, H = 200, L = 36, R = 10, T = 10, B = 34;
  const now = Date.now() / 1000;
  const cols = weeks + 1;
  const counts = kinds.map((k) => {
    const c = new Array(cols).fill(0);
    for (const t of k.dates) {
      if (t < now) c[0] += 1;
      else { const w = Math.floor((t - now) / (7 * 86400)); if (w < weeks) c[w + 1] += 1; }
    }
    return c;
  });
  const totals = Array.from({ length: cols }, (_, i) => counts.reduce((a, c) => a + c[i], 0));
  const max = niceMax(Math.max(1, ...totals));
  const cw = (W - L - R) / cols;
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const body = [];
  for (const f of [0, 0.5, 1]) {
    body.push(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(max * f), y2: y(max * f) }));
    body.push(svg("text", { class: "axis", x: L - 6, y: y(max * f) + 4, "text-anchor": "end" }, short(max * f)));
  }
  for (let i = 0; i < cols; i++) {
    let base = 0;
    kinds.forEach((k, j) => {
      const v = counts[j][i];
      if (!v) return;
      body.push(svg("rect", { class: "bar " + k.cls, x: L + i * cw + 3, width: cw - 6, y: y(base + v), height: y(base) - y(base + v) }));
      base += v;
    });
    if (i === 0 || i % 2 === 1) {
      body.push(svg("text", { class: "axis", x: L + i * cw + cw / 2, y: H - 16, "text-anchor": "middle" }, i === 0 ? "expired" : `w${i}`));
    }
  }
  body.push(svg("text", { class: "axis", x: (W + L) / 2, y: H - 2, "text-anchor": "middle" }, `weeks from now (${weeks} weeks)`));
  const summary = kinds.map((k, j) => `${k.name}: ${counts[j][0]} expired, ${counts[j].slice(1).reduce((a, b) => a + b, 0)} expiring within ${weeks} weeks`).join("; ");
  return h("figure.chart.wide", { id },
    h("figcaption", {}, h("span.title", { text: "Expiry timeline" }), legend(kinds)),
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `Expiry timeline: ${summary}` }, svg("title", {}, `Expiry timeline: ${summary}`), body));
}

async function dashboard() {
  const now = Date.now() / 1000;
  const horizon = Math.floor(now + 13 * 7 * 86400);
  const [history, metricsText, cas, cluster, renewal, expiringCerts, serverCerts] = await Promise.all([
    api("GET", "/v1/metrics/history"), api("GET", "/metrics"), api("GET", "/v1/cas?limit=1000"), api("GET", "/v1/cluster"),
    api("GET", "/v1/renewal"), api("GET", `/v1/certificates?status=ACTIVE&limit=1000&expiring_before=${horizon}`),
    api("GET", "/v1/server-certificates").catch(() => ({ items: [] }))]);
  const m = parseMetrics(metricsText);
  const points = history.points || [];
  const latest = points[points.length - 1];
  const rate = latest ? short(latest.handshakes_ok + latest.handshakes_failed) : "…";
  const count = (days) => {
    const n = expiringCerts.items.filter((c) => c.not_after < now + days * 86400).length;
    return n + (expiringCerts.next && days === 91 ? "+" : "");
  };
  const caSoon = (days) => cas.items.filter((c) => c.not_after < now + days * 86400).length;
  const statuses = {};
  for (const s of m.filter((s) => s.name === "portcullis_requests_total")) {
    statuses[s.labels.status] = (statuses[s.labels.status] || 0) + s.value;
  }
  const reasons = Object.entries(history.failures_by_reason || {}).sort((a, b) => b[1] - a[1]);
  const table = (id, head, rows) =>
    tableOf(id, head, rows.map((r) => h("tr", {}, r.map((x) => h("td", { text: x })))), "None yet.");
  const series = (key, name, cls) => ({ name, cls, values: points.map((p) => [p.at, key(p)]) });
  const serverDates = (serverCerts.items || []).map((c) => c.not_after).filter((t) => typeof t === "number");
  show(
    h("h1", { text: "Dashboard" }),
    h("div.cards", {},
      card("Handshakes/s", rate, "handshake-rate"),
      card("Active connections", sum(m, "portcullis_active_connections"), "active-connections"),
      card("MQTT sessions", sum(m, "portcullis_mqtt_sessions_online"), "mqtt-sessions"),
      card("Certificates expiring in 7 days", count(7), "expiring-7"),
      card("… in 30 days", count(30), "expiring-30"),
      card("Due for renewal", renewal.due, "renewal-due"),
      card("In grace (expired, may only renew)", renewal.in_grace, "renewal-in-grace"),
      card("Overdue (expired, ACTIVE)", renewal.overdue, "renewal-overdue"),
      card("Renewals issued", renewal.renewed, "renewed"),
      card("CAs expiring in 30 days", caSoon(30), "ca-expiring-30")),
    h("div.charts", { id: "charts" },
      lineChart("chart-handshakes", "Handshakes", "per s", [
        series((p) => p.handshakes_ok, "ok", "s1"), series((p) => p.handshakes_failed, "failed or refused", "s4")]),
      lineChart("chart-requests", "Requests by status", "per s", [
        series((p) => p.requests["2xx"], "2xx", "s1"), series((p) => p.requests["3xx"], "3xx", "s2"),
        series((p) => p.requests["4xx"], "4xx", "s3"), series((p) => p.requests["5xx"], "5xx", "s4")]),
      lineChart("chart-latency", "Request latency", "ms", [
        series((p) => p.latency_p50_ms, "p50", "s1"), series((p) => p.latency_p99_ms, "p99", "s3")]),
      lineChart("chart-connections", "Open connections and MQTT sessions", "now", [
        series((p) => p.connections, "connections", "s1"), series((p) => p.mqtt_sessions, "MQTT sessions", "s2")]),
      barChart("chart-failures", "Handshake failures by reason, last hour", reasons, "No failed handshake in the last hour."),
      expiryTimeline("chart-expiry", [
        { name: "client certificates (ACTIVE)", cls: "s1", dates: expiringCerts.items.map((c) => c.not_after) },
        { name: "CAs", cls: "s3", dates: cas.items.map((c) => c.not_after).filter((t) => t < horizon) },
        { name: "server certificates", cls: "s2", dates: serverDates.filter((t) => t < horizon) }], 13)),
    h("h2", { text: "Handshake failures by reason (last hour)" }),
    table("failures", ["reason", "count"], reasons.map(([k, v]) => [k, short(v)])),
    h("h2", { text: "Requests by status (since start)" }),
    table("statuses", ["status", "count"], Object.entries(statuses).sort()),
    h("h2", { text: "Nodes" }),
    table("nodes", ["node", "state", "version", "changes behind", "snapshot checked", "connections", "MQTT sessions", "NATS"],
      cluster.nodes.map((n) => [n.id, n.stale ? "STALE" : "up", n.version, String(n.changes_behind),
        (n.snapshot_age_ms / 1000).toFixed(1) + " s ago", String(n.connections), String(n.mqtt_sessions),
        n.nats || "none (single node)"])),
  );
}

// ----------------------------------------------------------------------------------------------
// Certificates

async function certificates(params) {
  const q = new URLSearchParams({ limit: "100" });
  for (const k of ["status", "ca", "thing"]) if (params.get(k)) q.set(k, params.get(k));
  if (params.get("expiring")) q.set("expiring_before", String(Math.floor(Date.now() / 1000 + Number(params.get("expiring")) * 86400)));
  const list = await api("GET", "/v1/certificates?" + q.toString());
  const sel = (name, options) => h("select", { name },
    options.map(([v, t]) => h("option", { value: v, selected: params.get(name) === v || undefined, text: t })));
  const filters = h("form.filters", {
    onsubmit: (e) => {
      e.preventDefault();
      const f = new FormData(e.target);
      const p = new URLSearchParams();
      for (const [k, v] of f.entries()) if (v) p.set(k, v);
      location.hash = "#/certificates?" + p.toString();
    },
  },
  h("label", {}, "Status", sel("status", [["", "any"], ["ACTIVE", "ACTIVE"], ["INACTIVE", "INACTIVE"], ["REVOKED", "REVOKED"], ["PENDING_ACTIVATION", "PENDING_ACTIVATION"]])),
  h("label", {}, "Expiring within", sel("expiring", [["", "any time"], ["7", "7 days"], ["30", "30 days"], ["90", "90 days"]])),
  h("label", {}, "CA id", h("input", { name: "ca", value: params.get("ca") || "", size: 20 })),
  h("label", {}, "Thing", h("input", { name: "thing", value: params.get("thing") || "", size: 14 })),
  h("button", { type: "submit", text: "Filter" }));
  const rows = list.items.map((c) => h("tr", {},
    h("td", {}, h("a", { href: "#/certificates/" + encodeURIComponent(c.id), text: c.subject })),
    h("td", {}, statusCell(c.status)),
    h("td", { text: date(c.not_after) }),
    h("td", { text: c.things.join(", ") }),
    h("td", { text: date(c.last_seen) })));
  const cn = h("input", { name: "common_name", required: true, placeholder: "kiosk-7" });
  const days = h("input", { name: "days", type: "number", min: 1, max: 3650, value: 365, size: 5 });
  const status = h("select", { name: "status" }, ["ACTIVE", "INACTIVE"].map((s) => h("option", { value: s, text: s })));
  const issued = h("div", { id: "issued" });
  const issue = h("form.inline", {
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const r = await api("POST", "/v1/certificates", { common_name: cn.value, days: Number(days.value), status: status.value });
        const cert = r.certificate || r;
        issued.replaceChildren(h("p", {}, "Issued ", h("a", { href: "#/certificates/" + encodeURIComponent(cert.id), text: cert.subject }),
          " — the private key is shown once: ", h("details", {}, h("summary", { text: "private key (PEM)" }), h("pre.mono", { text: r.private_key_pem || "" }))));
        flash("Certificate issued: " + cert.subject);
      } catch (x) { flash(x.message, true); }
    },
  }, h("label", {}, "Common name", cn), h("label", {}, "Days", days), h("label", {}, "Status", status),
  h("button", { type: "submit", text: "Issue certificate" }));
  show(
    h("h1", { text: "Certificates" }),
    filters,
    tableOf("certificates", ["Subject", "Status", "Expires", "Things", "Last seen"], rows, "No certificates match."),
    h("h2", { text: "Issue a client certificate with the local CA" }),
    issue, issued);
}

async function certificate(id) {
  const c = await api("GET", "/v1/certificates/" + encodeURIComponent(id));
  const set = async (status, question) => {
    if (!confirm(question)) return;
    try {
      await api("PATCH", "/v1/certificates/" + encodeURIComponent(id), { status });
      flash("Certificate " + status.toLowerCase());
      route();
    } catch (x) { flash(x.message, true); }
  };
  const actions = [];
  if (c.status !== "REVOKED") {
    actions.push(h("button.danger", { id: "revoke", type: "button", onclick: () => set("REVOKED", `Revoke ${c.subject}? Revocation is permanent, and open connections using it are closed.`), text: "Revoke" }));
    if (c.status !== "ACTIVE") actions.push(h("button", { id: "activate", type: "button", onclick: () => set("ACTIVE", `Activate ${c.subject}?`), text: "Activate" }));
    if (c.status === "ACTIVE") actions.push(h("button.secondary", { id: "deactivate", type: "button", onclick: () => set("INACTIVE", `Deactivate ${c.subject}? Its connections are closed until it is activated again.`), text: "Deactivate" }));
  }
  const d = c.decoded || {};
  const ca = (c.ca_chain || [])[0];
  const things = c.things || [];
  show(
    h("p", {}, h("a", { href: "#/certificates", text: "← Certificates" })),
    h("h1", { text: c.subject }),
    h("section.card-block", { id: "certificate-card" },
      h("h2", { text: "Certificate" }),
      fieldList("certificate-fields", [
        ["Status", statusCell(c.status)],
        ["Subject", c.subject],
        ["Issuer", c.issuer],
        ["Serial", c.serial, true],
        ["Not before", d.not_before ? when(d.not_before) : "—"],
        ["Not after", [when(c.not_after), " ", h("span.muted", { text: untilText(c.not_after) })]],
        ["Key", keyText(d.public_key)],
        ["Signature algorithm", d.signature_algorithm || "—"],
        ["Fingerprint (SHA-256)", d.sha256_fingerprint || "—", true],
        ["Certificate id", c.id, true],
        ["Registered CA", ca
          ? [h("a", { href: "#/cas", text: ca.subject }), ca.verified ? "" : " (unverified)", h("div.mono", { text: c.ca_id })]
          : (c.ca_id ? h("span.mono", { text: c.ca_id }) : "— (not linked to a registered CA)")],
        ["Things", things.length ? things.map((t, i) => [i ? ", " : "", h("a", { href: "#/things/" + encodeURIComponent(t), text: t })]) : "—"],
        ["Last seen", date(c.last_seen)],
        ["Registered", date(c.created_at)],
        ["Last changed", date(c.updated_at)],
      ])),
    h("div.actions", {}, actions),
    h("section.card-block", {},
      h("h2", { text: "Extensions" }),
      decodedFields(c.decoded)),
    h("h2", { text: "Chain, from the certificate to its anchor" }),
    chainDrawing(c),
    h("h2", { text: "Policies that apply" }),
    tableOf("certificate-policies", ["Policy", "Attached to"], (c.policies || []).map((p) => h("tr", {},
      h("td", {}, h("a", { href: "#/policies/" + encodeURIComponent(p.name), text: p.name })), h("td", { text: p.attached_to }))),
    "None attached to the certificate, its things or its CA (domain policies apply per domain)."),
    h("h2", { text: "PEM" }),
    h("pre.mono", { id: "certificate-pem", text: c.pem || "" }),
    h("details.raw", { id: "raw-json" }, h("summary", { text: "Raw JSON (advanced)" }), h("pre.mono", { text: JSON.stringify(c, null, 2) })));
}

// The chain drawn from the certificate to its anchor: a box per certificate (role, subject,
// status, expiry, key ids) and, between each and its issuer, how they are linked: the child's
// authority key id is the issuer's subject key id (as seed-001 explains), or only the names.
function chainDrawing(c) {
  const d = c.decoded || {};
  const nodes = [{ role: "certificate", subject: c.subject, status: c.status, not_after: c.not_after,
    ski: d.subject_key_id, aki: d.authority_key_id, issuer: c.issuer, self: d.self_issued }];
  for (const x of c.ca_chain || []) {
    nodes.push({ role: x.self_issued ? "root CA (trust anchor)" : "intermediate CA", subject: x.subject, status: x.status,
      not_after: x.not_after, ski: x.subject_key_id, aki: x.authority_key_id, issuer: x.issuer, self: x.self_issued,
      href: "#/cas", verified: x.verified });
  }
  const last = nodes[nodes.length - 1];
  if (!last.self) nodes.push({ role: "issuer (not registered here)", subject: last.issuer, ski: null, aki: null, unknown: true });
  const keyId = (label, v) => h("div.keyid", {}, h("span.muted", { text: label + " " }), h("span.mono", { text: v || "—" }));
  const items = [];
  nodes.forEach((n, i) => {
    if (i > 0) {
      const child = nodes[i - 1];
      let text, cls;
      if (n.unknown) { text = `issued by ${n.subject}` + (child.aki ? `, key id ${child.aki}` : "") + ": not registered, so not drawn further"; cls = "link.unknown"; }
      else if (child.aki && n.ski && child.aki === n.ski) { text = "↑ authority key id = subject key id of the issuer"; cls = "link.ok"; }
      else if (child.aki && n.ski) { text = "⚠ the authority key id is not the issuer's subject key id (linked by name)"; cls = "link.bad"; }
      else { text = "↑ linked by name (a key id is missing)"; cls = "link.name"; }
      items.push(h("li.chain-" + cls, { text }));
    }
    items.push(h("li.chain-box" + (n.unknown ? ".unknown" : ""), {},
      h("div.role", { text: n.role }),
      h("div.subject", {}, n.href ? h("a", { href: n.href, text: n.subject }) : n.subject),
      n.unknown ? null : h("div.meta", {}, n.status ? statusCell(n.status) : null, n.not_after ? " expires " + date(n.not_after) : "",
        n.verified === false ? " (registered without proof of possession)" : ""),
      n.unknown ? null : [keyId("subject key id", n.ski), n.self ? null : keyId("authority key id", n.aki)]));
  });
  return h("ol.chain", { id: "chain", "aria-label": "Certificate chain from the certificate to its anchor" }, items);
}

// A card of fields: [label, value (text, node or list of them), monospace?].
function fieldList(id, rows) {
  return h("dl.fields", { id }, rows.flatMap(([k, v, mono]) => [
    h("dt", { text: k }),
    h(mono ? "dd.mono" : "dd", {}, v === undefined || v === null || v === "" ? "—" : v)]));
}

// A time given as seconds since the epoch or as RFC 3339 text, as "YYYY-MM-DD hh:mm:ss UTC".
function when(t) {
  if (typeof t === "number") return date(t);
  if (typeof t !== "string" || !t) return "—";
  const ms = Date.parse(t);
  return Number.isNaN(ms) ? t : date(Math.floor(ms / 1000));
}

function untilText(unix) {
  if (typeof unix !== "number") return "";
  const days = Math.round((unix - Date.now() / 1000) / 86400);
  if (days < 0) return `(expired ${-days} days ago)`;
  return days === 0 ? "(expires today)" : `(in ${days} days)`;
}

// "EC P-256 (256 bits)", "RSA (2048 bits)".
function keyText(k) {
  if (!k) return "—";
  return [k.algorithm, k.curve].filter(Boolean).join(" ") + (k.bits ? ` (${k.bits} bits)` : "");
}

// The decoded certificate's extensions, as `portcullis pki inspect` shows them.
function decodedFields(d) {
  if (!d) return h("p.muted", { id: "decoded", text: "Cannot be decoded." });
  const list = (xs) => (xs && xs.length ? h("dd.list", {}, xs.map((x) => h("span", { text: x }))) : "—");
  const bc = d.basic_constraints;
  const rows = [
    ["X.509 version", d.version ? "v" + d.version : "—"],
    ["Key usage", (d.key_usage || []).join(", ") || "—"],
    ["Extended key usage", (d.extended_key_usage || []).join(", ") || "—"],
    ["Basic constraints", bc ? (bc.ca ? "CA" + (bc.path_len === null || bc.path_len === undefined ? "" : `, path length ≤ ${bc.path_len}`) : "not a CA") : "not present"],
    ["Subject alternative names", list(d.subject_alt_names)],
    ["Authority information access", list(d.authority_info_access)],
    ["CRL distribution points", list(d.crl_distribution_points)],
    ["Name constraints", list(d.name_constraints)],
    ["Subject key id", d.subject_key_id || "—", true],
    ["Authority key id", d.authority_key_id || "—", true],
    ["Self-issued", d.self_issued ? "yes" : "no"],
  ];
  return h("dl.fields", { id: "decoded" }, rows.flatMap(([k, v, mono]) => [
    h("dt", { text: k }),
    v instanceof Node && v.tagName === "DD" ? v : h(mono ? "dd.mono" : "dd", {}, v)]));
}

// ----------------------------------------------------------------------------------------------
// CAs

// A file input and a text area that fill each other: paste PEM, or pick a file.
function pemField(name, label) {
  const area = h("textarea", { name, rows: 6, cols: 66, placeholder: "-----BEGIN CERTIFICATE-----", spellcheck: "false" });
  const file = h("input", {
    type: "file", accept: ".pem,.crt,.cer",
    onchange: async () => {
      const f = file.files[0];
      if (!f) return;
      if (f.size > 256 * 1024) { flash("That file is larger than 256 KiB: not a certificate.", true); file.value = ""; return; }
      area.value = await f.text();
      area.dispatchEvent(new Event("input"));
    },
  });
  return { area, node: h("label", {}, label, area, file) };
}

// The commands that make the proof of possession, each correct as printed when pasted in a
// shell in a directory holding the CA's ca.pem and ca.key: both write proof/verification.pem
// (and its key, proof/verification.key), which the register command then names.
function verificationRecipe(regCode) {
  const portcullis = `portcullis pki verification-cert --ca-cert ca.pem --ca-key ca.key --code ${regCode} --out proof`;
  const openssl = [
    "mkdir -p proof",
    `openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout proof/verification.key -subj "/CN=${regCode}" -out proof/verification.csr`,
    "openssl x509 -req -in proof/verification.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -out proof/verification.pem",
  ].join("\n");
  const register = "portcullis ca register --cert ca.pem --verification-cert proof/verification.pem --activate";
  return [
    h("p.muted", { text: "With portcullis:" }),
    h("pre.mono.recipe", { id: "verification-command", text: portcullis }),
    h("p.muted", { text: "Or with OpenSSL:" }),
    h("pre.mono.recipe", { id: "verification-openssl", text: openssl }),
    h("p.muted", { text: "Then paste ca.pem and proof/verification.pem below, or register from a shell with admin access (add --auto-register for just-in-time registration):" }),
    h("pre.mono.recipe", { id: "register-command", text: register }),
  ];
}

async function cas() {
  const [list, code] = await Promise.all([api("GET", "/v1/cas?limit=1000"), api("GET", "/v1/registration-code")]);
  const setStatus = async (ca, status) => {
    if (!confirm(`${status === "ACTIVE" ? "Activate" : "Deactivate"} ${ca.subject}?`)) return;
    try {
      await api("PATCH", "/v1/cas/" + encodeURIComponent(ca.id), { status });
      flash("CA " + status.toLowerCase());
      route();
    } catch (x) { flash(x.message, true); }
  };
  const rows = list.items.map((c) => h("tr", {},
    h("td", { text: c.subject }),
    h("td", {}, statusCell(c.status)),
    h("td", { text: c.verified ? "yes" : "no (unverified)" }),
    h("td", { text: c.auto_registration ? "on" : "off" }),
    h("td", { text: date(c.not_after) }),
    h("td", {}, h("button.secondary", { type: "button", onclick: () => setStatus(c, c.status === "ACTIVE" ? "INACTIVE" : "ACTIVE"), text: c.status === "ACTIVE" ? "Deactivate" : "Activate" }))));
  const caPem = pemField("certificate_pem", "CA certificate (PEM)");
  const proofPem = pemField("verification_certificate_pem", "Verification certificate (PEM)");
  const activate = h("input", { type: "checkbox", name: "activate", checked: true });
  const auto = h("input", { type: "checkbox", name: "auto_registration" });
  const template = h("textarea", { name: "provisioning_template", rows: 3, cols: 66, spellcheck: "false",
    placeholder: '{"thing_name": "${Certificate.Subject.CommonName}"} (optional: provision things just in time)' });
  const err = h("p.error", { id: "ca-error" });
  const form = h("form", {
    id: "register-ca",
    onsubmit: async (e) => {
      e.preventDefault();
      err.textContent = "";
      const body = { certificate_pem: caPem.area.value, verification_certificate_pem: proofPem.area.value, activate: activate.checked, auto_registration: auto.checked };
      if (template.value.trim()) {
        try { body.provisioning_template = JSON.parse(template.value); } catch (x) { err.textContent = "The provisioning template is not JSON: " + x.message; return; }
      }
      try {
        const ca = await api("POST", "/v1/cas", body);
        flash("CA registered: " + ca.subject);
        route();
      } catch (x) { err.textContent = x.message; }
    },
  },
  h("p", {}, "Registration code: ", h("code.mono", { id: "registration-code", text: code.registration_code })),
  h("p.muted", { text: "Prove you hold the CA's key: sign a certificate whose common name is the registration code with it, on the machine that has the key. In a directory holding the CA's ca.pem and ca.key, run either of these; both write proof/verification.pem:" }),
  ...verificationRecipe(code.registration_code),
  caPem.node, proofPem.node,
  h("label", {}, h("span", {}, activate, " Active at once")),
  h("label", {}, h("span", {}, auto, " Register the certificates it issued at their first connection (just-in-time)")),
  h("label", {}, "Provisioning template (JSON, optional)", template),
  err,
  h("button", { type: "submit", text: "Register CA" }));
  show(
    h("h1", { text: "Certificate authorities" }),
    tableOf("cas", ["Subject", "Status", "Proof of possession", "Auto-registration", "Expires", ""], rows, "No CAs registered yet."),
    h("h2", { text: "Register a CA" }),
    form);
}

// ----------------------------------------------------------------------------------------------
// Policies

const EXAMPLE_POLICY = JSON.stringify({ Statement: [
  { Effect: "Allow", Action: "http:GET", Resource: "route:api.example.com/orders*" },
] }, null, 2);

// Parses the editor's text; an error names the line and column.
function parseDocument(text) {
  try { return { doc: JSON.parse(text) }; } catch (x) { return { error: "Not JSON: " + x.message }; }
}

async function policies() {
  const list = await api("GET", "/v1/policies");
  const name = h("input", { name: "name", required: true, placeholder: "partners-read" });
  const doc = h("textarea", { name: "document", rows: 10, cols: 80, spellcheck: "false" });
  doc.value = EXAMPLE_POLICY;
  const err = h("p.error", { id: "policy-error" });
  const create = h("form", {
    id: "new-policy",
    onsubmit: async (e) => {
      e.preventDefault();
      err.textContent = "";
      const parsed = parseDocument(doc.value);
      if (parsed.error) { err.textContent = parsed.error; return; }
      try {
        await api("POST", "/v1/policies", { name: name.value, document: parsed.doc });
        flash("Policy created: " + name.value);
        location.hash = "#/policies/" + encodeURIComponent(name.value);
      } catch (x) { err.textContent = x.message; }
    },
  }, h("label", {}, "Name", name), h("label", {}, "Document", doc), err, h("button", { type: "submit", text: "Create policy" }));
  show(
    h("h1", { text: "Policies" }),
    tableOf("policies", ["Name", "Default version", "Attachments"], list.items.map((p) => h("tr", {},
      h("td", {}, h("a", { href: "#/policies/" + encodeURIComponent(p.name), text: p.name })),
      h("td", { text: p.default_version }),
      h("td", { text: p.attachments }))), "No policies yet."),
    h("h2", { text: "New policy" }),
    create);
}

async function policy(name) {
  const p = await api("GET", "/v1/policies/" + encodeURIComponent(name));
  const doc = h("textarea", { name: "document", rows: 14, cols: 80, spellcheck: "false" });
  doc.value = JSON.stringify(p.document, null, 2);
  const err = h("p.error", { id: "policy-error" });
  const editor = h("form", {
    id: "edit-policy",
    onsubmit: async (e) => {
      e.preventDefault();
      err.textContent = "";
      const parsed = parseDocument(doc.value);
      if (parsed.error) { err.textContent = parsed.error; return; }
      try {
        const r = await api("POST", "/v1/policies/" + encodeURIComponent(name) + "/versions", { document: parsed.doc, set_default: true });
        flash(`Version ${r.default_version} is now the default`);
        route();
      } catch (x) { err.textContent = x.message; }
    },
  }, h("label", {}, `Document (version ${p.default_version} of ${p.versions.length} kept)`, doc), err,
  h("button", { type: "submit", text: "Save as the new default version" }));
  const pem = pemField("certificate_pem", "Client certificate (PEM)");
  const action = h("input", { name: "action", value: "http:GET", size: 16 });
  const resource = h("input", { name: "resource", placeholder: "route:api.example.com/orders", size: 40 });
  const clientId = h("input", { name: "client_id", placeholder: "(MQTT only)", size: 14 });
  const result = h("div", { id: "simulated" });
  const sim = h("form", {
    id: "simulate",
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const body = { certificate_pem: pem.area.value, action: action.value, resource: resource.value, policies: [name] };
        if (clientId.value) body.client_id = clientId.value;
        const r = await api("POST", "/v1/simulate", body);
        result.replaceChildren(
          h("p", { id: "simulation", class: r.decision === "allow" ? "status-ACTIVE" : "status-REVOKED", text: `${r.decision.toUpperCase()}: ${r.reason}` }),
          h("details", {}, h("summary", { text: "Statements, variables and trace" }), h("pre.mono", { text: JSON.stringify(r, null, 2) })));
      } catch (x) { result.replaceChildren(h("p.error", { text: x.message })); }
    },
  }, pem.node, h("div.inline", {}, h("label", {}, "Action", action), h("label", {}, "Resource", resource), h("label", {}, "MQTT client id", clientId)),
  h("button", { type: "submit", text: "Simulate" }));
  show(
    h("p", {}, h("a", { href: "#/policies", text: "← Policies" })),
    h("h1", { text: "Policy " + p.name }),
    h("p.muted", { text: "Attached to: " + ((p.targets || []).map((t) => `${t.target_type}:${t.target}`).join(", ") || "nothing yet (portcullis policy attach)") }),
    editor,
    h("h2", { text: "Simulate" }),
    h("p.muted", { text: "Evaluates this policy's default version for a certificate, with the variables the registry gives it (things, attributes, CA)." }),
    sim, result);
}

// ----------------------------------------------------------------------------------------------
// Fleet provisioning templates

const EXAMPLE_TEMPLATE = JSON.stringify({
  thing_name: "sensor-${param:SerialNumber}",
  attributes: { serial: "${param:SerialNumber}" },
  parameters: { SerialNumber: { max_length: 32 } },
  policies: [],
  device_configuration: {},
}, null, 2);

async function provisioning() {
  const list = await api("GET", "/v1/provisioning-templates");
  const name = h("input", { name: "name", required: true, placeholder: "factory" });
  const description = h("input", { name: "description", size: 40, placeholder: "Sensors from line 7" });
  const doc = h("textarea", { name: "template", rows: 12, cols: 80, spellcheck: "false" });
  doc.value = EXAMPLE_TEMPLATE;
  const err = h("p.error", { id: "template-error" });
  const create = h("form", {
    id: "new-template",
    onsubmit: async (e) => {
      e.preventDefault();
      err.textContent = "";
      const parsed = parseDocument(doc.value);
      if (parsed.error) { err.textContent = parsed.error; return; }
      try {
        await api("POST", "/v1/provisioning-templates", { name: name.value, description: description.value, template: parsed.doc });
        flash("Template created: " + name.value);
        route();
      } catch (x) { err.textContent = x.message; }
    },
  }, h("div.inline", {}, h("label", {}, "Name", name), h("label", {}, "Description", description)),
  h("label", {}, "Template", doc), err, h("button", { type: "submit", text: "Create template" }));
  const toggle = (t) => h("button", {
    type: "button",
    class: "small",
    text: t.enabled ? "Disable" : "Enable",
    onclick: async () => {
      try {
        await api("PATCH", "/v1/provisioning-templates/" + encodeURIComponent(t.name), { enabled: !t.enabled });
        flash(`${t.name} ${t.enabled ? "disabled" : "enabled"}`);
        route();
      } catch (x) { flash(x.message, true); }
    },
  });
  show(
    h("h1", { text: "Fleet provisioning" }),
    h("p.muted", { text: "Devices holding a claim certificate (portcullis cert claim ID --templates NAME, or a claim CA) ask for their own certificate over IoT Core's MQTT API and register it under one of these templates. See docs/lifecycle.md." }),
    tableOf("templates", ["Name", "State", "Thing name", "Policies", "Description", ""], list.items.map((t) => h("tr", {},
      h("td.mono", { text: t.name }),
      h("td", {}, statusCell(t.enabled ? "ACTIVE" : "INACTIVE")),
      h("td.mono", { text: t.template.thing_name }),
      h("td", { text: (t.template.policies || []).join(", ") || "—" }),
      h("td", { text: t.description || "" }),
      h("td", {}, toggle(t)))), "No provisioning templates yet."),
    h("h2", { text: "New template" }),
    create);
}

// ----------------------------------------------------------------------------------------------
// Things

// Tables take the keyboard focus, so that one scrolled sideways (on a phone) can be scrolled
// from the keyboard.
function tableOf(id, head, rows, empty) {
  return rows.length
    ? h("table", { id, tabindex: 0 }, h("thead", {}, h("tr", {}, head.map((x) => h("th", { text: x })))), h("tbody", {}, rows))
    : h("p.muted", { text: empty });
}

async function things() {
  const list = await api("GET", "/v1/things?limit=1000");
  const name = h("input", { name: "name", required: true, placeholder: "pump-17" });
  const attrs = h("input", { name: "attributes", size: 40, placeholder: "site=berlin, model=x2" });
  const err = h("p.error", { id: "thing-error" });
  const form = h("form.inline", {
    onsubmit: async (e) => {
      e.preventDefault();
      err.textContent = "";
      const attributes = {};
      for (const pair of attrs.value.split(",").map((x) => x.trim()).filter(Boolean)) {
        const i = pair.indexOf("=");
        if (i < 1) { err.textContent = `attribute '${pair}' must be name=value`; return; }
        attributes[pair.slice(0, i).trim()] = pair.slice(i + 1).trim();
      }
      try {
        await api("POST", "/v1/things", { name: name.value, attributes });
        location.hash = "#/things/" + encodeURIComponent(name.value);
      } catch (x) { err.textContent = x.message; }
    },
  }, h("label", {}, "Name", name), h("label", {}, "Attributes", attrs), h("button", { type: "submit", text: "Create thing" }));
  show(
    h("h1", { text: "Things" }),
    tableOf("things", ["Name", "Attributes", "Certificates"], list.items.map((t) => h("tr", {},
      h("td", {}, h("a", { href: "#/things/" + encodeURIComponent(t.name), text: t.name })),
      h("td", { text: Object.entries(t.attributes).map(([k, v]) => `${k}=${v}`).join(", ") }),
      h("td", { text: t.certificates.length }))), "No things yet."),
    h("h2", { text: "New thing" }), form, err);
}

async function thing(name) {
  const t = await api("GET", "/v1/things/" + encodeURIComponent(name));
  const cert = h("input", { name: "certificate_id", size: 66, placeholder: "certificate id (SHA-256 fingerprint)" });
  const attach = h("form.inline", {
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api("PUT", `/v1/things/${encodeURIComponent(name)}/certificates/${encodeURIComponent(cert.value.trim())}`, {});
        flash("Attached"); route();
      } catch (x) { flash(x.message, true); }
    },
  }, h("label", {}, "Attach a certificate", cert), h("button", { type: "submit", text: "Attach" }));
  const detach = async (id) => {
    if (!confirm("Detach this certificate from " + name + "?")) return;
    try { await api("DELETE", `/v1/things/${encodeURIComponent(name)}/certificates/${encodeURIComponent(id)}`); route(); } catch (x) { flash(x.message, true); }
  };
  show(
    h("p", {}, h("a", { href: "#/things", text: "← Things" })),
    h("h1", { text: t.name }),
    h("dl.fields", {}, Object.entries(t.attributes).flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })])),
    h("h2", { text: "Certificates" }),
    tableOf("thing-certificates", ["Certificate", "Exclusive", ""], t.certificates.map((a) => h("tr", {},
      h("td.mono", {}, h("a", { href: "#/certificates/" + encodeURIComponent(a.certificate_id), text: a.certificate_id })),
      h("td", { text: a.exclusive ? "yes" : "no" }),
      h("td", {}, h("button.secondary", { type: "button", onclick: () => detach(a.certificate_id), text: "Detach" })))), "None attached."),
    attach);
}

// ----------------------------------------------------------------------------------------------
// Truststores

// A bundle is checked before it is saved: its lint warnings and, on the domains that use the
// truststore, the certificates seen in the last 30 days that it would refuse. The save button
// waits for a check of exactly the text in the box.
function bundleCheck(nameOf, area, save) {
  const out = h("div.bundle-check", { id: "bundle-check", "aria-live": "polite" });
  let checked = null;
  const stale = () => { save.disabled = checked === null || checked !== area.value; };
  area.addEventListener("input", stale);
  const run = async () => {
    out.replaceChildren(h("p.muted", { text: "Checking…" }));
    try {
      const name = nameOf();
      if (!name) throw new Error("name the truststore first");
      const p = await api("POST", `/v1/truststores/${encodeURIComponent(name)}/preview`, { bundle_pem: area.value, days: 30 });
      const n = (area.value.match(/-----BEGIN CERTIFICATE-----/g) || []).length;
      out.replaceChildren(
        h("p", { text: `${n} CA certificates. ${p.warnings.length ? p.warnings.length + " lint warnings:" : "No lint warnings."}` }),
        p.warnings.length ? h("ul.warnings", { id: "bundle-warnings" }, p.warnings.map((w) => h("li", { text: w }))) : null,
        h("p", { id: "bundle-impact", text: `Of ${p.checked} certificates seen in the last ${p.days} days on the domains using ${name}, ${p.rejected.length} would be refused.` }),
        p.rejected.length ? tableOf("bundle-rejected", ["Subject", "Domain", "Reason"], p.rejected.map((r) => h("tr", {},
          h("td", { text: r.subject }), h("td", { text: r.domain }), h("td", { text: r.reason + ": " + r.explanation }))), "") : null);
      checked = area.value;
    } catch (x) { checked = null; out.replaceChildren(h("p.error", { text: x.message })); }
    stale();
  };
  save.disabled = true;
  return { out, button: h("button.secondary", { type: "button", id: "check-bundle", onclick: run, text: "Check bundle (lint and impact)" }) };
}

async function truststores() {
  const list = await api("GET", "/v1/truststores");
  const name = h("input", { name: "name", required: true, placeholder: "partners" });
  const bundle = pemField("bundle_pem", "CA certificates (PEM bundle)");
  const err = h("p.error", { id: "truststore-error" });
  const createButton = h("button", { type: "submit", text: "Create truststore" });
  const checkNew = bundleCheck(() => name.value.trim(), bundle.area, createButton);
  const form = h("form", {
    id: "new-truststore",
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api("POST", "/v1/truststores", { name: name.value, bundle_pem: bundle.area.value });
        location.hash = "#/truststores/" + encodeURIComponent(name.value);
      } catch (x) { err.textContent = x.message; }
    },
  }, h("label", {}, "Name", name), bundle.node, checkNew.button, checkNew.out, err, createButton);
  show(
    h("h1", { text: "Truststores" }),
    h("p", {}, h("a", { id: "revocation-sources", href: "#/revocation", text: "Revocation sources" }), " — other CAs' CRLs and OCSP responders the gateway follows, and how fresh they are"),
    h("p.muted", { text: "Domains use one with truststore = \"registry:NAME\" (the latest version, live within a second) or \"registry:NAME@N\" (pinned)." }),
    tableOf("truststores", ["Name", "Latest version"], list.items.map((t) => h("tr", {},
      h("td", {}, h("a", { href: "#/truststores/" + encodeURIComponent(t.name), text: t.name })),
      h("td", { text: t.latest_version }))), "No truststores in the registry."),
    h("h2", { text: "New truststore" }), form);
}

async function truststore(name, params) {
  const latest = await api("GET", "/v1/truststores/" + encodeURIComponent(name));
  const version = Number(params.get("version") || latest.version);
  const v = version === latest.version ? latest : await api("GET", `/v1/truststores/${encodeURIComponent(name)}/versions/${version}`);
  const previewOut = h("div", { id: "preview" });
  const preview = async () => {
    try {
      const p = await api("GET", `/v1/truststores/${encodeURIComponent(name)}/versions/${version}/preview?days=30`);
      previewOut.replaceChildren(
        h("p", { text: `Of ${p.checked} certificates seen in the last ${p.days} days, ${p.rejected.length} would be refused by version ${p.version}.` }),
        tableOf("preview-rejected", ["Subject", "Domain", "Reason"], p.rejected.map((r) => h("tr", {},
          h("td", { text: r.subject }), h("td", { text: r.domain }), h("td", { text: r.reason + ": " + r.explanation }))), ""));
    } catch (x) { previewOut.replaceChildren(h("p.error", { text: x.message })); }
  };
  const bundle = pemField("bundle_pem", "New version: CA certificates (PEM bundle)");
  const err = h("p.error", { id: "version-error" });
  const addButton = h("button", { type: "submit", text: "Add version (it becomes the latest)" });
  const checkVersion = bundleCheck(() => name, bundle.area, addButton);
  const add = h("form", {
    id: "new-version",
    onsubmit: async (e) => {
      e.preventDefault();
      if (!confirm(`Add a version to ${name}? Domains that use registry:${name} switch to it within a second.`)) return;
      try {
        const r = await api("POST", `/v1/truststores/${encodeURIComponent(name)}/versions`, { bundle_pem: bundle.area.value });
        location.hash = `#/truststores/${encodeURIComponent(name)}?version=${r.version}`;
      } catch (x) { err.textContent = x.message; }
    },
  }, bundle.node, checkVersion.button, checkVersion.out, err, addButton);
  const certs = (v.bundle.match(/-----BEGIN CERTIFICATE-----/g) || []).length;
  // The other versions' certificates, fetched when their section is opened.
  const others = Array.from({ length: latest.version }, (_, i) => latest.version - i).filter((n) => n !== version).map((n) => {
    const body = h("div", { id: `certificates-v${n}-body` }, h("p.muted", { text: "Loading…" }));
    let loaded = false;
    return h("details.version", {
      id: `version-${n}`,
      ontoggle: async (e) => {
        if (!e.target.open || loaded) return;
        loaded = true;
        try {
          const other = n === latest.version ? latest : await api("GET", `/v1/truststores/${encodeURIComponent(name)}/versions/${n}`);
          body.replaceChildren(
            h("p.muted", {}, `Made ${date(other.created_at)}; ${other.crls.length} CRLs. `,
              h("a", { href: `#/truststores/${encodeURIComponent(name)}?version=${n}`, text: "Open this version (preview, activate again)" })),
            truststoreCertificates(`certificates-v${n}`, other));
        } catch (x) { loaded = false; body.replaceChildren(h("p.error", { text: x.message })); }
      },
    }, h("summary", { text: `Version ${n}` + (n === latest.version ? " (latest)" : "") }), body);
  });
  show(
    h("p", {}, h("a", { href: "#/truststores", text: "← Truststores" })),
    h("h1", { text: `Truststore ${name}` }),
    h("p", {}, "Version ", h("select", { id: "version", "aria-label": "Version", onchange: (e) => { location.hash = `#/truststores/${encodeURIComponent(name)}?version=${e.target.value}`; } },
      Array.from({ length: latest.version }, (_, i) => i + 1).map((n) => h("option", { value: n, selected: n === version || undefined, text: n + (n === latest.version ? " (latest)" : "") }))),
    ` — ${certs} CA certificates, ${v.crls.length} CRLs, made ${date(v.created_at)}`),
    h("h2", { text: `Certificates of version ${version}` }),
    truststoreCertificates("truststore-certificates", v),
    h("h2", { text: "Warnings" }),
    v.warnings.length ? h("ul", { id: "warnings" }, v.warnings.map((w) => h("li", { text: w }))) : h("p.muted", { id: "warnings", text: "None." }),
    h("div.actions", {},
      h("button.secondary", { type: "button", id: "preview-button", onclick: preview, text: "Preview: who would this version refuse?" }),
      version === latest.version ? null : h("button", {
        type: "button", id: "activate-version",
        onclick: async () => {
          if (!confirm(`Make version ${version}'s CAs and CRLs live again? They are saved as version ${latest.version + 1}, which domains using registry:${name} take within a second.`)) return;
          try {
            const r = await api("POST", `/v1/truststores/${encodeURIComponent(name)}/versions`, { bundle_pem: v.bundle, crls_pem: v.crls });
            location.hash = `#/truststores/${encodeURIComponent(name)}?version=${r.version}`;
          } catch (x) { flash(x.message, true); }
        },
        text: `Activate version ${version} again`,
      })),
    previewOut,
    others.length ? [h("h2", { text: "Other versions" }), h("div", { id: "other-versions" }, others)] : null,
    h("h2", { text: "Add a version" }), add);
}

// A truststore version's certificates (as the API decodes them: position, subject, issuer, role,
// expiry, SHA-256 id; a duplicate is listed but not used).
function truststoreCertificates(id, v) {
  const list = v.certificates || [];
  if (!v.certificates) return h("p.muted", { id, text: "This server does not list a version's certificates." });
  return tableOf(id, ["#", "Subject", "Issuer", "Role", "Expires", "SHA-256 (id)"], list.map((c) => h("tr", {},
    h("td", { text: c.index }),
    h("td", { text: c.subject }),
    h("td", { text: c.issuer }),
    h("td", {}, h("span.tag", { text: c.role === "anchor" ? "anchor (root)" : c.role }), c.duplicate ? [" ", h("span.tag.dup", { text: "duplicate, not used" })] : null),
    h("td", { text: when(c.not_after) }),
    h("td.mono", { text: c.id }))), "No certificate could be read from this version's bundle.");
}

// ----------------------------------------------------------------------------------------------
// Domains

async function domains() {
  const [list, truststoreList, serverCerts] = await Promise.all([
    api("GET", "/v1/domains"), api("GET", "/v1/truststores"),
    api("GET", "/v1/server-certificates").catch(() => ({ items: [] }))]);
  const form = domainForm({ certificate: "auto", mtls: { mode: "required", truststore: "registry:partners" },
    mapping: [{ base_path: "", upstream: "http://127.0.0.1:8080" }] }, truststoreList.items, serverCerts.items);
  const remove = async (d) => {
    if (!confirm(`Delete ${d.hostname}? Its connections are refused from then on.`)) return;
    try { await api("DELETE", "/v1/domains/" + encodeURIComponent(d.hostname)); flash("Deleted " + d.hostname); route(); } catch (x) { flash(x.message, true); }
  };
  show(
    h("h1", { text: "Domains" }),
    h("p.muted", { text: "Also: portcullis domain put --file D.toml, or PUT /v1/domains/{hostname}." }),
    tableOf("domains", ["Hostname", "Certificate", "mTLS", "Truststore", "Mappings", ""], list.items.map((d) => {
      const s = d.spec || {};
      const m = s.mtls || {};
      return h("tr", {},
        h("td", { text: d.hostname }),
        h("td", { text: s.certificate || "" }),
        h("td", { text: `${m.mode || "off"}${m.on_failure ? ", on failure " + m.on_failure : ""}` }),
        h("td", { text: m.truststore || "—" }),
        h("td", {}, h("ul", {}, (s.mapping || []).map((x) => h("li", { text: `${x.base_path || "/"} → ${x.upstream}` })))),
        h("td", {}, h("button.secondary", { type: "button", "aria-label": "Edit " + d.hostname, onclick: () => form.edit(d), text: "Edit" }), " ",
          h("button.danger", { type: "button", "aria-label": "Delete " + d.hostname, onclick: () => remove(d), text: "Delete" })));
    }), "No domains."),
    h("h2", { id: "domain-form-title", text: "Add or change a domain" }), form.node);
}

// The domain form: the common settings as fields, every other setting kept as it was, and the
// whole specification as JSON under "Advanced" (edits there update the fields, and back).
function domainForm(initial, truststoreItems, serverCertItems) {
  let spec = JSON.parse(JSON.stringify(initial));
  const editing = { version: 0 };
  const host = h("input", { name: "hostname", id: "domain-hostname", required: true, placeholder: "api.example.com", autocomplete: "off" });
  const json = h("textarea", { name: "spec", id: "domain-json", rows: 12, cols: 80, spellcheck: "false", "aria-describedby": "domain-json-help" });
  const jsonError = h("p.error", { id: "domain-json-error" });
  const err = h("p.error", { id: "domain-error", role: "alert" });
  const notes = h("div", { id: "domain-warnings" });
  const fields = h("div.domain-fields", { id: "domain-fields" });
  const sync = () => { json.value = JSON.stringify(spec, null, 2); jsonError.textContent = ""; };
  const labelled = (text, control, help) => h("label", {}, text, control, help ? h("span.help", { text: help }) : null);
  const select = (name, value, options, onchange) => h("select", { name, onchange: (e) => { onchange(e.target.value); sync(); render(); } },
    options.map(([v, t]) => h("option", { value: v, selected: v === value || undefined, text: t })));
  const input = (name, value, oninput, attrs) => h("input", { name, value: value || "", ...(attrs || {}), oninput: (e) => { oninput(e.target.value); sync(); } });
  const certKind = () => {
    const c = spec.certificate || "auto";
    if (c === "auto" || c === "acme") return c;
    if (c.startsWith("registry:")) return "registry";
    return "file";
  };
  const truststoreWarnings = h("div", { id: "truststore-warnings" });
  const showTruststoreWarnings = async (ref) => {
    truststoreWarnings.replaceChildren();
    const m = /^registry:([^@]+)(?:@(\d+))?$/.exec(ref || "");
    if (!m || m[1] === "cas") return;
    try {
      const t = m[2] ? await api("GET", `/v1/truststores/${encodeURIComponent(m[1])}/versions/${m[2]}`) : await api("GET", "/v1/truststores/" + encodeURIComponent(m[1]));
      const n = (t.bundle.match(/-----BEGIN CERTIFICATE-----/g) || []).length;
      truststoreWarnings.replaceChildren(h("p.muted", { text: `${m[1]} version ${t.version}: ${n} CA certificates.` }),
        t.warnings.length ? h("ul.warnings", {}, t.warnings.map((w) => h("li", { text: w }))) : h("p.muted", { text: "No lint warnings." }));
    } catch (x) { truststoreWarnings.replaceChildren(h("p.error", { text: x.message })); }
  };
  const render = () => {
    const kind = certKind();
    const mtls = spec.mtls || { mode: "off" };
    const certDetail = [];
    if (kind === "registry") {
      const names = serverCertItems.map((c) => c.name).filter((n) => !n.startsWith("auto:") && !n.startsWith("acme:"));
      const current = (spec.certificate || "").slice("registry:".length);
      certDetail.push(labelled("Server certificate in the registry", select("registry_certificate", current, [["", "choose…"], ...names.map((n) => [n, n])], (v) => { spec.certificate = "registry:" + v; }),
        names.length ? "" : "None imported yet: upload one below, or `portcullis server-cert import NAME`."));
      const upName = h("input", { name: "upload_name", placeholder: "api-example-com" });
      const upChain = h("textarea", { name: "upload_chain", rows: 4, placeholder: "-----BEGIN CERTIFICATE-----" });
      const upKey = h("textarea", { name: "upload_key", rows: 4, placeholder: "-----BEGIN PRIVATE KEY-----" });
      certDetail.push(h("details.upload", { id: "certificate-upload" }, h("summary", { text: "Upload a certificate and its key" }),
        labelled("Name", upName), labelled("Chain (PEM, leaf first)", upChain), labelled("Private key (PEM; sealed with the cluster key, never shown again)", upKey),
        h("button.secondary", { type: "button", id: "upload-certificate", onclick: async () => {
          try {
            await api("PUT", "/v1/server-certificates/" + encodeURIComponent(upName.value.trim()), { certificate_pem: upChain.value, key_pem: upKey.value });
            serverCertItems.push({ name: upName.value.trim() });
            spec.certificate = "registry:" + upName.value.trim();
            sync(); render();
            flash("Certificate uploaded: " + upName.value.trim());
          } catch (x) { flash(x.message, true); }
        }, text: "Upload and use" })));
    } else if (kind === "file") {
      certDetail.push(labelled("Certificate chain file (on every node)", input("certificate_file", spec.certificate, (v) => { spec.certificate = v; })));
      certDetail.push(labelled("Key file", input("key_file", spec.key, (v) => { spec.key = v; })));
    } else if (kind === "acme") {
      const a = spec.acme || {};
      const setA = (k, v) => { spec.acme = { ...(spec.acme || {}), [k]: v }; if (!v || (Array.isArray(v) && !v.length)) delete spec.acme[k]; };
      certDetail.push(labelled("ACME directory", input("acme_directory", a.directory, (v) => setA("directory", v), { placeholder: "https://acme-v02.api.letsencrypt.org/directory", size: 50 })));
      certDetail.push(labelled("Contact", input("acme_contact", (a.contact || []).join(", "), (v) => setA("contact", v.split(",").map((x) => x.trim()).filter(Boolean)), { placeholder: "mailto:ops@example.com" })));
      certDetail.push(labelled("Challenge", select("acme_challenge", a.challenge || "tls-alpn-01", [["tls-alpn-01", "TLS-ALPN-01 (port 443)"], ["http-01", "HTTP-01 (port 80, [acme] http_listen)"]], (v) => setA("challenge", v))));
    }
    const truststores = [["", "none"], ["registry:cas", "registry:cas (the registered ACTIVE CAs)"],
      ...truststoreItems.map((t) => ["registry:" + t.name, `registry:${t.name} (latest, v${t.latest_version})`])];
    if (mtls.truststore && !truststores.some(([v]) => v === mtls.truststore)) truststores.push([mtls.truststore, mtls.truststore]);
    const mappings = spec.mapping || [];
    const row = (m, i) => h("tr", {},
      h("td", {}, h("input", { name: `base_path_${i}`, "aria-label": `Mapping ${i + 1} base path`, value: m.base_path || "", placeholder: "/ (all)", size: 12, oninput: (e) => { m.base_path = e.target.value; sync(); } })),
      h("td", {}, h("input", { name: `upstream_${i}`, "aria-label": `Mapping ${i + 1} upstream`, value: m.upstream || "", placeholder: "http://10.0.0.5:8080", size: 28, required: true, oninput: (e) => { m.upstream = e.target.value; sync(); } })),
      h("td", {}, h("select", { name: `client_certificate_${i}`, "aria-label": `Mapping ${i + 1} client certificate`, onchange: (e) => { m.client_certificate = e.target.value; sync(); } },
        ["required", "optional"].map((v) => h("option", { value: v, selected: (m.client_certificate || "required") === v || undefined, text: v })))),
      h("td", {}, h("select", { name: `authorization_${i}`, "aria-label": `Mapping ${i + 1} authorization`, onchange: (e) => { m.authorization = e.target.value; sync(); } },
        [["none", "none"], ["policy", "policy"]].map(([v, t]) => h("option", { value: v, selected: (m.authorization || "none") === v || undefined, text: t })))),
      h("td", {}, h("select", { name: `upstream_protocol_${i}`, "aria-label": `Mapping ${i + 1} upstream protocol`, onchange: (e) => { m.upstream_protocol = e.target.value; if (m.upstream_protocol === "http1") delete m.upstream_protocol; sync(); } },
        [["http1", "HTTP/1.1"], ["h2c", "HTTP/2 (h2c)"], ["h2", "HTTP/2 over TLS"]].map(([v, t]) => h("option", { value: v, selected: (m.upstream_protocol || "http1") === v || undefined, text: t })))),
      h("td", {}, h("button.secondary", { type: "button", "aria-label": `Remove mapping ${i + 1}`, onclick: () => { mappings.splice(i, 1); spec.mapping = mappings; sync(); render(); }, text: "Remove" })));
    fields.replaceChildren(
      h("fieldset", {}, h("legend", { text: "Server certificate" }),
        labelled("Certificate", select("certificate_kind", kind, [["auto", "auto (the local CA)"], ["acme", "ACME (Let's Encrypt or another CA)"], ["registry", "from the registry (or upload)"], ["file", "files on every node"]], (v) => {
          if (v === "auto" || v === "acme") { spec.certificate = v; delete spec.key; } else if (v === "registry") { spec.certificate = "registry:"; delete spec.key; } else { spec.certificate = ""; }
          if (v !== "acme") delete spec.acme;
        })),
        certDetail,
        labelled("Security policy", select("security_policy", spec.security_policy || "TLS_1_2", [["TLS_1_2", "TLS_1_2 (TLS 1.2 and 1.3)"], ["TLS_1_3", "TLS_1_3"], ["TLS_1_3_PQ", "TLS_1_3_PQ (post-quantum key exchange only)"], ["TLS_1_2_ONLY", "TLS_1_2_ONLY"]], (v) => { spec.security_policy = v; }))),
      h("fieldset", {}, h("legend", { text: "Mutual TLS" }),
        labelled("Client certificates", select("mtls_mode", mtls.mode || "off", [["off", "off (none asked)"], ["required", "required"], ["optional", "optional (per mapping)"]], (v) => {
          if (v === "off") delete spec.mtls; else spec.mtls = { ...(spec.mtls || {}), mode: v };
        })),
        mtls.mode && mtls.mode !== "off" ? [
          labelled("Truststore", select("truststore", mtls.truststore || "", truststores, (v) => { spec.mtls.truststore = v || undefined; if (!v) delete spec.mtls.truststore; })),
          truststoreWarnings,
          labelled("Registry", select("registry_mode", spec.registry_mode || "off", [["off", "off (truststore only)"], ["revocation", "revocation (refuse REVOKED, INACTIVE)"], ["registered", "registered (only registered ACTIVE certificates)"]], (v) => { spec.registry_mode = v; }))] : null),
      h("fieldset", {}, h("legend", { text: "Mappings (longest base path first)" }),
        h("table.mappings", { id: "domain-mappings", tabindex: 0 },
          h("thead", {}, h("tr", {}, ["Base path", "Upstream", "Client certificate", "Authorization", "Upstream protocol", ""].map((t) => h("th", { text: t })))),
          h("tbody", {}, mappings.map(row))),
        h("button.secondary", { type: "button", id: "add-mapping", onclick: () => { spec.mapping = [...mappings, { base_path: "", upstream: "" }]; sync(); render(); }, text: "Add mapping" })));
    if (mtls.mode && mtls.mode !== "off") showTruststoreWarnings(mtls.truststore);
  };
  json.addEventListener("input", () => {
    try {
      const parsed = JSON.parse(json.value);
      if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new Error("the specification is a JSON object");
      spec = parsed;
      jsonError.textContent = "";
      render();
    } catch (x) { jsonError.textContent = "Not JSON yet: " + x.message; }
  });
  const node = h("form", {
    id: "edit-domain",
    onsubmit: async (e) => {
      e.preventDefault();
      err.textContent = "";
      notes.replaceChildren();
      let parsed;
      try { parsed = JSON.parse(json.value); } catch (x) { err.textContent = "Not JSON: " + x.message; return; }
      try {
        const r = await api("PUT", "/v1/domains/" + encodeURIComponent(host.value.trim()), { spec: parsed, expected_version: editing.version });
        flash("Domain saved: " + host.value + " (live within a second)");
        const warnings = (r && r.warnings) || [];
        if (warnings.length) flash("Domain saved, with truststore warnings: " + warnings.join("; "));
        route();
      } catch (x) { err.textContent = x.message; }
    },
  }, labelled("Hostname", host), fields,
  h("details.raw", { id: "domain-advanced" }, h("summary", { text: "Advanced: the specification as JSON" }),
    h("p.muted", { id: "domain-json-help", text: "Every setting of the [[domain]] table (docs/configuration.md); the fields above and this text follow each other." }),
    labelled("The [[domain]] table, as JSON (checked by the gateway before it is stored)", json), jsonError),
  err, notes, h("button", { type: "submit", text: "Save domain" }));
  const edit = (d) => {
    host.value = d.hostname;
    spec = { ...d.spec };
    delete spec.hostname;
    editing.version = d.version;
    sync(); render();
    node.scrollIntoView();
    host.focus();
  };
  sync(); render();
  return { node, edit };
}

// ----------------------------------------------------------------------------------------------
// Webhooks

async function webhooks() {
  const list = await api("GET", "/v1/webhooks");
  const sections = await Promise.all(list.items.map(async (w) => {
    const d = await api("GET", `/v1/webhooks/${encodeURIComponent(w.id)}/deliveries?limit=50`);
    const replay = async (id) => {
      try { await api("POST", `/v1/deliveries/${encodeURIComponent(id)}/replay`, {}); flash("Replay queued"); route(); } catch (x) { flash(x.message, true); }
    };
    return [
      h("h2", { text: `${w.name} → ${w.url}` }),
      h("p.muted", { text: `events: ${w.events.join(", ")}${w.topic_filter ? "; topics " + w.topic_filter : ""}; ${w.enabled ? "enabled" : "disabled"}` }),
      tableOf("deliveries-" + w.id, ["Event", "Status", "Attempts", "Last answer", "Updated", ""], d.items.map((x) => h("tr", {},
        h("td", { text: x.event_type }),
        h("td", { text: x.status }),
        h("td", { text: x.attempts }),
        h("td", { text: x.last_status ? `HTTP ${x.last_status}` : (x.last_error || "—") }),
        h("td", { text: date(x.updated_at) }),
        h("td", {}, h("button.secondary", { type: "button", onclick: () => replay(x.id), text: "Replay" })))), "No deliveries yet."),
    ];
  }));
  show(h("h1", { text: "Webhooks" }),
    list.items.length ? sections.flat() : h("p.muted", { text: "No webhooks. Create one with portcullis webhook create." }));
}

// ----------------------------------------------------------------------------------------------
// Live HTTP connections

async function connections() {
  const list = await api("GET", "/v1/connections");
  const close = async (c) => {
    if (!confirm(`Close the connection from ${c.peer} (${c.client_subject || "no certificate"})? Requests in flight are cut.`)) return;
    try { await api("DELETE", "/v1/connections/" + c.id); flash("Connection closed"); route(); } catch (x) { flash(x.message, true); }
  };
  show(
    h("h1", { text: "Open connections" }),
    tableOf("connections", ["Peer", "Domain", "Protocol", "Client certificate", "Verify", "Since", ""], list.items.map((c) => h("tr", {},
      h("td.mono", { text: c.peer }),
      h("td", { text: c.domain }),
      h("td", { text: c.protocol }),
      h("td", { text: c.client_subject || "—" }),
      h("td", { text: c.verify }),
      h("td", { text: date(c.since) }),
      h("td", {}, h("button.danger", { type: "button", onclick: () => close(c), text: "Disconnect" })))), "No open HTTP connections."));
}

// ----------------------------------------------------------------------------------------------
// Other CAs' revocation sources (fetched off the handshake path)

async function revocation() {
  const list = await api("GET", "/v1/revocation/sources");
  const secs = (s) => (s === null || s === undefined) ? "—" : s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
  const crls = list.items.filter((s) => s.kind === "crl");
  const responders = list.items.filter((s) => s.kind === "ocsp");
  const failing = list.items.find((s) => s.kind === "ocsp-failures");
  show(
    h("h1", { text: "Revocation sources" }),
    h("p.muted", { text: "CRLs fetched from the distribution points of the certificates domains verify, and OCSP responders asked about them (mtls.revocation). The handshake only reads what is here." }),
    h("h2", { text: "CRL distribution points" }),
    tableOf("crl-sources", ["URL", "Fetched", "Next update", "CRL number", "Revoked", "State"], crls.map((s) => h("tr", {},
      h("td.mono", { text: s.url }),
      h("td", { text: secs(s.age_seconds) }),
      h("td", { text: s.next_update ? date(s.next_update) : "—" }),
      h("td", { text: s.crl_number || "—" }),
      h("td", { text: s.revoked === null ? "—" : String(s.revoked) }),
      h(s.last_error || s.stale ? "td.error" : "td", { text: s.last_error ? `failing: ${s.last_error}` : s.stale ? "past nextUpdate" : "fresh" }))),
      "No CRL distribution point followed."),
    h("h2", { text: "OCSP responders" }),
    tableOf("ocsp-sources", ["URL", "Certificates", "Good", "Revoked", "Unknown", "Oldest answer"], responders.map((s) => h("tr", {},
      h("td.mono", { text: s.url }),
      h("td", { text: String(s.certificates) }),
      h("td", { text: String(s.good) }),
      h("td", { text: String(s.revoked) }),
      h("td", { text: String(s.unknown) }),
      h("td", { text: secs(s.oldest_answer_seconds) }))),
      "No OCSP responder asked."),
    failing ? h("p.error", { text: `${failing.certificates} certificate(s) without an answer; last error: ${failing.last_error}` }) : null);
}

// ----------------------------------------------------------------------------------------------
// MQTT sessions

async function sessions() {
  const list = await api("GET", "/v1/sessions");
  const close = async (s, forget) => {
    if (!confirm(`Disconnect ${s.client_id}${forget ? " and forget its session" : ""}?`)) return;
    try {
      await api("DELETE", "/v1/sessions/" + encodeURIComponent(s.client_id) + (forget ? "?forget=true" : ""));
      flash("Disconnected " + s.client_id);
      route();
    } catch (x) { flash(x.message, true); }
  };
  show(
    h("h1", { text: "MQTT sessions" }),
    tableOf("sessions", ["Client id", "State", "Identity", "Subscriptions", "Queued", "For", ""], list.items.map((s) => h("tr", {},
      h("td.mono", { text: s.client_id }),
      h("td", { text: s.online ? "online" : "offline (kept)" }),
      h("td", { text: s.identity }),
      h("td.mono", { text: s.subscriptions.join(" ") }),
      h("td", { text: s.queued }),
      h("td", { text: s.seconds + " s" }),
      h("td", {}, h("button.danger", { type: "button", onclick: () => close(s, false), text: "Disconnect" }),
        " ", h("button.secondary", { type: "button", onclick: () => close(s, true), text: "Forget" })))), "No MQTT sessions."));
}

// ----------------------------------------------------------------------------------------------
// Explain

async function explain() {
  const domains = await api("GET", "/v1/domains");
  const domain = h("select", { name: "domain" }, domains.items.map((d) => h("option", { value: d.hostname.replace(/^\*\./, "x."), text: d.hostname })));
  const method = h("select", { name: "method" }, ["GET", "POST", "PUT", "PATCH", "DELETE"].map((m) => h("option", { value: m, text: m })));
  const path = h("input", { name: "path", value: "/", size: 30 });
  const pem = pemField("certificate_pem", "Client certificate chain (PEM, leaf first)");
  const out = h("div", { id: "explained" });
  const form = h("form", {
    id: "explain",
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const t = await api("POST", "/v1/explain", { domain: domain.value, method: method.value, path: path.value, certificate_pem: pem.area.value });
        const row = (k, v) => h("tr", {}, h("th", { text: k }), h("td", { text: v === undefined || v === null ? "—" : typeof v === "string" ? v : JSON.stringify(v) }));
        out.replaceChildren(
          h("p", { id: "decision", class: t.decision === "allow" ? "status-ACTIVE" : "status-REVOKED", text: t.decision.toUpperCase() + ": " + t.summary }),
          h("table", {},
            row("Domain", t.domain && `${t.domain.hostname} (by ${t.domain.matched_by}, mTLS ${t.domain.mtls_mode}, on failure ${t.domain.on_failure})`),
            row("Chain", t.chain && (t.chain.result + (t.chain.reason ? ": " + t.chain.reason : ""))),
            row("Chain explanation", t.chain && t.chain.explanation),
            row("Registry", t.registry && (t.registry.decision + (t.registry.reason ? ": " + t.registry.reason : ""))),
            row("Registry record", t.registry_record),
            row("Mapping", t.mapping),
            row("Policy", t.policy && (t.policy.decision + ": " + t.policy.reason)),
            row("Outcome", t.outcome)),
          h("details", {}, h("summary", { text: "Whole trace (JSON)" }), h("pre.mono", { text: JSON.stringify(t, null, 2) })));
      } catch (x) { out.replaceChildren(h("p.error", { text: x.message })); }
    },
  },
  h("div.inline", {}, h("label", {}, "Domain", domain), h("label", {}, "Method", method), h("label", {}, "Path", path)),
  pem.node,
  h("button", { type: "submit", text: "Explain" }));
  show(h("h1", { text: "Explain a decision" }),
    h("p.muted", { text: "Paste or upload the certificate a client presents: see what the gateway would do with it, step by step, on the live configuration." }),
    form, out);
}

// ----------------------------------------------------------------------------------------------
// Device enrollment

function download(file, type) {
  const bytes = Uint8Array.from(atob(file.base64), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type }));
  return { href: url, download: file.name };
}

async function enroll() {
  const cn = h("input", { name: "common_name", required: true, placeholder: "laptop-0042" });
  const days = h("input", { name: "days", type: "number", min: 1, max: 3650, value: 365, size: 5 });
  const password = h("input", { name: "password", type: "password", required: true, minlength: 8, autocomplete: "new-password" });
  const origin = h("input", { name: "origin", value: "https://app.example.com", size: 28 });
  const embed = h("input", { type: "checkbox", name: "embed_password" });
  const result = h("div", { id: "enrolled" });
  const form = h("form.inline", {
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const embedded = embed.checked;
        const r = await api("POST", "/v1/enrollments", { common_name: cn.value, days: Number(days.value), password: password.value, embed_password: embedded });
        const f = r.files;
        const policy = JSON.stringify({ pattern: origin.value, filter: { ISSUER: { CN: r.issuer_cn || "" } } });
        const link = (id, file, type, text) => h("a", { id, ...download(file, type), text });
        result.replaceChildren(
          h("p", {}, "Issued ", h("a", { href: "#/certificates/" + encodeURIComponent(r.certificate.id), text: r.certificate.subject }),
            " (ACTIVE). The files below hold its private key and are shown only now."),
          h("div.actions", {},
            link("download-p12", f.p12, "application/x-pkcs12", "Download .p12"),
            link("download-p12-legacy", f.p12_legacy, "application/x-pkcs12", "Download .p12 (legacy: macOS before 14, Windows 7)"),
            link("download-mobileconfig", f.mobileconfig, "application/x-apple-aspen-config", "Download .mobileconfig")),
          h("h2", { text: "macOS" }),
          h("p", { text: "Push the .mobileconfig with your MDM, or open it and install it in System Settings → Privacy & Security → Profiles. It holds the certificate, its key " +
            (embedded ? "(protected by the password, which the profile carries for a silent install: send it only through MDM)" : "(protected by the password, which is asked for at install unless your MDM supplies it)") +
            " and the CA. By hand: Keychain Access → File → Import Items → the .p12 (legacy for macOS 13 and earlier), into the login keychain." }),
          h("h2", { text: "Windows" }),
          h("p", { text: "Open the .p12 and import it into Current User → Personal, or run: Import-PfxCertificate -FilePath " + f.p12.name + " -CertStoreLocation Cert:\\CurrentUser\\My -Password (Read-Host -AsSecureString)" }),
          h("h2", { text: "Chrome and Edge: pick the certificate without asking" }),
          h("p", { text: "Set the AutoSelectCertificateForUrls policy (Windows: HKLM\\Software\\Policies\\Google\\Chrome\\AutoSelectCertificateForUrls\\1; macOS: com.google.Chrome profile; Linux: /etc/opt/chrome/policies/managed/*.json) to:" }),
          h("pre.mono", { id: "chrome-policy", text: JSON.stringify({ AutoSelectCertificateForUrls: [policy] }, null, 2) }));
        password.value = "";
        flash("Device enrolled: " + r.certificate.subject);
      } catch (x) { flash(x.message, true); }
    },
  },
  h("label", {}, "Device name (common name)", cn),
  h("label", {}, "Days", days),
  h("label", {}, "Bundle password (8+ characters)", password),
  h("label", {}, "App URL (for the Chrome policy)", origin),
  h("label", {}, h("span", {}, embed, " Write the password into the .mobileconfig (silent MDM install)")),
  h("button", { type: "submit", text: "Issue and package" }));
  show(
    h("h1", { text: "Enroll a device" }),
    h("p.muted", { text: "Issues a client certificate with the local CA, registers it ACTIVE, and packages it for keychains, browsers and MDM." }),
    form, result,
    h("h2", { text: "Or: the device makes its own key (SCEP)" }),
    h("p.muted", { text: "A .mobileconfig whose SCEP payload makes the device generate a key that never leaves it and enroll with a one-time challenge, under a provisioning template (which names its thing, attributes and policies). Needs a builtin:scep mapping on a domain with optional mutual TLS." }),
    await scepEnrollForm());
}

async function scepEnrollForm() {
  const [templates, domains] = await Promise.all([api("GET", "/v1/provisioning-templates"), api("GET", "/v1/domains")]);
  let url = "https://" + location.hostname + "/scep";
  for (const d of domains.items || []) {
    for (const m of ((d.spec || {}).mapping || [])) {
      if (m.upstream === "builtin:scep") url = "https://" + d.hostname.replace(/^\*\./, "") + (m.base_path || "");
    }
  }
  const enabled = templates.items.filter((t) => t.enabled);
  const template = h("select", { name: "scep_template" }, enabled.map((t) => h("option", { value: t.name, text: t.name })));
  const scepUrl = h("input", { name: "scep_url", value: url, size: 36, required: true });
  const cn = h("input", { name: "scep_common_name", required: true, placeholder: "laptop-0043" });
  const result = h("div", { id: "scep-enrolled" });
  if (!enabled.length) return h("p", { id: "scep-enroll", text: "No enabled provisioning template yet: create one on the Provisioning page." });
  return h("div", {}, h("form.inline", {
    id: "scep-enroll",
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        const r = await api("POST", "/v1/enrollments/scep", { template: template.value, scep_url: scepUrl.value, common_name: cn.value });
        result.replaceChildren(
          h("p", { text: `One-time challenge for template ${r.template}, good until ${date(r.expires_at)}. Nothing is issued until the device enrolls; its certificate is then registered ACTIVE and attached by the template.` }),
          h("div.actions", {}, h("a", { id: "download-scep-mobileconfig", ...download(r.files.mobileconfig, "application/x-apple-aspen-config"), text: "Download .mobileconfig (SCEP)" })));
        flash("SCEP profile made for " + cn.value);
      } catch (x) { flash(x.message, true); }
    },
  },
  h("label", {}, "Template", template),
  h("label", {}, "SCEP URL", scepUrl),
  h("label", {}, "Device name (common name)", cn),
  h("button", { type: "submit", text: "Make SCEP profile" })), result);
}

// ----------------------------------------------------------------------------------------------
// Audit log

async function audit(params) {
  const q = new URLSearchParams({ limit: "200" });
  if (params.get("target")) q.set("target", params.get("target"));
  const log = await api("GET", "/v1/audit?" + q.toString());
  show(
    h("h1", { text: "Audit log" }),
    tableOf("audit", ["When", "Who", "Action", "Target", "Change"], log.items.map((e) => h("tr", {},
      h("td", { text: date(e.at) }),
      h("td", { text: e.actor }),
      h("td", { text: e.action }),
      h("td.mono", { text: e.target }),
      h("td.mono", { text: describeChange(e) }))), "No changes recorded yet."));
}

function describeChange(e) {
  try {
    const before = e.before ? JSON.parse(e.before) : null;
    const after = e.after ? JSON.parse(e.after) : null;
    if (before && after && before.status !== after.status) return `${before.status} → ${after.status}`;
    if (after && after.status) return after.status;
  } catch (_) { /* not JSON: shown as is */ }
  return e.after || "";
}

// ----------------------------------------------------------------------------------------------
// Routing

function stopTimer() { if (state.timer) { clearInterval(state.timer); state.timer = null; } }

async function route() {
  if (!state.caller) return;
  stopTimer();
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  for (const a of document.querySelectorAll("#nav a")) {
    const target = a.getAttribute("href").slice(1);
    a.classList.toggle("active", target === "/" ? path === "/" : path.startsWith(target));
  }
  try {
    if (path === "/" || path === "") {
      await dashboard();
      state.timer = setInterval(() => dashboard().catch(() => stopTimer()), 5000);
    } else if (path === "/certificates") await certificates(params);
    else if (path.startsWith("/certificates/")) await certificate(decodeURIComponent(path.slice("/certificates/".length)));
    else if (path === "/audit") await audit(params);
    else if (path === "/enroll") await enroll();
    else if (path === "/cas") await cas();
    else if (path === "/sessions") await sessions();
    else if (path === "/connections") await connections();
    else if (path === "/revocation") await revocation();
    else if (path === "/things") await things();
    else if (path.startsWith("/things/")) await thing(decodeURIComponent(path.slice("/things/".length)));
    else if (path === "/truststores") await truststores();
    else if (path.startsWith("/truststores/")) await truststore(decodeURIComponent(path.slice("/truststores/".length)), params);
    else if (path === "/domains") await domains();
    else if (path === "/webhooks") await webhooks();
    else if (path === "/policies") await policies();
    else if (path.startsWith("/policies/")) await policy(decodeURIComponent(path.slice("/policies/".length)));
    else if (path === "/provisioning") await provisioning();
    else if (path === "/explain") await explain();
    else show(h("h1", { text: "Not found" }), h("p", {}, h("a", { href: "#/", text: "Dashboard" })));
  } catch (x) {
    if (x.status !== 401) show(h("h1", { text: "Something went wrong" }), h("p.error", { text: x.message }));
  }
}

async function start() {
  document.getElementById("logout").addEventListener("click", async () => {
    try { await api("POST", "/ui/logout"); } catch (_) { /* signed out anyway */ }
    state.caller = null; state.csrf = "";
    loginPage("Signed out.");
  });
  window.addEventListener("hashchange", route);
  try {
    const s = await api("GET", "/ui/session");
    state.caller = s.caller; state.csrf = s.csrf;
    signedIn();
  } catch (x) {
    // A 401 has shown the sign-in page already; anything else must not leave "Loading…".
    if (x.status !== 401) loginPage("Cannot reach the console's API: " + x.message);
  }
}

document.addEventListener("DOMContentLoaded", start);
