-- Event toolkit tables. Versions 9000000000+ belong to the toolkit; services number theirs from 1.

-- Transactional outbox: events written in the same transaction as the state change they announce.
CREATE TABLE IF NOT EXISTS outbox (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id          TEXT    NOT NULL UNIQUE,
    subject           TEXT    NOT NULL,
    payload           BLOB    NOT NULL,
    created_at_us     BIGINT  NOT NULL,
    next_attempt_at_us BIGINT NOT NULL,
    attempts          BIGINT  NOT NULL DEFAULT 0,
    last_error        TEXT,
    published_at_us   BIGINT,
    parked_at_us      BIGINT
);
-- The relay only ever scans rows still to publish.
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (id)
    WHERE published_at_us IS NULL AND parked_at_us IS NULL;

-- Inbox: one row per (consumer, event id) applied; the idempotency record.
CREATE TABLE IF NOT EXISTS inbox (
    consumer       TEXT   NOT NULL,
    event_id       TEXT   NOT NULL,
    event_type     TEXT   NOT NULL,
    received_at_us BIGINT NOT NULL,
    PRIMARY KEY (consumer, event_id)
);

-- Dead letters: messages that can never succeed, kept with their payload and the reason.
CREATE TABLE IF NOT EXISTS dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer        TEXT   NOT NULL,
    stream          TEXT   NOT NULL,
    stream_sequence BIGINT NOT NULL,
    subject         TEXT   NOT NULL,
    headers         TEXT   NOT NULL,
    payload         BLOB   NOT NULL,
    event_id        TEXT,
    reason          TEXT   NOT NULL,
    delivered       BIGINT NOT NULL,
    created_at_us   BIGINT NOT NULL,
    UNIQUE (consumer, stream, stream_sequence)
);
