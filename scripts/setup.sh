#!/usr/bin/env bash
# Installs everything balloond's build, tests and demo need on a fresh Debian machine, for
# both test platforms:
#   - Debian packages (qemu-system-x86, busybox-static, libpci-dev, zlib1g-dev, cpio, xz-utils,
#     python3-pip when pip is missing, lintian);
#   - Python packages with pip: qemu.qmp (QEMU's QMP library, for scripts/guestlib.py) and
#     matplotlib (plots);
#   - promtool from Debian's prometheus package, unpacked into .cache/prometheus/ (unless a
#     promtool is on PATH);
#   - platform 7.2/6.1: the system QEMU 7.2 and bookworm's guest kernel (the package
#     linux-image-amd64 depends on), unpacked into .cache/kernel/;
#   - platform 10.0/6.12: QEMU 10.0 (qemu-system-x86, qemu-system-common, qemu-system-data
#     from bookworm-backports) unpacked into .cache/qemu-10.0/root/ beside the system QEMU,
#     plus the shared libraries it needs that the system lacks; and bookworm-backports' 6.12
#     guest kernel unpacked into .cache/kernel-6.12/. The bookworm-backports apt source is
#     added (/etc/apt/sources.list.d/bookworm-backports.sources) only when no apt source
#     names that suite yet.
# QEMU 10 runs as .cache/qemu-10.0/qemu-system-x86_64, a wrapper that adds
# `-L <root>/usr/share/qemu -L /usr/share/seabios`; run-guest.sh uses it with QEMU_VERSION=10.0.
# Safe to run again: it skips what is already there. BALLOOND_SKIP_PLATFORM_10=1 skips the
# 10.0/6.12 platform.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${BALLOOND_CACHE:-$PWD/.cache}
mkdir -p "$CACHE"

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 && dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
dpkg -s libpci-dev >/dev/null 2>&1 || need+=(libpci-dev)
dpkg -s zlib1g-dev >/dev/null 2>&1 || need+=(zlib1g-dev)
command -v cpio >/dev/null || need+=(cpio)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v xz >/dev/null || need+=(xz-utils)  # the 6.12 kernel's modules are .ko.xz
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)  # installs qemu.qmp, matplotlib
# scripts/package.sh: the .deb is checked with lintian (dpkg-deb comes with dpkg).
command -v lintian >/dev/null || need+=(lintian)
# apt's chatter goes to a log; on failure its tail is shown.
APT_LOG=$CACHE/setup-apt.log
apt_quiet() {
  if ! "$@" >>"$APT_LOG" 2>&1; then
    echo "setup: '$*' failed; last lines of $APT_LOG:" >&2
    tail -n 20 "$APT_LOG" >&2
    exit 1
  fi
}
export DEBIAN_FRONTEND=noninteractive
# apt-get update at most once per run (twice if this run adds an apt source).
APT_UPDATED=0
apt_update_once() {
  [ "$APT_UPDATED" = 1 ] && return 0
  echo "setup: apt-get update (log: $APT_LOG)" >&2
  apt_quiet apt-get update -qq
  APT_UPDATED=1
}
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} (log: $APT_LOG)" >&2
  apt_update_once
  apt_quiet apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The scripts' Python libraries (PyPI): qemu.qmp, QEMU's QMP library (scripts/guestlib.py,
# used by migrate.py and bench-balloon.py), and matplotlib for the plots.
python3 scripts/guestlib.py || { echo "setup: cannot install the Python package qemu.qmp with pip" >&2; exit 1; }

# The guest kernel: linux-image-amd64 is a metapackage; download what it depends on.
KDIR="$CACHE/kernel"
if [ ! -f "$KDIR/.done" ]; then
  if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then apt_update_once; fi
  # Candidate version (bookworm: backports has a lower pin), so this stays the 6.1 kernel.
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$pkg" ] || { echo "setup: cannot find the kernel package linux-image-amd64 depends on" >&2; exit 1; }
  echo "setup: downloading guest kernel $pkg" >&2
  rm -rf "$KDIR"; mkdir -p "$KDIR/pkg"
  (cd "$KDIR/pkg" && apt_quiet apt-get download "$pkg")
  dpkg-deb -x "$KDIR"/pkg/*.deb "$KDIR/root"
  kernels=("$KDIR"/root/boot/vmlinuz-*)
  vmlinuz=${kernels[0]}
  [ -f "$vmlinuz" ] || { echo "setup: no vmlinuz in $pkg" >&2; exit 1; }
  kver=${vmlinuz##*/vmlinuz-}
  ln -sf "$vmlinuz" "$KDIR/vmlinuz"
  echo "$kver" > "$KDIR/version"
  touch "$KDIR/.done"
fi

# promtool (the metrics test runs `promtool check metrics`), from Debian's prometheus package.
# That package is large (19 MB download, 96 MB installed, a dozen JavaScript packages) and
# installing it starts a Prometheus server, so only promtool is used: a promtool already on
# PATH, else the package downloaded and unpacked into .cache/prometheus/ (never installed).
PDIR=$CACHE/prometheus
if ! command -v promtool >/dev/null && [ ! -f "$PDIR/.done" ]; then
  if ! apt-cache show prometheus >/dev/null 2>&1; then apt_update_once; fi
  echo "setup: downloading Debian's prometheus package for promtool ($(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')) into $PDIR" >&2
  rm -rf "$PDIR"; mkdir -p "$PDIR/pkg"
  (cd "$PDIR/pkg" && apt_quiet apt-get download prometheus)
  dpkg-deb --fsys-tarfile "$PDIR"/pkg/prometheus_*.deb | tar -x -C "$PDIR" ./usr/bin/promtool ||
    { echo "setup: cannot unpack usr/bin/promtool from $PDIR/pkg" >&2; exit 1; }
  rm -rf "$PDIR/pkg"
  ln -sf usr/bin/promtool "$PDIR/promtool"
  "$PDIR/promtool" --version >/dev/null 2>&1 || { echo "setup: $PDIR/promtool does not run" >&2; exit 1; }
  touch "$PDIR/.done"
fi

if [ "${BALLOOND_SKIP_PLATFORM_10:-0}" = 1 ]; then
  echo "setup: ready: platform 7.2/6.1 (kernel $(cat "$KDIR/version")); platform 10.0/6.12 skipped (BALLOOND_SKIP_PLATFORM_10=1)" >&2
  exit 0
fi

# --- platform 10.0/6.12 (bookworm-backports) ----------------------------------------------
BPO=bookworm-backports
QDIR=$CACHE/qemu-10.0
K12DIR=$CACHE/kernel-6.12

# The backports suite as an apt source, only when no source names it yet. Same mirror and
# keyring as the system's bookworm source (deb.debian.org if none is found).
bpo_source_present() {
  grep -rqsE "^[^#]*[[:space:]]$BPO([[:space:]]|$)" /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}
if ! bpo_source_present; then
  mirror=$(grep -hsE '^[[:space:]]*URIs:.*/debian/?[[:space:]]*$' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2; exit}')
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  mirror=${mirror:-http://deb.debian.org/debian}
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  src=/etc/apt/sources.list.d/$BPO.sources
  echo "setup: adding the $BPO apt source ($mirror) as $src" >&2
  if ! {
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\n' "$mirror" "$BPO"
    if [ -f "$keyring" ]; then printf 'Signed-By: %s\n' "$keyring"; fi
  } >"$src.tmp" 2>/dev/null || ! mv "$src.tmp" "$src"; then
    echo "setup: cannot write $src: run setup.sh as root, or add $BPO to apt's sources yourself" >&2
    exit 1
  fi
  APT_UPDATED=0  # the new source needs its own update
fi

# The version of package $1 in bookworm-backports, or nothing.
bpo_version() { apt-cache madison "$1" 2>/dev/null | awk -v s="$BPO/" 'index($0, s) {print $3; exit}'; }

# apt must know the backports lists (the source may be new, or never updated).
if [ -z "$(bpo_version qemu-system-x86)" ]; then
  apt_update_once
  [ -n "$(bpo_version qemu-system-x86)" ] || {
    echo "setup: after apt-get update apt still knows no qemu-system-x86 in $BPO: check the $BPO source in /etc/apt/sources.list.d/ (log: $APT_LOG)" >&2
    exit 1
  }
fi

# Downloads packages ($2...) from backports into $1/pkg and unpacks them into $1/root.
fetch_unpack() { # dir pkg...
  local dir=$1 p
  shift
  rm -rf "$dir"
  mkdir -p "$dir/pkg" "$dir/root"
  for p in "$@"; do
    echo "setup: downloading $p $(bpo_version "$p") from $BPO" >&2
    (cd "$dir/pkg" && apt_quiet apt-get download "$p/$BPO")
  done
  for p in "$dir"/pkg/*.deb; do
    dpkg-deb -x "$p" "$dir/root" || { echo "setup: dpkg-deb -x $p failed" >&2; exit 1; }
  done
}

# QEMU 10.0.
if [ ! -f "$QDIR/.done" ]; then
  qv=$(bpo_version qemu-system-x86)
  case $qv in
    *:10.0* | 10.0*) ;;
    *) echo "setup: $BPO has qemu-system-x86 '$qv', not 10.0.x: cannot set up platform 10.0" >&2; exit 1 ;;
  esac
  fetch_unpack "$QDIR" qemu-system-x86 qemu-system-common qemu-system-data
  [ -x "$QDIR/root/usr/bin/qemu-system-x86_64" ] || { echo "setup: no usr/bin/qemu-system-x86_64 in $QDIR/root" >&2; exit 1; }
  echo "$qv" >"$QDIR/version"
fi
QEMU10=$QDIR/root/usr/bin/qemu-system-x86_64
QEMU10_ARGS=(-L "$QDIR/root/usr/share/qemu" -L /usr/share/seabios)
# Shared libraries QEMU 10 needs that the system lacks or has too old: the library packages
# the debs depend on, from bookworm where its version is enough, else from backports.
qemu10_runs() { ldd "$QEMU10" 2>&1 | grep -q 'not found' && return 1; "$QEMU10" "${QEMU10_ARGS[@]}" --version >/dev/null 2>&1; }
if ! qemu10_runs; then
  # "libfoo1 (>= 1.2), libbar | libbaz" -> libfoo1 libbar libbaz (library packages only).
  deps=$(for d in "$QDIR"/pkg/*.deb; do dpkg-deb -f "$d" Depends; done | tr ',|' '\n\n' |
    sed -E 's/\(.*\)//; s/[[:space:]]//g; s/:any$//' | grep -E '^lib' | sort -u)
  echo "setup: QEMU 10 lacks shared libraries ($(ldd "$QEMU10" 2>&1 | awk '/not found/ {printf "%s ", $1}')); installing its library dependencies (log: $APT_LOG)" >&2
  apt_update_once
  # shellcheck disable=SC2086 # deps is a word list
  if ! apt-get install -y -qq --no-install-recommends $deps >>"$APT_LOG" 2>&1; then
    # Some need backports' version: take those packages from backports.
    bpo=()
    for p in $deps; do [ -n "$(bpo_version "$p")" ] && bpo+=("$p/$BPO") || bpo+=("$p"); done
    apt_quiet apt-get install -y -qq --no-install-recommends "${bpo[@]}"
  fi
  qemu10_runs || {
    echo "setup: QEMU 10 still does not run; ldd $QEMU10:" >&2
    ldd "$QEMU10" 2>&1 | grep 'not found' >&2
    "$QEMU10" "${QEMU10_ARGS[@]}" --version >&2 || true
    exit 1
  }
fi
# A wrapper with the firmware search paths, so that QEMU=.cache/qemu-10.0/qemu-system-x86_64
# works wherever a QEMU binary is expected (run-guest.sh, migrate.py).
wrapper=$QDIR/qemu-system-x86_64
{
  echo '#!/bin/sh'
  echo "# QEMU 10.0 from $BPO, unpacked by scripts/setup.sh; its firmware, then the system's seabios."
  echo "exec '$QEMU10' -L '$QDIR/root/usr/share/qemu' -L /usr/share/seabios \"\$@\""
} >"$wrapper.tmp"
chmod +x "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"
touch "$QDIR/.done"

# The 6.12 guest kernel: the image the backports linux-image-amd64 metapackage depends on,
# else the newest linux-image-6.12.*-amd64 (not -unsigned, not -dbg) in backports.
if [ ! -f "$K12DIR/.done" ]; then
  kpkg=$(apt-cache show "linux-image-amd64/$BPO" 2>/dev/null | awk -F': ' '/^Depends:/ {print $2; exit}' |
    tr ',|' '\n\n' | sed -E 's/\(.*\)//; s/[[:space:]]//g' | grep -E '^linux-image-6\.12' | head -n1 || true)
  if [ -z "$kpkg" ]; then
    kpkg=$(apt-cache pkgnames linux-image-6.12 2>/dev/null | grep -E '^linux-image-6\.12\.[0-9]+.*-amd64$' |
      grep -vE -- '-(unsigned|dbg)$' | sort -V | tail -n1 || true)
  fi
  [ -n "$kpkg" ] || { echo "setup: found no linux-image-6.12*-amd64 package in $BPO" >&2; exit 1; }
  fetch_unpack "$K12DIR" "$kpkg"
  kernels=("$K12DIR"/root/boot/vmlinuz-*)
  vmlinuz=${kernels[0]}
  [ -f "$vmlinuz" ] || { echo "setup: no vmlinuz in $kpkg" >&2; exit 1; }
  ln -sf "$vmlinuz" "$K12DIR/vmlinuz"
  echo "${vmlinuz##*/vmlinuz-}" >"$K12DIR/version"
  touch "$K12DIR/.done"
fi
echo "setup: ready: platform 7.2/6.1 (system QEMU, kernel $(cat "$KDIR/version")); platform 10.0/6.12 (QEMU $(cat "$QDIR/version"), kernel $(cat "$K12DIR/version"))" >&2
