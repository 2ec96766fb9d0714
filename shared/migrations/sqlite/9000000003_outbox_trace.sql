-- W3C trace context of each event, written with the event and sent as NATS headers. Rows written
-- before this column existed have none and are published without it.
ALTER TABLE outbox ADD COLUMN traceparent TEXT;
ALTER TABLE outbox ADD COLUMN tracestate TEXT;
