-- Renewal terms, fixed when a certificate is provisioned by a template (and inherited by its
-- renewals): the template, when it is due for renewal, until when it may still renew after
-- expiry (a grace period: renewal only), and — on a renewal — when the certificate it renews
-- is retired even if the renewal was never seen (an overlap that ends by time).
ALTER TABLE certificates ADD COLUMN template TEXT;
ALTER TABLE certificates ADD COLUMN due_at BIGINT;
ALTER TABLE certificates ADD COLUMN grace_until BIGINT;
ALTER TABLE certificates ADD COLUMN retire_renewed_at BIGINT;
