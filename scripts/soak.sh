#!/usr/bin/env bash
# The long soak (issue 8): the release binary, as its own process, on
# loopback only, against 100 stand-in pods. Each round: 1 000 simulated
# users churning through allocate / browse / SSE / upload / download /
# WebSocket / release (120 at a time, so some wait on 503s), while 8 users
# who hold a pod open and close 2 000 WebSockets between them. Rounds repeat
# for about five minutes (at most 200 rounds). Afterwards the router's RSS
# and open file descriptors must be within 10 % of their baseline (taken
# after a warm-up round of the same size), every pod free, no error but the
# expected 503s, and a clean stop on SIGTERM. Each round prints the router's
# RSS and descriptor count; the last line has the figures.
#
# Usage: scripts/soak.sh            (about 5-10 minutes with the build)
# Any SOAK_* variable (see tests/soak.rs) overrides the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."

export SOAK_USERS="${SOAK_USERS:-1000}"
export SOAK_WS_OPENS="${SOAK_WS_OPENS:-2000}"
export SOAK_PODS="${SOAK_PODS:-100}"
export SOAK_CONCURRENCY="${SOAK_CONCURRENCY:-120}"
export SOAK_SECONDS="${SOAK_SECONDS:-300}"
export SOAK_ROUNDS="${SOAK_ROUNDS:-200}"

cargo test --release --test soak -- --nocapture --test-threads=1
