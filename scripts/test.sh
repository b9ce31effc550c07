#!/usr/bin/env bash
# Runs the workspace tests against the real NBD peers, installing them first.
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh -p nbd-tests`.
# With NBD_TESTS_REQUIRE_PEERS=1 a missing peer fails a test instead of
# skipping it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-peers.sh
export NBD_TESTS_REQUIRE_PEERS=1
cargo test --workspace "$@"
