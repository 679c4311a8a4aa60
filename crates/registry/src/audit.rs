//! Every action the audit log records, and what a change recorded with it affects: the one place
//! that says which changes reach the gateway's registry snapshot, which rebuild its
//! configuration, and which are webhook events. Every reader matches [`AuditAction`]
//! exhaustively, so a new action must say what it affects.

/// An action of the audit log. Its stored name ([`AuditAction::as_str`]) is stable: the audit log
/// API filters on it and operators read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditAction {
    /// A CA registered.
    CaRegister,
    /// A CA's status, auto-registration or provisioning template changed.
    CaUpdate,
    /// Certificates registered (one entry each).
    CertificateRegister,
    /// A certificate's status changed.
    CertificateStatus,
    /// A certificate deleted.
    CertificateDelete,
    /// A certificate provisioned just in time (JITP) with its thing.
    CertificateProvision,
    /// A just-in-time provisioning refused.
    CertificateProvisionRefused,
    /// A thing created.
    ThingCreate,
    /// A thing's attributes changed.
    ThingUpdate,
    /// A thing deleted.
    ThingDelete,
    /// A certificate attached to a thing.
    ThingAttach,
    /// A certificate detached from a thing.
    ThingDetach,
    /// A policy created.
    PolicyCreate,
    /// A policy version added.
    PolicyVersion,
    /// A policy's default version changed.
    PolicyDefault,
    /// A policy version deleted.
    PolicyDeleteVersion,
    /// A policy deleted.
    PolicyDelete,
    /// A policy attached to a certificate, thing, CA or domain.
    PolicyAttach,
    /// A policy detached.
    PolicyDetach,
    /// A webhook created.
    WebhookCreate,
    /// A webhook changed.
    WebhookUpdate,
    /// A webhook deleted.
    WebhookDelete,
    /// A delivery replayed.
    WebhookReplay,
    /// An admin API token created.
    TokenCreate,
    /// An admin API token deleted.
    TokenDelete,
    /// An admin client certificate issued (rotation).
    AdminCertificateIssue,
    /// An admin client certificate revoked.
    AdminCertificateRevoke,
    /// A domain created.
    DomainCreate,
    /// A domain changed.
    DomainUpdate,
    /// A domain deleted.
    DomainDelete,
    /// A truststore created (version 1).
    TruststoreCreate,
    /// A truststore version added.
    TruststoreVersion,
    /// A truststore deleted.
    TruststoreDelete,
    /// A server certificate (chain and sealed key) imported or replaced.
    ServerCertImport,
    /// A server certificate deleted.
    ServerCertDelete,
    /// A certificate made a claim certificate (the templates it may use), or no longer one.
    CertificateClaim,
    /// A certificate made for a device by fleet provisioning (PENDING_ACTIVATION until the
    /// device registers it with its ownership token).
    CertificateFleetCreate,
    /// A fleet provisioning template created.
    FleetTemplateCreate,
    /// A fleet provisioning template changed.
    FleetTemplateUpdate,
    /// A fleet provisioning template deleted.
    FleetTemplateDelete,
    /// One-time enrollment codes made for a template.
    EnrollmentCodeCreate,
    /// A certificate put under a template's renewal terms (due point, grace period).
    CertificateRenewalTerms,
    /// ACME challenge answers published for every node to serve (or withdrawn).
    AcmeChallenge,
}

/// What a change affects on the gateway nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effects {
    /// The target is a certificate whose registry status the snapshot holds: read it again.
    pub certificate_status: bool,
    /// The registered CAs (auto-registration, provisioning templates, `registry:cas`).
    pub cas: bool,
    /// Which policies apply to which certificates (documents, attachments, things, domains).
    pub policies: bool,
    /// Policies, when some CA has policies attached (a registration links a certificate to its
    /// CA, which then brings the CA's policies).
    pub policies_if_ca_policies: bool,
    /// The MQTT forwarding rules (webhooks subscribed to `mqtt.message`).
    pub rules: bool,
    /// The gateway's configuration: domains, truststores, server certificates and the CAs of
    /// `registry:cas`.
    pub configuration: bool,
}

impl AuditAction {
    /// Every action.
    pub const ALL: [AuditAction; 43] = [
        AuditAction::CaRegister,
        AuditAction::CaUpdate,
        AuditAction::CertificateRegister,
        AuditAction::CertificateStatus,
        AuditAction::CertificateDelete,
        AuditAction::CertificateProvision,
        AuditAction::CertificateProvisionRefused,
        AuditAction::ThingCreate,
        AuditAction::ThingUpdate,
        AuditAction::ThingDelete,
        AuditAction::ThingAttach,
        AuditAction::ThingDetach,
        AuditAction::PolicyCreate,
        AuditAction::PolicyVersion,
        AuditAction::PolicyDefault,
        AuditAction::PolicyDeleteVersion,
        AuditAction::PolicyDelete,
        AuditAction::PolicyAttach,
        AuditAction::PolicyDetach,
        AuditAction::WebhookCreate,
        AuditAction::WebhookUpdate,
        AuditAction::WebhookDelete,
        AuditAction::WebhookReplay,
        AuditAction::TokenCreate,
        AuditAction::TokenDelete,
        AuditAction::AdminCertificateIssue,
        AuditAction::AdminCertificateRevoke,
        AuditAction::DomainCreate,
        AuditAction::DomainUpdate,
        AuditAction::DomainDelete,
        AuditAction::TruststoreCreate,
        AuditAction::TruststoreVersion,
        AuditAction::TruststoreDelete,
        AuditAction::ServerCertImport,
        AuditAction::ServerCertDelete,
        AuditAction::CertificateClaim,
        AuditAction::CertificateFleetCreate,
        AuditAction::FleetTemplateCreate,
        AuditAction::FleetTemplateUpdate,
        AuditAction::FleetTemplateDelete,
        AuditAction::EnrollmentCodeCreate,
        AuditAction::CertificateRenewalTerms,
        AuditAction::AcmeChallenge,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::CaRegister => "ca.register",
            AuditAction::CaUpdate => "ca.update",
            AuditAction::CertificateRegister => "certificate.register",
            AuditAction::CertificateStatus => "certificate.status",
            AuditAction::CertificateDelete => "certificate.delete",
            AuditAction::CertificateProvision => "certificate.provision",
            AuditAction::CertificateProvisionRefused => "certificate.provision-refused",
            AuditAction::ThingCreate => "thing.create",
            AuditAction::ThingUpdate => "thing.update",
            AuditAction::ThingDelete => "thing.delete",
            AuditAction::ThingAttach => "thing.attach",
            AuditAction::ThingDetach => "thing.detach",
            AuditAction::PolicyCreate => "policy.create",
            AuditAction::PolicyVersion => "policy.version",
            AuditAction::PolicyDefault => "policy.default",
            AuditAction::PolicyDeleteVersion => "policy.delete-version",
            AuditAction::PolicyDelete => "policy.delete",
            AuditAction::PolicyAttach => "policy.attach",
            AuditAction::PolicyDetach => "policy.detach",
            AuditAction::WebhookCreate => "webhook.create",
            AuditAction::WebhookUpdate => "webhook.update",
            AuditAction::WebhookDelete => "webhook.delete",
            AuditAction::WebhookReplay => "webhook.replay",
            AuditAction::TokenCreate => "token.create",
            AuditAction::TokenDelete => "token.delete",
            AuditAction::AdminCertificateIssue => "admin.certificate.issue",
            AuditAction::AdminCertificateRevoke => "admin.certificate.revoke",
            AuditAction::DomainCreate => "domain.create",
            AuditAction::DomainUpdate => "domain.update",
            AuditAction::DomainDelete => "domain.delete",
            AuditAction::TruststoreCreate => "truststore.create",
            AuditAction::TruststoreVersion => "truststore.version",
            AuditAction::TruststoreDelete => "truststore.delete",
            AuditAction::ServerCertImport => "server-cert.import",
            AuditAction::ServerCertDelete => "server-cert.delete",
            AuditAction::CertificateClaim => "certificate.claim",
            AuditAction::CertificateFleetCreate => "certificate.fleet-create",
            AuditAction::CertificateRenewalTerms => "certificate.renewal-terms",
            AuditAction::AcmeChallenge => "acme.challenge",
            AuditAction::FleetTemplateCreate => "provisioning-template.create",
            AuditAction::FleetTemplateUpdate => "provisioning-template.update",
            AuditAction::FleetTemplateDelete => "provisioning-template.delete",
            AuditAction::EnrollmentCodeCreate => "enrollment-code.create",
        }
    }

    /// The action stored as `name`; `None` for a name this version does not know (written by a
    /// newer node): readers then resynchronise everything.
    pub fn parse(name: &str) -> Option<AuditAction> {
        AuditAction::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// What a change recorded with this action affects.
    pub fn effects(self) -> Effects {
        let none = Effects::default();
        match self {
            AuditAction::CaRegister | AuditAction::CaUpdate => Effects {
                cas: true,
                policies: true,
                configuration: true,
                ..none
            },
            AuditAction::CertificateRegister | AuditAction::CertificateFleetCreate => Effects {
                certificate_status: true,
                policies_if_ca_policies: true,
                ..none
            },
            // A claim certificate's policy is the built-in one.
            AuditAction::CertificateClaim => Effects {
                policies: true,
                ..none
            },
            // Read from the store when a device provisions.
            AuditAction::FleetTemplateCreate
            | AuditAction::FleetTemplateUpdate
            | AuditAction::FleetTemplateDelete
            | AuditAction::EnrollmentCodeCreate => none,
            AuditAction::CertificateStatus
            | AuditAction::CertificateProvisionRefused
            | AuditAction::CertificateRenewalTerms => Effects {
                certificate_status: true,
                ..none
            },
            AuditAction::CertificateDelete | AuditAction::CertificateProvision => Effects {
                certificate_status: true,
                policies: true,
                ..none
            },
            AuditAction::ThingCreate
            | AuditAction::ThingUpdate
            | AuditAction::ThingDelete
            | AuditAction::ThingAttach
            | AuditAction::ThingDetach
            | AuditAction::PolicyCreate
            | AuditAction::PolicyVersion
            | AuditAction::PolicyDefault
            | AuditAction::PolicyDeleteVersion
            | AuditAction::PolicyDelete
            | AuditAction::PolicyAttach
            | AuditAction::PolicyDetach => Effects {
                policies: true,
                ..none
            },
            AuditAction::WebhookCreate
            | AuditAction::WebhookUpdate
            | AuditAction::WebhookDelete
            | AuditAction::WebhookReplay => Effects {
                rules: true,
                ..none
            },
            // Tokens and admin certificates are read from the store on every admin request.
            AuditAction::TokenCreate
            | AuditAction::TokenDelete
            | AuditAction::AdminCertificateIssue
            | AuditAction::AdminCertificateRevoke => none,
            // A domain's policy attachments go with it.
            AuditAction::DomainCreate | AuditAction::DomainUpdate | AuditAction::DomainDelete => {
                Effects {
                    policies: true,
                    configuration: true,
                    ..none
                }
            }
            AuditAction::TruststoreCreate
            | AuditAction::TruststoreVersion
            | AuditAction::TruststoreDelete
            | AuditAction::ServerCertImport
            | AuditAction::ServerCertDelete
            | AuditAction::AcmeChallenge => Effects {
                configuration: true,
                ..none
            },
        }
    }

    /// The stored names of the actions that change the gateway's configuration, as an SQL list
    /// (`'domain.create', …`), for the configuration marker.
    pub(crate) fn configuration_names_sql() -> String {
        AuditAction::ALL
            .into_iter()
            .filter(|a| a.effects().configuration)
            .map(|a| format!("'{}'", a.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_read_back() {
        let mut seen = std::collections::HashSet::new();
        for a in AuditAction::ALL {
            assert!(seen.insert(a.as_str()), "{a} twice");
            assert_eq!(AuditAction::parse(a.as_str()), Some(a));
        }
        assert_eq!(AuditAction::parse("certificate.teleport"), None);
    }

    /// What each kind of change reaches, as the gateway nodes rely on it.
    #[test]
    fn each_change_reaches_what_it_affects() {
        use AuditAction as A;
        assert!(A::CertificateStatus.effects().certificate_status);
        assert!(!A::CertificateStatus.effects().configuration);
        assert!(A::CaUpdate.effects().configuration && A::CaUpdate.effects().cas);
        assert!(A::TruststoreVersion.effects().configuration);
        assert!(A::ServerCertImport.effects().configuration);
        assert!(A::DomainDelete.effects().policies && A::DomainDelete.effects().configuration);
        assert!(A::ThingAttach.effects().policies);
        assert!(A::WebhookUpdate.effects().rules);
        assert_eq!(A::TokenCreate.effects(), Effects::default());
        let sql = AuditAction::configuration_names_sql();
        assert!(
            sql.contains("'ca.update'") && sql.contains("'truststore.delete'"),
            "{sql}"
        );
        assert!(!sql.contains("certificate"), "{sql}");
    }
}
