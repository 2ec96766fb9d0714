-- Parked rows are few: operators and the metrics sampler find them without scanning the outbox.
CREATE INDEX IF NOT EXISTS outbox_parked ON outbox (id) WHERE parked_at_us IS NOT NULL;
