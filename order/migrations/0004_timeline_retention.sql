-- Retention prunes old timeline rows without scanning the table.
CREATE INDEX IF NOT EXISTS timeline_events_time ON timeline_events (time_us);
