# Meridian: the two commands are `make up` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
SETUP := infra/scripts/setup.sh

.PHONY: up test lint bench build setup fmt

## Start three local regions (own Redis + PostgreSQL each) and the gateway.
up: setup
	$(CARGO) build --bin meridian
	./target/debug/meridian up

## Run every test (unit, integration, fault) with cargo-nextest.
test: setup
	$(CARGO) nextest run --workspace --no-fail-fast --profile ci

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

build: setup
	$(CARGO) build --workspace

setup:
	@bash $(SETUP)
