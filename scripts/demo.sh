#!/usr/bin/env bash
# The main job: on a fresh machine, installs what is needed, builds balloond and the guest
# image, then live-migrates a 1 GiB QEMU guest (TCG) between two QEMUs on 127.0.0.1, once
# with no balloon driver, once with the in-kernel virtio_balloon driver and once with
# balloond, and prints what free page hinting saved (QEMU's own query-migrate numbers).
#   scripts/demo.sh                     # the comparison
#   scripts/demo.sh --runs 3            # more runs (medians), any scripts/migrate.py option
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "demo: building balloond (release, static Swift stdlib)" >&2
swift build -c release --static-swift-stdlib --product balloond >&2
scripts/build-guest.sh >&2
exec python3 scripts/migrate.py --modes none,kernel,balloond "$@"
