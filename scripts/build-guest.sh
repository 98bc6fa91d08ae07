#!/usr/bin/env bash
# Builds the test guest's initramfs for the guest kernel GUEST_KERNEL (6.1, the default:
# .cache/guest/initramfs.cpio.gz; 6.12: .cache/guest-6.12/initramfs.cpio.gz), from:
#   - busybox-static with every applet symlinked (the guest's whole userland),
#   - scripts/guest/init (PID 1), scripts/guest/balloond-agent (the command agent on ttyS1),
#     scripts/guest/bg-run{,-child} (start a program in the background, get its pid and rc),
#   - the kernel modules the tests need (GUEST_MODULES below) and all their dependencies,
#     with modules.dep/alias/... so busybox modprobe works inside the guest,
#   - balloond (BALLOOND_BIN, default .build/release/balloond if it exists) and every shared
#     library ldd lists for it, at the same paths,
#   - /bin/memhog, scripts/guest/memhog.c compiled statically (gcc -static -O2; installs
#     gcc and libc6-dev with apt if they are missing), the memory hog of the balloon tests.
# Modules are staged decompressed (6.12's are .ko.xz). Nothing is loaded at boot. With 6.1
# the balloon stays unbound (virtio_pci is a module there); 6.12 builds virtio_pci in, so
# the balloon starts bound to virtio-pci and `balloond run` unbinds it (as on a real 6.12
# system); the in-kernel comparison then needs only virtio_balloon.
#
# Environment:
#   GUEST_KERNEL    6.1 (default) or 6.12 (scripts/platform.sh)
#   BALLOOND_BIN    balloond binary to include ("" or "none": include none)
#   GUEST_MODULES   extra modules to include (space separated)
#   BALLOOND_CACHE  cache directory (default .cache)
#   BUSYBOX         static busybox to use (default /bin/busybox)
# Fast (a few seconds); rebuilds the archive only when the staged tree changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${BALLOOND_CACHE:-$ROOT/.cache}
BUSYBOX=${BUSYBOX:-/bin/busybox}

die() { echo "build-guest: error: $*" >&2; exit 1; }
note() { echo "build-guest: $*" >&2; }
# The QEMU version does not matter for the image.
# shellcheck source=scripts/platform.sh
QEMU_VERSION=7.2 . "$ROOT/scripts/platform.sh"
KDIR=$PLATFORM_KDIR
OUT_DIR=$PLATFORM_GUEST_DIR
OUT=$OUT_DIR/initramfs.cpio.gz
STAGE=$OUT_DIR/root

if [ ! -f "$KDIR/.done" ] || [ ! -f "$KDIR/version" ]; then
  die "no guest kernel in $KDIR: run scripts/setup.sh first"
fi
KVER=$(cat "$KDIR/version")
KMODS=$KDIR/root/lib/modules/$KVER
[ -d "$KMODS/kernel" ] || die "kernel modules missing in $KMODS: rerun scripts/setup.sh (rm -rf $KDIR first)"
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found: run scripts/setup.sh (installs busybox-static)"
# A dynamic busybox would need its libraries in the image too; insist on the static one.
if ldd "$BUSYBOX" >/dev/null 2>&1; then
  die "$BUSYBOX is dynamically linked: install busybox-static (scripts/setup.sh does)"
fi
for tool in cpio gzip sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found: run scripts/setup.sh"
done

# memhog is linked statically, which needs gcc and glibc's static libc.a (libc6-dev).
# Installed the way setup.sh installs packages, when missing.
LIBC_A=/usr/lib/x86_64-linux-gnu/libc.a
memhog_need=()
command -v gcc >/dev/null || memhog_need+=(gcc)
[ -f "$LIBC_A" ] || memhog_need+=(libc6-dev)
if [ ${#memhog_need[@]} -gt 0 ]; then
  mkdir -p "$CACHE"
  APT_LOG=$CACHE/setup-apt.log
  note "installing ${memhog_need[*]} for memhog (log: $APT_LOG)"
  export DEBIAN_FRONTEND=noninteractive
  for cmd in "apt-get update -qq" "apt-get install -y -qq --no-install-recommends ${memhog_need[*]}"; do
    # shellcheck disable=SC2086 # word splitting of the command on purpose
    if ! $cmd >>"$APT_LOG" 2>&1; then
      tail -n 20 "$APT_LOG" >&2
      die "'$cmd' failed"
    fi
  done
  command -v gcc >/dev/null || die "gcc still missing after installing ${memhog_need[*]}"
  [ -f "$LIBC_A" ] || die "$LIBC_A still missing after installing ${memhog_need[*]}"
fi

# balloond: explicit BALLOOND_BIN must exist; the default is optional.
if [ -n "${BALLOOND_BIN+set}" ]; then
  case $BALLOOND_BIN in
    '' | none) BIN= ;;
    *) [ -f "$BALLOOND_BIN" ] || die "BALLOOND_BIN=$BALLOOND_BIN does not exist"; BIN=$BALLOOND_BIN ;;
  esac
elif [ -f "$ROOT/.build/release/balloond" ]; then
  BIN=$ROOT/.build/release/balloond
else
  BIN=
fi

# --- staging tree -------------------------------------------------------------------------
# Serialise concurrent builds (e.g. two test processes): they share the staging tree.
mkdir -p "$OUT_DIR"
exec 9>"$OUT_DIR/.lock"
flock -w 300 9 || die "another build-guest.sh holds $OUT_DIR/.lock for more than 5 minutes"

# memhog: compiled into the cache (not the staging tree), only when the source's checksum
# changed, so the image stays byte-identical between runs.
MEMHOG_SRC=$ROOT/scripts/guest/memhog.c
MEMHOG=$OUT_DIR/memhog
memhog_sum=$(sha256sum "$MEMHOG_SRC" | cut -d' ' -f1)
if [ ! -x "$MEMHOG" ] || [ "$(cat "$MEMHOG.src.sha256" 2>/dev/null)" != "$memhog_sum" ]; then
  gcc -static -O2 -Wall -o "$MEMHOG.tmp" "$MEMHOG_SRC" || die "compiling $MEMHOG_SRC failed"
  mv "$MEMHOG.tmp" "$MEMHOG"
  echo "$memhog_sum" >"$MEMHOG.src.sha256"
  note "compiled $MEMHOG"
fi
rm -rf "$STAGE"
mkdir -p "$STAGE"
cd "$STAGE"
# Merged-/usr layout like the Debian host, so the library paths ldd prints on the host
# (/lib/x86_64-linux-gnu/..., /lib64/ld-linux-x86-64.so.2) resolve the same way in the guest.
mkdir -p usr/bin usr/sbin usr/lib usr/lib64 usr/libexec
ln -s usr/bin bin
ln -s usr/sbin sbin
ln -s usr/lib lib
ln -s usr/lib64 lib64
mkdir -p dev proc sys tmp run root mnt etc var/log "lib/modules/$KVER"
ln -s /run var/run
ln -s /proc/mounts etc/mtab
echo balloond-guest >etc/hostname
printf 'root:x:0:0:root:/root:/bin/sh\n' >etc/passwd
printf 'root:x:0:\n' >etc/group
printf 'export PS1="[guest \\w]# "\n' >etc/profile

install -m 0755 "$BUSYBOX" usr/bin/busybox
# --list-full gives e.g. bin/sh, sbin/modprobe, usr/bin/awk; with the merged layout every
# one of them lands in usr/bin or usr/sbin. (linuxrc is skipped: we have our own /init.)
while read -r applet; do
  case $applet in linuxrc | */busybox) continue ;; esac
  [ -e "$applet" ] || [ -L "$applet" ] || ln -s /usr/bin/busybox "$applet"
done < <("$BUSYBOX" --list-full)

install -m 0755 "$ROOT/scripts/guest/init" init
install -m 0755 "$ROOT/scripts/guest/balloond-agent" usr/libexec/balloond-agent
install -m 0755 "$ROOT/scripts/guest/bg-run-child" usr/libexec/bg-run-child
install -m 0755 "$ROOT/scripts/guest/bg-run" usr/bin/bg-run
install -m 0755 "$MEMHOG" usr/bin/memhog

# --- kernel modules -----------------------------------------------------------------------
# uio + uio_pci_generic for balloond; virtio_pci + virtio_balloon (pulling in virtio,
# virtio_ring, virtio_pci_modern_dev, virtio_pci_legacy_dev) for comparison runs with the
# in-kernel driver. In Debian's 6.1 kernel all of these are modules (none in
# modules.builtin); 6.12 builds virtio, virtio_ring and virtio_pci in. A module that is
# built in is reported and skipped.
# shellcheck disable=SC2206 # GUEST_MODULES is a space-separated list on purpose
# zram: a compressed swap device, so a stats test can drive the guest into reclaim, swap
# and an OOM kill (the 6.12 stats tags: scans, reclaims, stalls, OOM kills).
# vfio_pci (pulling in vfio, vfio_iommu_type1, vfio_pci_core, irqbypass): balloond's vfio
# backend behind a virtual IOMMU (run-guest.sh VIOMMU=1).
WANT=(uio uio_pci_generic virtio_pci virtio_balloon zram vfio_pci vfio_iommu_type1 ${GUEST_MODULES:-})
declare -A path_of=() done_mod=() builtin=()
# Module names treat '-' and '_' as the same character; keys are normalised to '_'.
# (Parameter expansion, not a $(function): this loop sees ~4000 modules.)
while read -r f; do
  base=${f##*/}
  base=${base%%.ko*}
  path_of[${base//-/_}]=$f
done < <(cd "$KMODS" && find kernel -name '*.ko' -o -name '*.ko.*')
while read -r f; do
  base=${f##*/}
  base=${base%.ko}
  builtin[${base//-/_}]=1
done <"$KMODS/modules.builtin"

# Stages one module, decompressed (busybox modprobe's support for compressed modules depends
# on its build options), then the modules its .modinfo "depends=" names, recursively.
stage_module() { # name
  local name=${1//-/_} rel src dst deps
  [ -z "${done_mod[$name]:-}" ] || return 0
  done_mod[$name]=1
  if [ -n "${builtin[$name]:-}" ]; then note "module $name is built into the kernel"; return 0; fi
  rel=${path_of[$name]:-}
  [ -n "$rel" ] || die "kernel module '$name' not found under $KMODS (is it in GUEST_MODULES by mistake?)"
  src=$KMODS/$rel
  dst=lib/modules/$KVER/${rel%.ko*}.ko
  mkdir -p "${dst%/*}"
  case $rel in
    *.ko) cp "$src" "$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *.ko.xz) command -v xz >/dev/null || die "$rel is xz-compressed: apt-get install xz-utils"; xz -dc "$src" >"$dst" ;;
    *.ko.zst) command -v zstd >/dev/null || die "$rel is zstd-compressed: apt-get install zstd"; zstd -qdc "$src" >"$dst" ;;
    *) die "unknown module format: $rel" ;;
  esac
  # The .modinfo section is a list of NUL-terminated key=value strings.
  deps=$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p')
  deps=${deps%%$'\n'*}
  local d
  for d in ${deps//,/ }; do stage_module "$d"; done
}
for m in "${WANT[@]}"; do stage_module "$m"; done
for f in modules.builtin modules.builtin.modinfo modules.order; do
  [ -f "$KMODS/$f" ] && cp "$KMODS/$f" "lib/modules/$KVER/$f"
done
# busybox depmod writes modules.dep, modules.alias and modules.symbols for the staged set.
"$BUSYBOX" depmod -b "$STAGE" "$KVER" || die "depmod failed"
[ -s "lib/modules/$KVER/modules.dep" ] || die "depmod produced no modules.dep"

# --- balloond and its shared libraries ----------------------------------------------------
libs=()
if [ -n "$BIN" ]; then
  install -m 0755 "$BIN" usr/bin/balloond
  # ldd prints "name => /path (addr)", "/path (addr)" for the loader, and the vdso without a
  # path. "not found" means the binary cannot run in the guest either.
  if ldd_out=$(ldd "$BIN" 2>&1); then
    if grep -q 'not found' <<<"$ldd_out"; then die "ldd $BIN: missing libraries:"$'\n'"$ldd_out"; fi
    while read -r lib; do
      [ -n "$lib" ] || continue
      mkdir -p ".${lib%/*}"
      cp -L "$lib" ".$lib"
      libs+=("$lib")
    done < <(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$ldd_out" | sort -u)
  elif grep -q 'not a dynamic executable' <<<"$ldd_out"; then
    note "$BIN is statically linked"
  else
    die "ldd $BIN failed: $ldd_out"
  fi
  # libpci looks names up in pci.ids when present; optional.
  if [ -f /usr/share/misc/pci.ids ]; then mkdir -p usr/share/misc; cp /usr/share/misc/pci.ids usr/share/misc/; fi
fi

{
  echo "kernel=$KVER"
  echo "guest_kernel=$GUEST_KERNEL"
  echo "memhog_sha256=$(sha256sum usr/bin/memhog | cut -d' ' -f1)"
  echo "modules=$(cd "lib/modules/$KVER" && find kernel -name '*.ko' -printf '%f\n' | sed 's/\.ko$//' | sort | tr '\n' ' ')"
  if [ -n "$BIN" ]; then
    echo "balloond=$BIN"
    echo "balloond_sha256=$(sha256sum usr/bin/balloond | cut -d' ' -f1)"
    echo "libs=${libs[*]}"
  else
    echo "balloond="
  fi
} >etc/balloond-guest-release

# --- archive, only if something changed ---------------------------------------------------
# The manifest covers paths, link targets, modes and contents; the kernel reads the newc
# archive, timestamps do not matter.
manifest=$(find . -printf '%p %y %m %l\n' | LC_ALL=C sort; find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
sum=$(sha256sum <<<"$manifest" | cut -d' ' -f1)
if [ -f "$OUT" ] && [ "$(cat "$OUT_DIR/manifest.sha256" 2>/dev/null)" = "$sum" ]; then
  note "up to date: $OUT"
else
  find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 >"$OUT.tmp"
  mv "$OUT.tmp" "$OUT"
  echo "$sum" >"$OUT_DIR/manifest.sha256"
  note "built $OUT ($(du -h "$OUT" | cut -f1))"
fi
sed 's/^/build-guest:   /' etc/balloond-guest-release >&2
