#!/usr/bin/env bash
# Sets the machine up, then lints and tests. Extra args go to `cargo test`
# (e.g. `scripts/test.sh launch` runs only tests matching "launch").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh

cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
echo "test: cargo clippy --all-targets -- -D warnings" >&2
cargo clippy --all-targets -- -D warnings

# Tests last, so their summary lines close the output.
echo "test: cargo test --all-targets $*" >&2
cargo test --all-targets "$@"
# --all-targets leaves out doctests, which only a library crate has.
if [ -f src/lib.rs ]; then
    cargo test --doc "$@"
fi
