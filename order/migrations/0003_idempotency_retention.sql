-- Retention clears old idempotency keys without scanning every order.
CREATE INDEX IF NOT EXISTS orders_keyed_created ON orders (created_at_us) WHERE idempotency_key IS NOT NULL;
