#!/bin/sh
# Demo data for `docker compose up`: the one-shot `seed` service runs this once inventory and
# payment report healthy. PUT sets the value, so running it again resets these products' stock and
# these accounts' balances to the values below.
set -eu

inventory="${INVENTORY_URL:-http://inventory:8082}"
payment="${PAYMENT_URL:-http://payment:8083}"
# Seeding routes need the services' admin token.
token="${ADMIN_TOKEN:?ADMIN_TOKEN must be set (the services' admin token)}"

put() {
  echo "PUT $1 $2"
  curl --fail-with-body --silent --show-error --max-time 10 \
    --retry 5 --retry-connrefused --retry-delay 1 \
    -X PUT -H 'content-type: application/json' -H "Authorization: Bearer $token" --data "$2" "$1"
  echo
}

put "$inventory/products/WIDGET" '{"available": 100}'
put "$inventory/products/GADGET" '{"available": 5}'
put "$payment/accounts/alice" '{"balance_minor": 100000, "currency": "EUR"}'
put "$payment/accounts/bob" '{"balance_minor": 500, "currency": "EUR"}'
echo "seeded: products WIDGET=100, GADGET=5; accounts alice=1000.00 EUR, bob=5.00 EUR"
