-- One row per order the shipping consumer has heard of: what it knows and what it has done.
-- status: UNSEEN (row made by a lock, never committed as such), PLACED (customer known, nothing
-- done), SCHEDULED, FAILED (cannot ship there), CANCELLED (called off, or cancelled before anything
-- was scheduled: a late confirmation then schedules nothing).
CREATE TABLE IF NOT EXISTS shipments (
    order_id      TEXT PRIMARY KEY,
    customer_id   TEXT,
    status        TEXT   NOT NULL,
    -- Confirmations applied: a redelivery of the same event id never reaches the handler (inbox),
    -- a copy with a new id does and counts here, but schedules nothing more.
    confirmations BIGINT NOT NULL DEFAULT 0
);
