CREATE TABLE IF NOT EXISTS products (
    sku           TEXT PRIMARY KEY,
    available     BIGINT NOT NULL,
    reserved      BIGINT NOT NULL,
    sold          BIGINT NOT NULL,
    -- Stock ever added through PUT /products: the per-SKU ledger's right-hand side.
    added         BIGINT NOT NULL,
    updated_at_us BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS reservations (
    order_id      TEXT   NOT NULL,
    sku           TEXT   NOT NULL,
    quantity      BIGINT NOT NULL,
    status        TEXT   NOT NULL,
    updated_at_us BIGINT NOT NULL,
    PRIMARY KEY (order_id, sku)
);

-- Where each order stands for inventory, including cancellations seen before their placement.
CREATE TABLE IF NOT EXISTS order_states (
    order_id      TEXT PRIMARY KEY,
    state         TEXT   NOT NULL,
    updated_at_us BIGINT NOT NULL
);
