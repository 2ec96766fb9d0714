#!/usr/bin/env bash
# Runs the whole system locally, without Docker: nats-server (>= 2.14.5, installed if missing) on
# the project's nats.conf as is, with local ports and store given as flags; the three services on
# SQLite, each with its own least-privilege NATS user; seeds products and accounts; runs three
# sample sagas and prints their event timelines; then keeps running until Ctrl-C, which stops
# everything cleanly.
# State lives in .demo/ and is reset on every run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
demo="$root/.demo"
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

NATS_PORT="${NATS_PORT:-4222}"; NATS_HTTP_PORT="${NATS_HTTP_PORT:-8222}"
ORDER_PORT=8081; INVENTORY_PORT=8082; PAYMENT_PORT=8083; GATEWAY_PORT=8080

for port in "$NATS_PORT" "$NATS_HTTP_PORT" "$ORDER_PORT" "$INVENTORY_PORT" "$PAYMENT_PORT" "$GATEWAY_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use; stop whatever listens there (a previous run?) and retry" >&2
    exit 1
  fi
done

nats_server="$(scripts/install-deps.sh --nats-only | tail -n1)"
# nats.conf's read-only mirrors for people follow durable consumers across accounts: 2.14.5+.
nats_v="$("$nats_server" --version | awk '{print $2}')"; nats_v="${nats_v#v}"
if [[ "$(printf '%s\n' 2.14.5 "${nats_v%%-*}" | sort -V | head -n1)" != 2.14.5 ]]; then
  echo "nats.conf needs nats-server >= 2.14.5; $nats_server is $nats_v (set NATS_SERVER_BIN or remove it from PATH)" >&2
  exit 1
fi
echo "==> building"
cargo build --bins --quiet

rm -rf "$demo"; mkdir -p "$demo/data" "$demo/jetstream"
# Passwords: from .env when present, else fresh random ones for this run.
if [[ -f .env ]]; then set -a; source .env; set +a; fi
rand() { python3 -c 'import secrets; print(secrets.token_hex(12))'; }
export NATS_ORDER_PASSWORD="${NATS_ORDER_PASSWORD:-$(rand)}"
export NATS_INVENTORY_PASSWORD="${NATS_INVENTORY_PASSWORD:-$(rand)}"
export NATS_PAYMENT_PASSWORD="${NATS_PAYMENT_PASSWORD:-$(rand)}"
export NATS_PROVISION_PASSWORD="${NATS_PROVISION_PASSWORD:-$(rand)}"
export NATS_CLI_PASSWORD="${NATS_CLI_PASSWORD:-$(rand)}"
# The API gateway signs and checks customer tokens with this key.
export GATEWAY_JWT_SECRET="${GATEWAY_JWT_SECRET:-$(rand)$(rand)}"
# Admin and seeding routes (PUT /products, PUT /accounts, /admin/*) need this bearer token.
export ADMIN_TOKEN="${ADMIN_TOKEN:-$(rand)}"

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "==> stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "stopped; logs are in .demo/"
}
trap cleanup INT TERM EXIT

echo "==> starting nats-server ($("$nats_server" --version))"
# nats.conf as is; address, ports and store are flags (they take precedence over the file).
"$nats_server" -c nats.conf -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_HTTP_PORT" -sd "$demo/jetstream" \
  >"$demo/nats.log" 2>&1 &
pids+=($!)

wait_http() { # url what
  for _ in $(seq 1 300); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$2 did not become ready; see .demo/*.log" >&2; exit 1
}
wait_http "http://127.0.0.1:$NATS_HTTP_PORT/healthz?js-enabled-only=true" nats-server

start_service() { # name port user password-var
  local name=$1 port=$2 user=$3 pw=$4
  NATS_URL="nats://127.0.0.1:$NATS_PORT" NATS_USER="$user" NATS_PASSWORD="${!pw}" \
  DATABASE_URL="sqlite://$demo/data/$user.db" HTTP_ADDR="127.0.0.1:$port" \
  RUST_LOG="${RUST_LOG:-info,sqlx=warn}" \
    "$bin/$name" >"$demo/$user.log" 2>&1 &
  pids+=($!)
}
echo "==> starting order-service :$ORDER_PORT, inventory-service :$INVENTORY_PORT, payment-service :$PAYMENT_PORT (SQLite in .demo/data)"
start_service order-service "$ORDER_PORT" order NATS_ORDER_PASSWORD
start_service inventory-service "$INVENTORY_PORT" inventory NATS_INVENTORY_PASSWORD
start_service payment-service "$PAYMENT_PORT" payment NATS_PAYMENT_PASSWORD
for port in "$ORDER_PORT" "$INVENTORY_PORT" "$PAYMENT_PORT"; do wait_http "http://127.0.0.1:$port/readyz" "service on :$port"; done
echo "==> starting api-gateway :$GATEWAY_PORT"
GATEWAY_ADDR="127.0.0.1:$GATEWAY_PORT" ORDER_UPSTREAMS="http://127.0.0.1:$ORDER_PORT" \
INVENTORY_UPSTREAMS="http://127.0.0.1:$INVENTORY_PORT" PAYMENT_UPSTREAMS="http://127.0.0.1:$PAYMENT_PORT" \
RUST_LOG="${RUST_LOG:-info}" "$bin/api-gateway" >"$demo/gateway.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$GATEWAY_PORT/readyz" "api-gateway"

# People (user cli) read the streams through read-only mirrors in their own account, set up once
# the services have created the streams (see nats.conf).
echo "==> provisioning the people's read-only mirrors"
NATS_URL="nats://127.0.0.1:$NATS_PORT" NATS_USER=provision NATS_PASSWORD="$NATS_PROVISION_PASSWORD" \
  python3 deploy/nats/provision.py

echo "==> running sample sagas"
NATS_URL="nats://127.0.0.1:$NATS_PORT" NATS_USER=cli NATS_PASSWORD="$NATS_CLI_PASSWORD" "$bin/saga-demo"

cat <<TXT

==> running. Try this next (Ctrl-C stops everything):
  curl -s localhost:$ORDER_PORT/orders | python3 -m json.tool
  curl -s -XPOST localhost:$ORDER_PORT/orders -H 'content-type: application/json' \\
       -d '{"customer_id":"alice","currency":"EUR","items":[{"sku":"WIDGET","quantity":1,"unit_price_minor":1250}]}'
  curl -s -XPUT localhost:$PAYMENT_PORT/admin/gateway -d '{"mode":"outage"}' -H 'content-type: application/json' \\
       -H "Authorization: Bearer \$(cat .demo/admin.token)"
  curl -s localhost:$INVENTORY_PORT/products/WIDGET
  Through the gateway, as customer alice (token in .demo/alice.token, an hour long):
  curl -s -XPOST localhost:$GATEWAY_PORT/api/orders -H "Authorization: Bearer \$(cat .demo/alice.token)" \\
       -H 'content-type: application/json' -d '{"currency":"EUR","items":[{"sku":"WIDGET","quantity":1,"unit_price_minor":1250}]}'
  curl -s localhost:$GATEWAY_PORT/api/orders/<order id> -H "Authorization: Bearer \$(cat .demo/alice.token)" | python3 -m json.tool
  With the nats CLI (user cli, password in .demo/cli.password; it sends commands and reads):
  nats context save saga --server nats://127.0.0.1:$NATS_PORT --user cli --password "\$(cat .demo/cli.password)" --select
  nats sub 'orders.>'
  nats stream view ORDERS
  nats pub cmd.orders.cancel.v1 '{"order_id":"<order id>"}'
TXT
echo "$NATS_CLI_PASSWORD" > "$demo/cli.password"
"$bin/api-gateway" token alice --ttl 1h > "$demo/alice.token"
echo "$ADMIN_TOKEN" > "$demo/admin.token"
wait "${pids[0]}"
