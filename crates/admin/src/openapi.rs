//! The OpenAPI 3.1 document of the admin API, served at `/openapi.json`. The whole-product tests
//! call every operation listed here and check the router serves it, and that methods not listed
//! are refused.

use serde_json::{Map, Value, json};

/// Every operation: method, path, summary, request body schema (if any).
pub const OPERATIONS: &[(&str, &str, &str, Option<&str>)] = &[
    ("get", "/healthz", "Liveness (no authentication)", None),
    (
        "get",
        "/readyz",
        "Readiness: 200 when the gateway is serving",
        None,
    ),
    ("get", "/metrics", "Prometheus metrics", None),
    ("get", "/openapi.json", "This document", None),
    (
        "get",
        "/v1/registration-code",
        "The CA registration code (CN of verification certificates)",
        None,
    ),
    ("get", "/v1/cas", "List registered CAs", None),
    (
        "post",
        "/v1/cas",
        "Register a CA with proof of possession",
        Some("RegisterCa"),
    ),
    ("get", "/v1/cas/{id}", "Describe a registered CA", None),
    (
        "patch",
        "/v1/cas/{id}",
        "Change a CA's status, auto-registration or provisioning template; optionally revoke what it issued",
        Some("UpdateCa"),
    ),
    (
        "get",
        "/v1/certificates",
        "List certificates (filters: status, ca, thing, expiring_before; pagination: limit, after)",
        None,
    ),
    (
        "post",
        "/v1/certificates",
        "Register a certificate, sign a CSR, or make a key and certificate with the local CA",
        Some("CreateCertificate"),
    ),
    (
        "post",
        "/v1/certificates/batch",
        "Register up to 1,000 certificates in one transaction (bulk registration); each item's outcome",
        Some("RegisterBatch"),
    ),
    (
        "post",
        "/v1/enrollments",
        "Enroll a device: issue a client certificate with the local CA (ACTIVE) and answer once with .p12 (modern and legacy) and an Apple .mobileconfig, base64",
        Some("Enrollment"),
    ),
    (
        "post",
        "/v1/enrollments/scep",
        "Enroll a device by SCEP: a one-time challenge for a provisioning template and an Apple .mobileconfig whose SCEP payload makes the device generate its own key, base64",
        Some("ScepEnrollment"),
    ),
    (
        "get",
        "/v1/certificates/{id}",
        "Describe a certificate",
        None,
    ),
    (
        "patch",
        "/v1/certificates/{id}",
        "Change a certificate's status",
        Some("UpdateCertificate"),
    ),
    (
        "delete",
        "/v1/certificates/{id}",
        "Delete a certificate that is not ACTIVE",
        None,
    ),
    ("get", "/v1/things", "List things", None),
    ("post", "/v1/things", "Create a thing", Some("CreateThing")),
    ("get", "/v1/things/{name}", "Describe a thing", None),
    (
        "patch",
        "/v1/things/{name}",
        "Set or remove (null) attributes",
        Some("UpdateThing"),
    ),
    (
        "delete",
        "/v1/things/{name}",
        "Delete a thing with no certificates attached",
        None,
    ),
    (
        "put",
        "/v1/things/{name}/certificates/{id}",
        "Attach a certificate (query: exclusive=true)",
        None,
    ),
    (
        "delete",
        "/v1/things/{name}/certificates/{id}",
        "Detach a certificate",
        None,
    ),
    (
        "get",
        "/v1/truststores",
        "List truststores with their latest version",
        None,
    ),
    (
        "post",
        "/v1/truststores",
        "Create a truststore (version 1)",
        Some("CreateTruststore"),
    ),
    (
        "get",
        "/v1/truststores/{name}",
        "The latest version of a truststore",
        None,
    ),
    (
        "post",
        "/v1/truststores/{name}/versions",
        "Add a version",
        Some("AddTruststoreVersion"),
    ),
    (
        "get",
        "/v1/truststores/{name}/versions/{version}",
        "One version",
        None,
    ),
    (
        "delete",
        "/v1/truststores/{name}",
        "Delete a truststore that no domain uses (every version)",
        None,
    ),
    (
        "get",
        "/v1/truststores/{name}/versions/{version}/preview",
        "Impact preview: certificates seen in the last `days` days, on the domains that use this truststore, that this version would reject",
        None,
    ),
    (
        "post",
        "/v1/truststores/{name}/preview",
        "Impact preview of a bundle before it is stored: certificates seen on the domains that use this truststore that it would reject",
        Some("PreviewTruststore"),
    ),
    (
        "get",
        "/v1/audit",
        "Audit log, newest first (filters: action prefix, target; pagination: limit, before)",
        None,
    ),
    (
        "get",
        "/v1/tokens",
        "List admin tokens (never the secrets)",
        None,
    ),
    (
        "post",
        "/v1/tokens",
        "Make an admin token; the secret is returned once",
        Some("CreateToken"),
    ),
    ("delete", "/v1/tokens/{id}", "Delete an admin token", None),
    (
        "get",
        "/v1/admin/certificates",
        "Admin client certificates: this node's current one, those rotations issued, those revoked",
        None,
    ),
    (
        "post",
        "/v1/admin/certificates/rotate",
        "Issue a new admin client certificate (returned once, and put in the node's data dir) and revoke the one it replaces",
        None,
    ),
    (
        "post",
        "/v1/admin/certificates/{id}/revoke",
        "Revoke an admin client certificate (not the node's current one: rotate it)",
        None,
    ),
    ("get", "/v1/policies", "List policies", None),
    (
        "post",
        "/v1/policies",
        "Create a policy (version 1, the default); the document is validated",
        Some("CreatePolicy"),
    ),
    (
        "get",
        "/v1/policies/{name}",
        "A policy: versions, targets, and the default document (query: version)",
        None,
    ),
    (
        "patch",
        "/v1/policies/{name}",
        "Make a kept version the default",
        Some("UpdatePolicy"),
    ),
    (
        "delete",
        "/v1/policies/{name}",
        "Delete a policy attached to nothing",
        None,
    ),
    (
        "post",
        "/v1/policies/{name}/versions",
        "Add a version (at most 5 kept), optionally the new default",
        Some("CreatePolicyVersion"),
    ),
    (
        "delete",
        "/v1/policies/{name}/versions/{version}",
        "Delete a version that is not the default",
        None,
    ),
    (
        "put",
        "/v1/policies/{name}/targets/{type}/{target}",
        "Attach to a certificate, thing, ca or domain",
        None,
    ),
    (
        "delete",
        "/v1/policies/{name}/targets/{type}/{target}",
        "Detach",
        None,
    ),
    (
        "post",
        "/v1/simulate",
        "Evaluate the policies attached to a certificate (or named ones) for an action on a resource",
        Some("Simulate"),
    ),
    (
        "get",
        "/v1/sessions",
        "MQTT sessions: client id, online, identity, subscriptions, queued messages",
        None,
    ),
    (
        "get",
        "/v1/revocation/sources",
        "Other CAs' revocation sources this node follows: each CRL distribution point (age, nextUpdate, CRL number, entries, last error) and each OCSP responder (certificates, answers by status, oldest answer)",
        None,
    ),
    (
        "get",
        "/v1/connections",
        "The open HTTP connections: peer, domain, protocol, client certificate, since",
        None,
    ),
    (
        "delete",
        "/v1/connections/{id}",
        "Close an open HTTP connection",
        None,
    ),
    (
        "delete",
        "/v1/sessions/{client_id}",
        "Disconnect an MQTT session (query: forget=true also drops the stored session)",
        None,
    ),
    ("get", "/v1/webhooks", "List webhooks", None),
    (
        "post",
        "/v1/webhooks",
        "Subscribe a URL to events; the signing secret is returned once",
        Some("CreateWebhook"),
    ),
    (
        "get",
        "/v1/webhooks/{id}",
        "Describe a webhook (by id or name)",
        None,
    ),
    (
        "patch",
        "/v1/webhooks/{id}",
        "Change a webhook's URL, events, CA bundle, expiry horizon or enable it",
        Some("UpdateWebhook"),
    ),
    ("delete", "/v1/webhooks/{id}", "Delete a webhook", None),
    (
        "get",
        "/v1/webhooks/{id}/deliveries",
        "A webhook's deliveries, newest first (query: status, limit)",
        None,
    ),
    (
        "get",
        "/v1/deliveries/{id}",
        "One delivery with its event and attempts",
        None,
    ),
    (
        "post",
        "/v1/deliveries/{id}/replay",
        "Send a delivery's event again, as a new delivery",
        None,
    ),
    (
        "post",
        "/v1/expiry-check",
        "Look for expiring certificates and CAs now (also done daily)",
        None,
    ),
    (
        "get",
        "/v1/cluster",
        "The nodes: version, heartbeat, snapshot freshness, changes behind, connections and sessions",
        None,
    ),
    (
        "get",
        "/v1/metrics/history",
        "The last hour, every 10 s: handshakes/s (ok, failed), requests/s by status class, p50/p99 latency, connections and MQTT sessions; failures by reason over the hour",
        None,
    ),
    (
        "post",
        "/v1/cluster/nats-certificates",
        "Issue a NATS server's certificate (server and client) from the cluster CA; the key is answered once",
        Some("NatsCertificate"),
    ),
    (
        "get",
        "/v1/renewal",
        "How renewal stands: certificates due (past their template's due point, two thirds of their lifetime by default, not renewed), in grace (expired, may only renew), overdue (expired while ACTIVE, past any grace), renewals issued",
        None,
    ),
    (
        "post",
        "/v1/certificates/{id}/renew",
        "Renew a certificate with the local CA (a new key answered once, or the device's CSR); the new one goes where the old one is, which becomes INACTIVE once the new one is seen",
        Some("RenewCertificate"),
    ),
    (
        "put",
        "/v1/certificates/{id}/claim",
        "Make a certificate a claim certificate: it may then only provision devices under the templates named",
        Some("Claim"),
    ),
    (
        "delete",
        "/v1/certificates/{id}/claim",
        "Make a claim certificate an ordinary one again",
        None,
    ),
    (
        "get",
        "/v1/provisioning-templates",
        "List fleet provisioning templates",
        None,
    ),
    (
        "post",
        "/v1/provisioning-templates",
        "Create a fleet provisioning template (devices call RegisterThing with its name)",
        Some("CreateFleetTemplate"),
    ),
    (
        "get",
        "/v1/provisioning-templates/{name}",
        "A fleet provisioning template",
        None,
    ),
    (
        "patch",
        "/v1/provisioning-templates/{name}",
        "Change a template's description, document, or whether devices may use it",
        Some("UpdateFleetTemplate"),
    ),
    (
        "post",
        "/v1/provisioning-templates/{name}/enrollment-codes",
        "One-time enrollment codes for EST simpleenroll with HTTP Basic authentication (answered once)",
        Some("EnrollmentCodes"),
    ),
    (
        "delete",
        "/v1/provisioning-templates/{name}",
        "Delete a fleet provisioning template",
        None,
    ),
    (
        "get",
        "/v1/server-certificates",
        "List server certificates kept in the registry (chains; keys are never answered)",
        None,
    ),
    (
        "get",
        "/v1/server-certificates/{name}",
        "Describe a server certificate and the domains serving it",
        None,
    ),
    (
        "put",
        "/v1/server-certificates/{name}",
        "Import or replace a server certificate: the key is sealed under the node's cluster key",
        Some("PutServerCertificate"),
    ),
    (
        "delete",
        "/v1/server-certificates/{name}",
        "Delete a server certificate no domain serves",
        None,
    ),
    (
        "get",
        "/v1/domains",
        "List domains (the registry is their source of truth once seeded from the configuration file)",
        None,
    ),
    ("get", "/v1/domains/{hostname}", "Describe a domain", None),
    (
        "put",
        "/v1/domains/{hostname}",
        "Create or replace a domain; checked by the gateway before it is stored, live within a second",
        Some("PutDomain"),
    ),
    (
        "delete",
        "/v1/domains/{hostname}",
        "Delete a domain (query: expected_version)",
        None,
    ),
    (
        "post",
        "/v1/explain",
        "The gateway's decision trace for a certificate on a domain",
        Some("Explain"),
    ),
];

/// The document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for (method, path, summary, body) in OPERATIONS {
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": summary,
            "parameters": params,
            "responses": {
                "200": {"description": "Success"},
                "4XX": {"description": "The caller's mistake", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "5XX": {"description": "Ours", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        });
        if *path != "/healthz" {
            op["security"] = json!([{"adminCertificate": []}, {"bearerToken": []}]);
        }
        if let Some(schema) = body {
            op["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}},
            });
        }
        entry[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Portcullis admin API", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "adminCertificate": {"type": "mutualTLS", "description": "The admin client certificate made at first start (DATA_DIR/admin/)"},
                "bearerToken": {"type": "http", "scheme": "bearer", "description": "`portcullis admin token create`"},
            },
            "schemas": schemas(),
        },
    })
}

fn schemas() -> Value {
    let mut all = core_schemas();
    if let (Some(all), Value::Object(fleet)) = (all.as_object_mut(), fleet_schemas()) {
        all.extend(fleet);
    }
    all
}

/// Fleet provisioning's request bodies (apart: one `json!` this large overflows the macro).
fn fleet_schemas() -> Value {
    let s = |v: &str| json!({"type": v});
    json!({
        "EnrollmentCodes": {"type": "object", "additionalProperties": false, "properties": {
            "count": s("integer"), "ttl_hours": s("integer")}},
        "ScepEnrollment": {"type": "object", "required": ["template", "scep_url", "common_name"], "additionalProperties": false, "properties": {
            "template": s("string"), "scep_url": s("string"), "common_name": s("string"),
            "ttl_hours": s("integer"), "key_size": {"enum": [2048, 3072, 4096]}}},
        "RenewCertificate": {"type": "object", "additionalProperties": false, "properties": {
            "csr_pem": s("string"), "key_type": s("string"), "days": s("integer")}},
        "Claim": {"type": "object", "required": ["templates"], "additionalProperties": false, "properties": {
            "templates": {"type": "array", "items": s("string"), "minItems": 1}}},
        "FleetTemplate": {"type": "object", "required": ["thing_name"], "additionalProperties": false, "properties": {
            "thing_name": {"type": "string", "description": "With ${param:NAME} and certificate variables (${cert:Subject.CN})"},
            "attributes": {"type": "object", "additionalProperties": s("string")},
            "parameters": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": false, "properties": {
                "default": s("string"), "max_length": s("integer")}}},
            "policies": {"type": "array", "items": s("string")},
            "certificate_status": {"enum": ["ACTIVE", "INACTIVE"]},
            "device_configuration": {"type": "object", "additionalProperties": s("string")},
            "exclusive": s("boolean"), "join_existing_thing": s("boolean"),
            "pre_provisioning_hook": s("string"),
            "renewal": {"type": "object", "additionalProperties": false, "properties": {
                "due_after_percent": {"type": "integer", "minimum": 1, "maximum": 99},
                "refuse_early": s("boolean"),
                "grace_days": {"type": "integer", "minimum": 0, "maximum": 365},
                "overlap_hours": {"type": "integer", "minimum": 1, "maximum": 8760},
                "require_new_key": s("boolean")}}}},
        "CreateFleetTemplate": {"type": "object", "required": ["name", "template"], "additionalProperties": false, "properties": {
            "name": s("string"), "description": s("string"), "enabled": s("boolean"),
            "template": {"$ref": "#/components/schemas/FleetTemplate"}}},
        "UpdateFleetTemplate": {"type": "object", "additionalProperties": false, "properties": {
            "description": s("string"), "enabled": s("boolean"),
            "template": {"$ref": "#/components/schemas/FleetTemplate"}}}
    })
}

fn core_schemas() -> Value {
    let s = |v: &str| json!({"type": v});
    json!({
        "Error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": s("string"), "message": s("string"), "details": {}}},
        "RegisterCa": {"type": "object", "required": ["certificate_pem"], "additionalProperties": false, "properties": {
            "certificate_pem": s("string"), "verification_certificate_pem": s("string"),
            "allow_unverified": s("boolean"), "activate": s("boolean"), "auto_registration": s("boolean"),
            "provisioning_template": {"$ref": "#/components/schemas/ProvisioningTemplate"}}},
        "ProvisioningTemplate": {"type": "object", "required": ["thing_name"], "additionalProperties": false, "properties": {
            "thing_name": s("string"), "attributes": {"type": "object", "additionalProperties": s("string")},
            "exclusive": s("boolean")}},
        "UpdateCa": {"type": "object", "additionalProperties": false, "properties": {
            "status": {"enum": ["ACTIVE", "INACTIVE"]}, "auto_registration": s("boolean"),
            "provisioning_template": {"oneOf": [{"$ref": "#/components/schemas/ProvisioningTemplate"}, s("null")]},
            "revoke_issued": s("boolean"),
            "claim_templates": {"oneOf": [{"type": "array", "items": s("string"), "minItems": 1}, s("null")],
                "description": "Make it a claim CA: every certificate it issues may only provision devices under these templates"}}},
        "Enrollment": {"type": "object", "required": ["common_name", "password"], "additionalProperties": false, "properties": {
            "common_name": s("string"), "days": s("integer"), "password": s("string"),
            "allow_separators": s("boolean"),
            "embed_password": {"type": "boolean", "description": "Write the password into the .mobileconfig too (default false: MDMs supply it)"}}},
        "CreateCertificate": {"type": "object", "additionalProperties": false, "properties": {
            "certificate_pem": s("string"), "csr_pem": s("string"), "common_name": s("string"),
            "key_type": s("string"), "days": s("integer"), "allow_separators": s("boolean"),
            "renewal_template": {"type": "string", "description": "Put the certificate under this provisioning template's renewal terms (due point, grace period)"},
            "status": {"enum": ["ACTIVE", "INACTIVE", "PENDING_ACTIVATION"]}}},
        "RegisterBatch": {"type": "object", "required": ["certificates_pem"], "additionalProperties": false, "properties": {
            "certificates_pem": {"type": "array", "items": s("string"), "maxItems": 1000},
            "status": {"enum": ["ACTIVE", "INACTIVE", "PENDING_ACTIVATION"]}}},
        "UpdateCertificate": {"type": "object", "required": ["status"], "additionalProperties": false, "properties": {
            "status": {"enum": ["ACTIVE", "INACTIVE", "REVOKED", "PENDING_ACTIVATION"]},
            "reason": {"enum": portcullis_registry::REVOCATION_REASONS,
                "description": "With REVOKED: why, as the CA's CRL and OCSP answers publish it"}}},
        "CreateThing": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
            "name": s("string"), "attributes": {"type": "object", "additionalProperties": s("string")}}},
        "UpdateThing": {"type": "object", "required": ["attributes"], "additionalProperties": false, "properties": {
            "attributes": {"type": "object", "additionalProperties": {"type": ["string", "null"]}}}},
        "CreateTruststore": {"type": "object", "required": ["name", "bundle_pem"], "additionalProperties": false, "properties": {
            "name": s("string"), "bundle_pem": s("string"), "crls_pem": {"type": "array", "items": s("string")}}},
        "AddTruststoreVersion": {"type": "object", "required": ["bundle_pem"], "additionalProperties": false, "properties": {
            "bundle_pem": s("string"), "crls_pem": {"type": "array", "items": s("string")}}},
        "PreviewTruststore": {"type": "object", "required": ["bundle_pem"], "additionalProperties": false, "properties": {
            "bundle_pem": s("string"), "crls_pem": {"type": "array", "items": s("string")}, "days": s("integer")}},
        "CreateToken": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
            "name": s("string")}},
        "CreatePolicy": {"type": "object", "required": ["name", "document"], "additionalProperties": false, "properties": {
            "name": s("string"), "document": {"type": "object", "description": "Statement list: Effect, Action, Resource, Condition (docs/policies.md)"}}},
        "UpdatePolicy": {"type": "object", "required": ["default_version"], "additionalProperties": false, "properties": {
            "default_version": s("integer")}},
        "CreatePolicyVersion": {"type": "object", "required": ["document"], "additionalProperties": false, "properties": {
            "document": s("object"), "set_default": s("boolean")}},
        "Simulate": {"type": "object", "required": ["certificate_pem", "action", "resource"], "additionalProperties": false, "properties": {
            "certificate_pem": s("string"), "action": s("string"), "resource": s("string"),
            "source_ip": s("string"), "client_id": s("string"), "domain": s("string"),
            "policies": {"type": "array", "items": s("string")}}},
        "CreateWebhook": {"type": "object", "required": ["name", "url", "events"], "additionalProperties": false, "properties": {
            "name": s("string"), "url": s("string"), "events": {"type": "array", "items": {"enum": portcullis_registry::EVENT_TYPES}},
            "expiring_days": s("integer"), "ca_pem": s("string"),
            "topic_filter": {"type": "string", "description": "For mqtt.message (forwarding rules): the MQTT topic filter"}}},
        "UpdateWebhook": {"type": "object", "additionalProperties": false, "properties": {
            "url": s("string"), "events": {"type": "array", "items": {"enum": portcullis_registry::EVENT_TYPES}},
            "enabled": s("boolean"), "expiring_days": s("integer"), "ca_pem": s("string")}},
        "PutServerCertificate": {"type": "object", "required": ["certificate_pem", "key_pem"], "additionalProperties": false, "properties": {
            "certificate_pem": {"type": "string", "description": "The chain, leaf first"},
            "key_pem": {"type": "string", "description": "The leaf's private key; sealed with the cluster key, never answered back"}}},
        "NatsCertificate": {"type": "object", "required": ["name", "hosts"], "additionalProperties": false, "properties": {
            "name": {"type": "string", "description": "The NATS server's name (the certificate's CN)"},
            "hosts": {"type": "array", "items": s("string"), "description": "Host names and IP addresses it is reached by"},
            "days": s("integer")}},
        "PutDomain": {"type": "object", "required": ["spec"], "additionalProperties": false, "properties": {
            "spec": {"type": "object", "description": "The keys of a [[domain]] table of the configuration file (docs/configuration.md)"},
            "expected_version": {"type": "integer", "description": "Write only if the stored version is this one; 0: only if new"}}},
        "Explain": {"type": "object", "required": ["domain", "certificate_pem"], "additionalProperties": false, "properties": {
            "domain": s("string"), "host": {"type": "string", "description": "The Host header (default: the domain)"},
            "source_ip": {"type": "string", "description": "The client's address, for aws:SourceIp conditions (default 127.0.0.1)"},
            "method": s("string"), "path": s("string"), "certificate_pem": s("string"),
            "profile": {"enum": ["compatible", "strict"]}}},
    })
}
