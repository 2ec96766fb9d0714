#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what is missing (nats-server >= 2.11, Postgres
# server binaries, a compose CLI; failing if it cannot), starts one throwaway Postgres for the run,
# checks formatting and lints, builds the service binaries, then runs the whole suite. Every test
# that uses a database runs on SQLite and on Postgres; the others (static checks, NATS permissions,
# unit tests) run once. README "Tests" lists which is which.
#   scripts/test.sh            everything
#   scripts/test.sh -p saga-e2e   extra arguments go to `cargo test`
# Set SKIP_LINT=1 to skip fmt/clippy.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

NATS_SERVER_BIN="$(scripts/install-deps.sh | tail -n1)"
export NATS_SERVER_BIN
echo "nats-server: $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version))"

# One throwaway Postgres cluster for the whole run; each test creates its own database in it.
if [[ -z "${TEST_DATABASE_URL:-}" ]]; then
  eval "$(scripts/throwaway-postgres.sh start)"
  trap 'scripts/throwaway-postgres.sh stop "$PG_DIR"' EXIT
  export TEST_DATABASE_URL
fi
echo "postgres: $TEST_DATABASE_URL"

if [[ "${SKIP_LINT:-0}" != 1 ]]; then
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi
# The end-to-end tests run the real service binaries.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
