#!/usr/bin/env bash
# Balloon inflate/deflate benchmark: checks that the guest kernel and image are there, runs
# scripts/bench-balloon.py (fresh 1 GiB TCG guest per driver and run) and says where the
# results are. Arguments go to bench-balloon.py, e.g.
#   scripts/bench-balloon.sh                              # kernel and balloond, 3 runs each
#   scripts/bench-balloon.sh --drivers kernel --runs 1
# Without --json the results go to .cache/runs/bench-balloon/results-<time>.json.
# Build first with: scripts/setup.sh, swift build -c release --static-swift-stdlib
# --product balloond, scripts/build-guest.sh (or just scripts/test.sh once).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${BALLOOND_CACHE:-$PWD/.cache}
IMAGE=$CACHE/guest/initramfs.cpio.gz
RELEASE=$CACHE/guest/root/etc/balloond-guest-release

die() { echo "bench-balloon: error: $*" >&2; exit 1; }

[ -e "$CACHE/kernel/vmlinuz" ] || die "no guest kernel in $CACHE/kernel: run scripts/setup.sh"
[ -f "$IMAGE" ] || die "no guest image at $IMAGE: run scripts/build-guest.sh"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found: run scripts/setup.sh"
command -v python3 >/dev/null || die "python3 not found"
if [ -f "$RELEASE" ]; then
  grep -q '^memhog_sha256=' "$RELEASE" || die "the guest image has no memhog: rerun scripts/build-guest.sh"
fi

# The drivers asked for (bench-balloon.py's default: kernel,balloond).
drivers=kernel,balloond
json=
prev=
for a in "$@"; do
  case $prev in --drivers) drivers=$a ;; --json) json=$a ;; esac
  case $a in --drivers=*) drivers=${a#*=} ;; --json=*) json=${a#*=} ;; esac
  prev=$a
done
if [[ ,$drivers, == *,balloond,* ]] && [ -f "$RELEASE" ] && grep -q '^balloond=$' "$RELEASE"; then
  die "the guest image has no balloond: build it (swift build -c release --static-swift-stdlib --product balloond) and rerun scripts/build-guest.sh, or pass --drivers kernel"
fi

extra=()
if [ -z "$json" ]; then
  mkdir -p "$CACHE/runs/bench-balloon"
  json=$CACHE/runs/bench-balloon/results-$(date +%Y%m%d-%H%M%S).json
  extra=(--json "$json")
fi
rc=0
python3 scripts/bench-balloon.py "$@" "${extra[@]}" || rc=$?
echo "bench-balloon: results in $json; per-run guest logs in $CACHE/runs/bench-balloon/<driver>-<run>/" >&2
exit "$rc"
