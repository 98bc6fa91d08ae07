#!/usr/bin/env bash
# The migration benchmark (a script, not a test), at the seed's configuration: live migration
# of TCG guests over loopback with max-bandwidth 100 Gbit/s and a 2 s downtime limit; the
# guest dirties about 75 % of its RAM (memhog) and frees it before migrating. Every mode runs
# RUNS times (>= 3 for medians), interleaved across modes and guest sizes:
#   floor                no driver, free memory never dirtied: only used memory is sent
#   none                 no driver (the baseline)
#   kernel               the in-kernel virtio_balloon driver (the anchor)
#   balloond:kpageflags  balloond's scan source (the TCG default)
#   balloond:hugetlb     owned source: hugetlb pool pages (the KVM default)
#   balloond:offline     owned source: memory blocks taken offline during the round
#   balloond:offline+reserve
#                        the same with --hint-reserve-mib (guest size): blocks kept offline
#                        between migrations, hinted at once; the run waits until the reserve
#                        has refilled after the workload (a minute after it gave way)
#   kernel@poison, balloond@poison, balloond:offline+reserve@poison
#                        the same on a page_poison=1 guest (auto picks offline there), on
#                        the smallest guest size only (--poison-mem to change)
# Also: balloond:anonymous, balloond (auto), balloond:SOURCE-control (scripts/migrate.py).
# Prints one table per guest size (medians, vs none, x floor, hinted MiB, first hint and STOP
# ms, the source balloond used, owned sources against the in-kernel driver) and writes the
# per-run JSON and a plot of time and bytes per mode and size to .cache/bench/.
#
#   scripts/bench-migrate.sh                          # QEMU 10.0, 1024 and 4096 MiB, 3 runs
#   scripts/bench-migrate.sh --qemu 7.2               # the same on QEMU 7.2
#   scripts/bench-migrate.sh --mem 1024 --runs 5 --modes kernel,balloond:hugetlb
#   scripts/bench-migrate.sh --bandwidth-mib 128      # QEMU's default cap instead of 100 Gbit/s
#   scripts/bench-migrate.sh --no-poison              # without the page_poison=1 guest
# Options: --qemu 7.2|10.0 (default 10.0), --mem MIB[,MIB...] (default 1024,4096), --runs N
# (default $RUNS, else 3), --modes LIST (default above), --no-poison; anything else goes to
# scripts/migrate.py after the defaults (so e.g. --bandwidth-mib, --downtime-ms, --dirty-percent,
# --poison-mem, --guest-kernel override them).
# Needs what scripts/demo.sh sets up (it does not run setup or builds itself). Two guests run
# at a time (4 GiB each at the largest size); run it on an otherwise idle machine, timings
# under load are not comparable.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${BALLOOND_CACHE:-$ROOT/.cache}
OUT=$CACHE/bench

die() { echo "bench-migrate: error: $*" >&2; exit 1; }
note() { echo "bench-migrate: $*" >&2; }

QEMU_VER=10.0
MEMS=1024,4096
RUNS=${RUNS:-3}
MODES=floor,none,kernel,balloond:kpageflags,balloond:hugetlb,balloond:offline,balloond:offline+reserve
POISON_MODES=kernel@poison,balloond@poison,balloond:offline+reserve@poison
rest=()
while [ $# -gt 0 ]; do
  case $1 in
    --qemu) [ $# -ge 2 ] || die "--qemu needs 7.2 or 10.0"; QEMU_VER=$2; shift 2 ;;
    --qemu=*) QEMU_VER=${1#*=}; shift ;;
    --mem) [ $# -ge 2 ] || die "--mem needs MIB[,MIB...]"; MEMS=$2; shift 2 ;;
    --mem=*) MEMS=${1#*=}; shift ;;
    --runs) [ $# -ge 2 ] || die "--runs needs a number"; RUNS=$2; shift 2 ;;
    --runs=*) RUNS=${1#*=}; shift ;;
    --modes) [ $# -ge 2 ] || die "--modes needs a list"; MODES=$2; POISON_MODES=; shift 2 ;;
    --modes=*) MODES=${1#*=}; POISON_MODES=; shift ;;
    --no-poison) POISON_MODES=; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) rest+=("$1"); shift ;;
  esac
done
case $QEMU_VER in 7.2 | 10.0) ;; *) die "--qemu must be 7.2 or 10.0, not '$QEMU_VER'" ;; esac
[[ $MEMS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--mem wants MiB sizes separated by commas (e.g. 1024,4096), not '$MEMS'"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs wants a positive number, not '$RUNS'"
[ "$RUNS" -ge 3 ] || note "warning: $RUNS run(s) per mode: the medians need at least 3 (this is a smoke run)"

SETUP_HINT="run scripts/demo.sh (does everything), or scripts/setup.sh, then swift build -c release --static-swift-stdlib --product balloond, then scripts/build-guest.sh"
[ -e "$CACHE/kernel/vmlinuz" ] || die "no guest kernel at $CACHE/kernel/vmlinuz: $SETUP_HINT"
[ -f "$CACHE/guest/initramfs.cpio.gz" ] || die "no guest image at $CACHE/guest/initramfs.cpio.gz: $SETUP_HINT"
if [ "$QEMU_VER" = 10.0 ]; then
  [ -f "$CACHE/qemu-10.0/.done" ] || die "QEMU 10.0 is not set up in $CACHE/qemu-10.0: run scripts/setup.sh (or pass --qemu 7.2)"
else
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found: $SETUP_HINT"
fi
# The balloond modes need balloond inside the image (build-guest.sh adds .build/release/balloond
# when it exists; the staged tree next to the archive shows whether it did).
if [ -d "$CACHE/guest/root" ] && [ ! -e "$CACHE/guest/root/usr/bin/balloond" ]; then
  die "the guest image has no balloond: build it (swift build -c release --static-swift-stdlib --product balloond) and rerun scripts/build-guest.sh, or run scripts/demo.sh"
fi
if [ -f "$CACHE/guest/root/etc/balloond-guest-release" ] && ! grep -q '^memhog_sha256=' "$CACHE/guest/root/etc/balloond-guest-release"; then
  die "the guest image has no memhog (the benchmark dirties memory with it): rerun scripts/build-guest.sh"
fi
command -v python3 >/dev/null || die "python3 not found: $SETUP_HINT"
# QEMU's QMP library and matplotlib (for the plot): pip-installed when missing.
python3 scripts/guestlib.py || die "QEMU's QMP library (qemu.qmp) is missing and pip could not install it: $SETUP_HINT"

smallest=$(tr ',' '\n' <<<"$MEMS" | sort -n | head -1)
all_modes=$MODES${POISON_MODES:+,$POISON_MODES}
mkdir -p "$OUT"
rm -f "$OUT/migrate.json" "$OUT/migrate.png"
note "QEMU $QEMU_VER, guests of $MEMS MiB, $RUNS run(s) per mode: $all_modes"
rc=0
python3 scripts/migrate.py --qemu-version "$QEMU_VER" --mem "$MEMS" --runs "$RUNS" --modes "$all_modes" \
  --bandwidth-gbit 100 --downtime-ms 2000 --dirty-percent 75 --poison-mem "$smallest" \
  --json "$OUT/migrate.json" --plot "$OUT/migrate.png" "${rest[@]}" || rc=$?
note "per-run results: $OUT/migrate.json"
[ -f "$OUT/migrate.png" ] && note "plot:            $OUT/migrate.png"
note "guest logs:      $CACHE/runs/migrate/q<qemu>-<size>M-<mode>-<run>-{src,dst}/ (one version and 1024 MiB: <mode>-<run>-{src,dst}/)"
exit "$rc"
