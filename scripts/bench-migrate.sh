#!/usr/bin/env bash
# The migration benchmark (a script, not a test): the same live migration of a 1 GiB TCG
# guest over loopback, interleaved, RUNS times per mode:
#   floor                no driver, free memory never dirtied: only used memory is sent
#   none                 no driver, ~600 MiB dirtied and freed (the baseline)
#   kernel               the in-kernel virtio_balloon driver (the anchor)
#   balloond:kpageflags  balloond's scan source (the TCG default)
#   balloond:anonymous   only with OWNED=1 (an owned source; under TCG its churn alone
#                        corrupts the destination, see balloond:anonymous-control)
# Prints scripts/migrate.py's table (medians, vs none, x floor, hinted MiB, first hint and
# STOP ms) and writes the per-run JSON and a plot to .cache/bench/.
#   scripts/bench-migrate.sh                      # RUNS=3
#   RUNS=5 OWNED=1 scripts/bench-migrate.sh       # more runs, plus balloond:anonymous
#   scripts/bench-migrate.sh --dirty-mib 400      # any further scripts/migrate.py option
# Needs what scripts/demo.sh sets up (it does not run setup or builds itself). Two guests run
# at a time; run it on an otherwise idle machine, timings under load are not comparable.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${BALLOOND_CACHE:-$ROOT/.cache}
OUT=$CACHE/bench

die() { echo "bench-migrate: error: $*" >&2; exit 1; }
note() { echo "bench-migrate: $*" >&2; }

SETUP_HINT="run scripts/demo.sh (does everything), or scripts/setup.sh, then swift build -c release --static-swift-stdlib --product balloond, then scripts/build-guest.sh"
[ -e "$CACHE/kernel/vmlinuz" ] || die "no guest kernel at $CACHE/kernel/vmlinuz: $SETUP_HINT"
[ -f "$CACHE/guest/initramfs.cpio.gz" ] || die "no guest image at $CACHE/guest/initramfs.cpio.gz: $SETUP_HINT"
command -v "${QEMU:-qemu-system-x86_64}" >/dev/null || die "${QEMU:-qemu-system-x86_64} not found: $SETUP_HINT"
# The balloond modes need balloond inside the image (build-guest.sh adds .build/release/balloond
# when it exists; the staged tree next to the archive shows whether it did).
if [ -d "$CACHE/guest/root" ] && [ ! -e "$CACHE/guest/root/usr/bin/balloond" ]; then
  die "the guest image has no balloond: build it (swift build -c release --static-swift-stdlib --product balloond) and rerun scripts/build-guest.sh, or run scripts/demo.sh"
fi
command -v python3 >/dev/null || die "python3 not found: $SETUP_HINT"

# The plot uses matplotlib (migrate.py falls back to gnuplot, else prints only the table).
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  note "matplotlib missing; installing it with pip (for the plot)"
  python3 -m pip install --quiet matplotlib >&2 ||
    note "pip install matplotlib failed; migrate.py will use gnuplot if installed, else print only the table"
fi

MODES=floor,none,kernel,balloond:kpageflags
[ "${OWNED:-0}" = 1 ] && MODES+=,balloond:anonymous

mkdir -p "$OUT"
rm -f "$OUT/migrate.json" "$OUT/migrate.png"
rc=0
python3 scripts/migrate.py --modes "$MODES" --runs "${RUNS:-3}" \
  --json "$OUT/migrate.json" --plot "$OUT/migrate.png" "$@" || rc=$?
note "per-run results: $OUT/migrate.json"
[ -f "$OUT/migrate.png" ] && note "plot:            $OUT/migrate.png"
note "guest logs:      $CACHE/runs/migrate/<mode>-<run>-{src,dst}/"
exit "$rc"
