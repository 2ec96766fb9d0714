CREATE TABLE IF NOT EXISTS orders (
    id                  TEXT PRIMARY KEY,
    customer_id         TEXT   NOT NULL,
    status              TEXT   NOT NULL,
    reason              TEXT,
    total_minor         BIGINT NOT NULL,
    currency            TEXT   NOT NULL,
    items               TEXT   NOT NULL,
    deadline_at_us      BIGINT NOT NULL,
    created_at_us       BIGINT NOT NULL,
    updated_at_us       BIGINT NOT NULL,
    idempotency_key     TEXT UNIQUE,
    request_fingerprint TEXT
);
-- The deadline sweep reads only unfinished orders.
CREATE INDEX IF NOT EXISTS orders_open_deadline ON orders (deadline_at_us)
    WHERE status IN ('PENDING', 'RESERVED');
CREATE INDEX IF NOT EXISTS orders_created ON orders (created_at_us);
