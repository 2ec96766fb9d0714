-- Dead letters keep how an operator resolved them (redriven, duplicate, discarded) and when.
ALTER TABLE dead_letters ADD COLUMN resolution TEXT;
ALTER TABLE dead_letters ADD COLUMN resolved_at_us BIGINT;
