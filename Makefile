# Meridian: the two commands are `make up` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
SETUP := infra/scripts/setup.sh

.PHONY: up test lint bench build setup fmt fuzz soak conformance

## Start three local regions (own Redis + PostgreSQL each) and the gateway.
## MODELS=file.toml adds its [[models]] and [[aliases]] to every region.
up: setup
	$(CARGO) build --bin meridian
	./target/debug/meridian up $(if $(MODELS),--models $(MODELS))

## Run every test (unit, integration, fault) with cargo-nextest. Tests of a
## PostgreSQL extension this machine lacks (TimescaleDB, pgvector) are left
## out and named, except under MERIDIAN_REQUIRE_PG_EXTENSIONS=1 (CI), where
## they run and fail.
test: setup
	@filter="$$(bash infra/scripts/test-filter.sh)"; \
	echo "$(CARGO) nextest run --workspace --no-fail-fast --profile ci$${filter:+ -E '$$filter'}"; \
	$(CARGO) nextest run --workspace --no-fail-fast --profile ci $${filter:+-E "$$filter"}

## Formatting and clippy, warnings as errors.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Benchmarks, kept out of `make test`: each reports ratios against a
## baseline measured in the same run.
bench: setup
	$(CARGO) bench -p meridian-tests

## Fuzz every target (tests/tests/fuzz) for FUZZ_SECONDS in total (default
## 600), split evenly, each under a random seed it prints with its case
## count; a finding fails the run, its input saved in .meridian/fuzz-findings.
FUZZ_SECONDS ?= 600
fuzz: setup
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(CARGO) test -p meridian-tests --test fuzz -- --test-threads=1 --nocapture

## OpenAI conformance, deeper than in `make test`: schemathesis generates
## CONFORMANCE_EXAMPLES (default 400) cases per operation and phase from
## OpenAI's API description (../shared/openai-openapi) against a local
## deployment, under CONFORMANCE_SEED when set (else the fixed seed it
## prints); prints per-operation counts and fails on any finding.
CONFORMANCE_EXAMPLES ?= 400
conformance: setup
	CONFORMANCE_EXAMPLES=$(CONFORMANCE_EXAMPLES) $(CARGO) test -p meridian-tests --test conformance -- --test-threads=1 --nocapture

## Three regions and a gateway as processes under mixed load for
## SOAK_MINUTES (default 30), a region killed and restarted now and then;
## prints memory, descriptors and connections over time and fails if
## memory or descriptors grow after warm-up.
SOAK_MINUTES ?= 30
soak: setup
	$(CARGO) build -p meridian --bin meridian
	$(CARGO) build -p meridian-tests --bin soak
	SOAK_MINUTES=$(SOAK_MINUTES) $(CARGO) run -q -p meridian-tests --bin soak

build: setup
	$(CARGO) build --workspace

setup:
	@bash $(SETUP)
