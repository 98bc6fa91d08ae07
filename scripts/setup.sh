#!/usr/bin/env bash
# Installs everything balloond's build, tests and demo need on a fresh Debian machine:
# Debian packages (qemu-system-x86, busybox-static, libpci-dev, zlib1g-dev, cpio) and the Debian
# guest kernel (the package linux-image-amd64 depends on), unpacked into .cache/.
# Safe to run again: it skips what is already there.
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
# apt's chatter goes to a log; on failure its tail is shown.
APT_LOG=$CACHE/setup-apt.log
apt_quiet() {
  if ! "$@" >>"$APT_LOG" 2>&1; then
    echo "setup: '$*' failed; last lines of $APT_LOG:" >&2
    tail -n 20 "$APT_LOG" >&2
    exit 1
  fi
}
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} (log: $APT_LOG)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt_quiet apt-get update -qq
  apt_quiet apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The guest kernel: linux-image-amd64 is a metapackage; download what it depends on.
KDIR="$CACHE/kernel"
if [ ! -f "$KDIR/.done" ]; then
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then apt_quiet apt-get update -qq; fi
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
echo "setup: ready (kernel $(cat "$KDIR/version"))" >&2
