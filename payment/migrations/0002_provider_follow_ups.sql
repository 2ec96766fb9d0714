-- Money a payment holds on its account while the provider is asked, so that two payments of one
-- customer are never both authorized when the balance covers only one. balance_minor is what the
-- customer has; balance_minor - held_minor is what a new payment may still hold.
ALTER TABLE accounts ADD COLUMN held_minor BIGINT NOT NULL DEFAULT 0;

-- 1 while the payment's amount is held on its account. Set before the provider is first asked,
-- so a payment that never held was never sent to the provider.
ALTER TABLE payments ADD COLUMN held BIGINT NOT NULL DEFAULT 0;
-- What the provider is still owed for this charge: 'capture' or 'void'; NULL when nothing.
-- Written in the transaction that settles the payment, done (and cleared) once the provider
-- acknowledged, retried until then.
ALTER TABLE payments ADD COLUMN provider_due TEXT;
-- What was done: 'captured', 'voided', or 'refused' (the provider would not).
ALTER TABLE payments ADD COLUMN provider_done TEXT;
ALTER TABLE payments ADD COLUMN provider_attempts BIGINT NOT NULL DEFAULT 0;
-- Not before this time: the next try, or the lease of the one under way.
ALTER TABLE payments ADD COLUMN provider_retry_at_us BIGINT NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS payments_provider_due ON payments (provider_retry_at_us) WHERE provider_due IS NOT NULL;
