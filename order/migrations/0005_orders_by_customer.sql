-- A customer's orders, newest first, a page at a time (`GET /orders?customer_id=`), read from the
-- index in order rather than by scanning every order.
CREATE INDEX IF NOT EXISTS orders_customer_created ON orders (customer_id, created_at_us, id);
