-- Read model of each order's saga: one row per event from ORDERS, INVENTORY and PAYMENTS.
-- The key serves `GET /orders/{id}/timeline` (all rows of one order) and keeps a row once.
CREATE TABLE IF NOT EXISTS timeline_events (
    order_id     TEXT   NOT NULL,
    event_id     TEXT   NOT NULL,
    event_type   TEXT   NOT NULL,
    source       TEXT   NOT NULL,
    time_us      BIGINT NOT NULL,
    causation_id TEXT,
    summary      TEXT,
    PRIMARY KEY (order_id, event_id)
);
