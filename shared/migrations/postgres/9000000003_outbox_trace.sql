-- W3C trace context of each event, written with the event and sent as NATS headers. Rows written
-- before these columns existed have none and are published without them. Nullable columns
-- without a default: adding them rewrites nothing.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent TEXT, ADD COLUMN IF NOT EXISTS tracestate TEXT;
