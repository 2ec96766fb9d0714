CREATE TABLE IF NOT EXISTS accounts (
    customer_id   TEXT PRIMARY KEY,
    balance_minor BIGINT NOT NULL,
    currency      TEXT   NOT NULL,
    -- Money ever put in through PUT /accounts: the conservation check's right-hand side.
    deposited     BIGINT NOT NULL,
    updated_at_us BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS payments (
    order_id       TEXT PRIMARY KEY,
    payment_id     TEXT   NOT NULL UNIQUE,
    customer_id    TEXT   NOT NULL,
    amount_minor   BIGINT NOT NULL,
    currency       TEXT   NOT NULL,
    status         TEXT   NOT NULL,
    reason         TEXT,
    -- A processor holds a pending payment until this time; after it, another may take it over.
    lease_until_us BIGINT NOT NULL,
    -- The event that asked for the charge, for correlation and causation of what follows.
    correlation_id TEXT,
    cause_event_id TEXT,
    traceparent    TEXT,
    created_at_us  BIGINT NOT NULL,
    updated_at_us  BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_pending ON payments (lease_until_us) WHERE status = 'PENDING';

-- One row per order this service has heard of. Handlers lock it first, so the reservation and
-- the cancellation of one order are applied one after the other, never side by side; `cancelled`
-- remembers a cancellation so a reservation seen afterwards is never charged.
CREATE TABLE IF NOT EXISTS order_flags (
    order_id  TEXT PRIMARY KEY,
    cancelled BIGINT NOT NULL,
    at_us     BIGINT NOT NULL
);
