#!/bin/sh
# Runs once, when the postgres container initialises an empty data directory
# (docker-entrypoint-initdb.d). It creates one role and one database per service. Each role owns
# its database and can't connect to the others. The services share no database.
#
# Passwords come from ORDER_DB_PASSWORD, INVENTORY_DB_PASSWORD and PAYMENT_DB_PASSWORD.
set -eu

create() {
  name="$1"
  password="$2"
  # psql variables (:'pw', :"name") quote the values, so passwords need no escaping here.
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v name="$name" -v pw="$password" <<'SQL'
CREATE ROLE :"name" LOGIN PASSWORD :'pw';
CREATE DATABASE :"name" OWNER :"name";
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
SQL
}

create order "${ORDER_DB_PASSWORD:?ORDER_DB_PASSWORD is not set}"
create inventory "${INVENTORY_DB_PASSWORD:?INVENTORY_DB_PASSWORD is not set}"
create payment "${PAYMENT_DB_PASSWORD:?PAYMENT_DB_PASSWORD is not set}"
