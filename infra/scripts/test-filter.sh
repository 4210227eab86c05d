#!/usr/bin/env bash
# Prints the nextest filterset `make test` runs with: every test, except
# those needing a PostgreSQL extension this machine lacks (TimescaleDB:
# tests named `timescaledb`; pgvector: tests named `pgvector`), which are
# left out and named on stderr. Under MERIDIAN_REQUIRE_PG_EXTENSIONS=1 (CI)
# nothing is left out: those tests run and fail, naming the extension.
set -euo pipefail

pg_major=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1)
installed() {
  [ -n "$pg_major" ] \
    && [ -f "/usr/share/postgresql/$pg_major/extension/$1.control" ] \
    && [ -f "/usr/lib/postgresql/$pg_major/lib/$1.so" ]
}

left_out=()
for pair in timescaledb:timescaledb vector:pgvector; do
  ext=${pair%%:*} tests=${pair##*:}
  installed "$ext" && continue
  if [ "${MERIDIAN_REQUIRE_PG_EXTENSIONS:-}" = 1 ]; then
    printf 'make test: %s is not installed; its tests run and fail (MERIDIAN_REQUIRE_PG_EXTENSIONS=1)\n' "$ext" >&2
    continue
  fi
  printf 'make test: %s is not installed in PostgreSQL %s, so the tests named `%s` are left out of this run (infra/scripts/setup.sh installs it)\n' \
    "$ext" "${pg_major:-?}" "$tests" >&2
  left_out+=("test(/$tests/)")
done

if [ ${#left_out[@]} -gt 0 ]; then
  joined=$(printf ' | %s' "${left_out[@]}")
  printf 'not (%s)\n' "${joined:3}"
fi
