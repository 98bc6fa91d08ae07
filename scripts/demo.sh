#!/usr/bin/env bash
# The main job: on a fresh machine, installs what is needed, builds balloond and the guest
# image, then live-migrates a 1 GiB QEMU guest (TCG) between two QEMUs on 127.0.0.1, once
# with no balloon driver, once with the in-kernel virtio_balloon driver and once with
# balloond, and prints what free page hinting saved (QEMU's own query-migrate numbers);
# then inflates a guest to 512 MiB and back with each driver and prints the times and the
# host memory given back (scripts/bench-balloon.py, one run).
#   scripts/demo.sh                     # the comparison
#   scripts/demo.sh --runs 3            # more migration runs (medians), any scripts/migrate.py option
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "demo: building balloond (release, static Swift stdlib)" >&2
swift build -c release --static-swift-stdlib --product balloond >&2
scripts/build-guest.sh >&2
status=0
python3 scripts/migrate.py --modes floor,none,kernel,balloond "$@" || status=$?
python3 scripts/bench-balloon.py --drivers kernel,balloond --runs 1 || status=$?
exit "$status"
