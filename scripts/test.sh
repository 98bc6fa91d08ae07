#!/usr/bin/env bash
# The one test command: installs prerequisites, builds balloond in release mode (so the
# guest image carries it), builds the guest image, then runs every test target (unit tests
# and IntegrationTests, which boot QEMU guests). Extra arguments go to `swift test`, e.g.
#   scripts/test.sh --skip IntegrationTests      # unit tests only
#   scripts/test.sh --filter GuestBootTests
# Exits non-zero if any step fails, and says which.
set -euo pipefail
cd "$(dirname "$0")/.."

step="(start)"
section() {
  step=$*
  printf '\n==== %s ====\n' "$step"
}
on_exit() {
  local rc=$?
  [ "$rc" -eq 0 ] || printf '\n==== FAILED: %s (exit %s) ====\n' "$step" "$rc" >&2
}
trap on_exit EXIT

section "setup (scripts/setup.sh)"
scripts/setup.sh

section "build balloond (release, static Swift stdlib)"
swift build -c release --static-swift-stdlib --product balloond

section "guest image (scripts/build-guest.sh)"
scripts/build-guest.sh

section "tests (swift test $*)"
swift test "$@"

printf '\n==== all tests passed ====\n'
