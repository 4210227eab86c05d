#!/usr/bin/env bash
# Installs TimescaleDB (telemetry's hypertables) and pgvector (vector search)
# into the machine's PostgreSQL where they are missing; does nothing when
# both are there. Called by setup.sh; safe to run again.
#
# Where each comes from, first that works:
#   1. the vendor's package (Timescale's repository, the PostgreSQL project's
#      PGDG) when a configured apt source offers it;
#   2. the upstream sources kept in ../shared/vendor beside the repository,
#      built against Debian's postgresql-server-dev-<major>;
#   3. neither: said once, and Meridian runs telemetry on pg_partman and
#      goes without vector search.
set -euo pipefail

say() { printf 'setup: %s\n' "$*"; }

repo=$(cd "$(dirname "$0")/../.." && pwd)
vendor="${MERIDIAN_PG_VENDOR_DIR:-$repo/../shared/vendor}"
pg_major=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1)
if [ -z "$pg_major" ]; then
  say "no PostgreSQL server found; TimescaleDB and pgvector not installed"
  exit 0
fi
ext_dir=/usr/share/postgresql/$pg_major/extension
lib_dir=/usr/lib/postgresql/$pg_major/lib
pg_config=/usr/lib/postgresql/$pg_major/bin/pg_config

if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive

# Both the control file and the library: a half-finished install (one
# without the other) is installed again.
installed() { [ -f "$ext_dir/$1.control" ] && [ -f "$lib_dir/$2.so" ]; }

# A package counts only when an apt source has a candidate for it.
offered() {
  local candidate
  candidate=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
  [ -n "$candidate" ] && [ "$candidate" != "(none)" ]
}

build_deps_ready=
build_deps() {
  [ -n "$build_deps_ready" ] && return 0
  local need=()
  # pg_config comes with the client; the server headers only with -dev.
  [ -f "/usr/include/postgresql/$pg_major/server/postgres.h" ] \
    || need+=("postgresql-server-dev-$pg_major")
  command -v cmake >/dev/null 2>&1 || need+=(cmake)
  [ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
  command -v make >/dev/null 2>&1 || need+=(make)
  if [ ${#need[@]} -gt 0 ]; then
    say "installing Debian packages to build PostgreSQL extensions: ${need[*]}"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  build_deps_ready=1
}

# build NAME TARBALL COMMANDS: unpacks the tarball in a scratch directory and
# runs the commands inside its top folder, timing them.
build() {
  local name=$1 tarball=$2 commands=$3 work start ok=1
  build_deps
  work=$(mktemp -d)
  tar -xzf "$tarball" -C "$work"
  start=$(date +%s)
  (cd "$work"/*/ && eval "$commands") >"$work/build.log" 2>&1 || ok=
  if [ -n "$ok" ]; then
    say "built and installed $name from $(basename "$tarball") in $(($(date +%s) - start)) s"
  else
    grep -iE 'error|fatal' "$work/build.log" | head -20 >&2 || true
    tail -15 "$work/build.log" >&2
    say "building $name from $tarball failed (log above)"
  fi
  rm -rf "$work"
  [ -n "$ok" ]
}

# ensure NAME CONTROL LIBRARY PACKAGE TARBALL_GLOB BUILD_COMMANDS
ensure() {
  local name=$1 control=$2 lib=$3 package=$4 glob=$5 commands=$6 tarball
  if installed "$control" "$lib"; then
    say "$name present in PostgreSQL $pg_major"
    return 0
  fi
  if offered "$package"; then
    say "installing $name from package $package"
    $SUDO apt-get install -y -qq --no-install-recommends "$package" >/dev/null
    installed "$control" "$lib" && return 0
  fi
  tarball=$(ls "$vendor"/$glob 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$tarball" ]; then
    say "$name is not installed: no configured package source offers $package and $vendor holds no $glob; $7"
  elif ! { build "$name" "$tarball" "$commands" && installed "$control" "$lib"; }; then
    say "$name is not installed; $7"
  fi
}

ensure timescaledb timescaledb timescaledb "timescaledb-2-postgresql-$pg_major" \
  'timescaledb-*.tar.gz' \
  "./bootstrap -DPG_CONFIG=$pg_config -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
     -DWARNINGS_AS_ERRORS=OFF -DCMAKE_BUILD_TYPE=Release -DGENERATE_DOWNGRADE_SCRIPT=OFF \
   && make -C build -j\$(nproc) && $SUDO make -C build install" \
  "telemetry runs on pg_partman"

ensure pgvector vector vector "postgresql-$pg_major-pgvector" \
  'pgvector-*.tar.gz' \
  "make -j\$(nproc) PG_CONFIG=$pg_config && $SUDO make install PG_CONFIG=$pg_config" \
  "regions run without vector search"
