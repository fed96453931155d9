#!/usr/bin/env bash
# Sets the machine up, then lints and tests. Extra args go to `cargo test`
# (e.g. `scripts/test.sh launch` runs only tests matching "launch").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh

# What test instances (named t + 8 hex digits) of an earlier run left: a warm network that was
# being created while its test ended, a preview a webhook run launched as its test ended.
# Containers first, then their volumes, networks and built images.
sweep_test_leftovers() {
    docker ps -a --filter label=previewd.managed=true --format '{{.ID}} {{.Label "previewd.instance"}}' |
        grep -E ' t[0-9a-f]{8}$' | cut -d' ' -f1 | xargs -r docker rm -f >/dev/null 2>&1 || true
    docker volume ls --filter label=previewd.managed=true --format '{{.Name}}' |
        grep -E '^previewd\.t[0-9a-f]{8}\.' | xargs -r docker volume rm >/dev/null 2>&1 || true
    docker network ls --filter label=previewd.managed=true --format '{{.Name}}' |
        grep -E '^previewd\.t[0-9a-f]{8}\.pv-' | xargs -r docker network rm >/dev/null 2>&1 || true
    # With each built image, the build's own image it names (previewd.cache: the layer cache).
    docker images --filter label=previewd.built=true --format '{{.ID}} {{.Repository}}' |
        grep -E ' previewd-t[0-9a-f]{8}/' | cut -d' ' -f1 | sort -u |
        xargs -r docker image inspect --format '{{.Id}} {{index .Config.Labels "previewd.cache"}}' 2>/dev/null |
        tr ' ' '\n' | grep -E '^sha256:' | sort -u | xargs -r docker rmi -f >/dev/null 2>&1 || true
}
sweep_test_leftovers

cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
echo "test: cargo fmt --check" >&2
cargo fmt --check

cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
echo "test: cargo clippy --all-targets -- -D warnings" >&2
cargo clippy --all-targets -- -D warnings

# Tests last, so their summary closes the output. --all-targets covers the library, the binary
# and tests/ (previewd has no doctests). The totals line sums every test binary's result.
echo "test: cargo test --all-targets $*" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets "$@" 2>&1 | tee "$log" || status=$?
# The fault drills that need a second Docker engine and a read-only mount (scripts/drills.sh,
# about a minute) and the Swarm drills on three engines of their own (scripts/swarm-drills.sh,
# about a minute) run against the release binary setup.sh just built; skipped when a filter is given.
drills="not run (a test filter was given)"
if [ $# -eq 0 ]; then
    echo "test: scripts/drills.sh" >&2
    if bash scripts/drills.sh; then drills="passed"; else drills="FAILED"; status=1; fi
    echo "test: scripts/swarm-drills.sh" >&2
    if bash scripts/swarm-drills.sh; then drills="$drills; swarm drills passed"; else drills="$drills; swarm drills FAILED"; status=1; fi
fi
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
echo "drills: $drills"
sweep_test_leftovers
exit "$status"
