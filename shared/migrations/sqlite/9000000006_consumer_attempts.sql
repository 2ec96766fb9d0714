-- Attempts at applying a redelivered message, committed before it is applied: a message that
-- stops the process every time is still counted, and given up after `max_deliver`.
CREATE TABLE IF NOT EXISTS consumer_attempts (
    consumer        TEXT   NOT NULL,
    stream          TEXT   NOT NULL,
    stream_sequence BIGINT NOT NULL,
    attempts        BIGINT NOT NULL,
    updated_at_us   BIGINT NOT NULL,
    PRIMARY KEY (consumer, stream, stream_sequence)
);
CREATE INDEX IF NOT EXISTS consumer_attempts_updated ON consumer_attempts (updated_at_us);
