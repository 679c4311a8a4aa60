-- Why a certificate was revoked (RFC 5280 CRLReason name: keyCompromise, superseded…), as the
-- CRL and OCSP answers of its CA publish it; NULL: unspecified.
ALTER TABLE certificates ADD COLUMN revocation_reason TEXT;
