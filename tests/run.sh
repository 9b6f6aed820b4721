#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs the peers (tests/setup.sh), checks format
# and lints, runs every test on SQLite and the store-touching suite again on PostgreSQL, and
# checks the shipped deploy/ files (promtool, amtool, manifests).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash tests/setup.sh)"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== build and policy check"
cargo build --locked
target/debug/rollback-responder policy check policies

echo "== deploy/ checks"
ROLLBACK_RESPONDER_BIN=target/debug/rollback-responder bash .ci/check-deploy

pg_url=$TEST_DATABASE_URL
echo "== tests on SQLite"
TEST_DATABASE_URL= cargo test --locked --no-fail-fast
echo "== store-touching tests on PostgreSQL"
TEST_DATABASE_URL=$pg_url cargo test --locked --no-fail-fast --test api
