-- A CA marked as a claim: every certificate it issues is a claim certificate (registered or
-- not), allowed only to provision devices under these templates (a JSON array; NULL: not one).
ALTER TABLE cas ADD COLUMN claim_templates TEXT;
