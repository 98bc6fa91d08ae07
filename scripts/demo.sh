#!/usr/bin/env bash
# The main job: on a fresh machine, installs what is needed, builds balloond and the guest
# image, inflates a guest to 512 MiB and back with each driver and prints the times and the
# host memory given back (scripts/bench-balloon.py, one run); then live-migrates a 1 GiB
# QEMU guest (TCG) between two QEMUs on 127.0.0.1 at the seed's configuration
# (max-bandwidth 100 Gbit/s, downtime limit 2 s; the guest dirties about 75 % of its RAM and
# frees it first): once with nothing dirtied (floor), once with no balloon driver, once with
# the in-kernel virtio_balloon driver, once with balloond (auto) and once with balloond's
# offline source keeping a reserve (--hint-reserve-mib: free memory blocks held offline
# between migrations and hinted at once; that run waits about a minute for the reserve to
# refill after the workload), on every QEMU version that
# scripts/setup.sh set up (7.2, and 10.0 from bookworm-backports). It ends with the table
# (QEMU's own query-migrate numbers, one per version) and a PNG plot of time and bytes per
# mode and version, and prints the plot's path.
# Runs are interleaved: 3 per mode on the first version (the table shows medians), 1 on the
# second, so the whole migration part takes about 15 minutes.
#   scripts/demo.sh                     # the comparison
#   scripts/demo.sh --runs 1            # one run per mode and version
#   scripts/demo.sh --runs 5,3          # 5 runs on QEMU 7.2, 3 on 10.0
#   scripts/demo.sh --qemu-version 10.0 # one version only; any scripts/migrate.py option
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${BALLOOND_CACHE:-$PWD/.cache}
OUT=$CACHE/demo
scripts/setup.sh
echo "demo: building balloond (release, static Swift stdlib)" >&2
swift build -c release --static-swift-stdlib --product balloond >&2
scripts/build-guest.sh >&2

versions=7.2
if [ -f "$CACHE/qemu-10.0/.done" ]; then
  versions=7.2,10.0
else
  echo "demo: QEMU 10.0 is not set up (BALLOOND_SKIP_PLATFORM_10=1?): only QEMU 7.2 is shown" >&2
fi

mkdir -p "$OUT"
rm -f "$OUT/migrate.png" "$OUT/migrate.json"
status=0
python3 scripts/bench-balloon.py --drivers kernel,balloond --runs 1 || status=$?
echo "demo: migrating on QEMU ${versions/,/ and } (max-bandwidth 100 Gbit/s, downtime limit 2 s)" >&2
python3 scripts/migrate.py --modes floor,none,kernel,balloond,balloond:offline+reserve --qemu-version "$versions" --runs 3,1 \
  --bandwidth-gbit 100 --downtime-ms 2000 --dirty-percent 75 \
  --json "$OUT/migrate.json" --plot "$OUT/migrate.png" "$@" || status=$?
echo
if [ -f "$OUT/migrate.png" ]; then
  echo "demo: plot of time and bytes per mode and QEMU version: $OUT/migrate.png"
else
  echo "demo: no plot was written (see the messages above); the table above has the numbers"
fi
echo "demo: per-run results: $OUT/migrate.json"
exit "$status"
