-- Retention finds the oldest rows of each table without scanning it.
CREATE INDEX IF NOT EXISTS outbox_published_created ON outbox (created_at_us) WHERE published_at_us IS NOT NULL;
CREATE INDEX IF NOT EXISTS inbox_received ON inbox (received_at_us);
CREATE INDEX IF NOT EXISTS dead_letters_created ON dead_letters (created_at_us);
