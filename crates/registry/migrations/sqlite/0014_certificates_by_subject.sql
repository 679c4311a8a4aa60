-- Fleet provisioning refuses a device certificate whose subject a registered certificate holds
-- already (a claim must not mint another device's identity): looked up by subject.
CREATE INDEX certificates_by_subject ON certificates (subject);
