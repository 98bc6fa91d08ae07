#!/usr/bin/env bash
# Boots the balloond test guest under QEMU (TCG; KVM does not work on our machines):
# q35, the Debian kernel GUEST_KERNEL (.cache/kernel or .cache/kernel-6.12), the matching
# initramfs from scripts/build-guest.sh, and a virtio-balloon-pci device with id balloon0
# (QOM path /machine/peripheral/balloon0), under QEMU QEMU_VERSION.
#
# Everything the run produces lives in RUN_DIR:
#   console.log   ttyS0: kernel log, init messages, the ready marker "BALLOOND-GUEST-READY"
#   agent.sock    ttyS1: the command agent (protocol: scripts/guest/balloond-agent)
#   qmp.sock      QMP
#   qemu.pid      QEMU's pid;  cmdline: the QEMU command line, one argument per line
# QEMU's own stdout/stderr go to this script's stdout/stderr.
#
# Usage: scripts/run-guest.sh [extra QEMU arguments...]
# Environment (all optional):
#   QEMU_VERSION   7.2 (default, the system QEMU) or 10.0 (.cache/qemu-10.0, from setup.sh)
#   GUEST_KERNEL   6.1 (default, image .cache/guest) or 6.12 (image .cache/guest-6.12);
#                  scripts/platform.sh has the details
#   RUN_DIR        run directory (default .cache/runs/manual-<time>-<pid>)
#   MEM, SMP       guest memory (default 1G) and vCPUs (default 1)
#   CPU            QEMU -cpu model (default max)
#   KERNEL_ARGS    appended to the kernel command line, e.g. "page_poison=1 hugepages=64";
#                  guest options: balloond.modprobe=virtio_pci,virtio_balloon, balloond.shell=1
#   BALLOON_PROPS  extra virtio-balloon-pci properties, appended (later ones win), e.g.
#                  "disable-legacy=on,free-page-reporting=on" or "free-page-hint=off"
#   MODERN_ONLY=1  put the balloon behind a pcie-root-port, so it is modern-only (1af4:1045)
#   BALLOON=0      no balloon device at all
#   VIOMMU=1       a virtual Intel IOMMU (intel-iommu with interrupt remapping, first among
#                  the devices; intel_iommu=on on the kernel command line) and the balloon
#                  behind it with iommu_platform=on: every address it uses is an IOVA, which
#                  is what balloond's vfio backend needs. VIOMMU_PLATFORM=0 keeps the vIOMMU
#                  but leaves the balloon's iommu_platform off.
#   CONSOLE=stdio  console on this terminal (with a shell in the guest; quit with Ctrl-A x)
#                  instead of only console.log (default CONSOLE=file)
#   QEMU_EXTRA     extra QEMU arguments, split on whitespace (or pass them as arguments)
#   PARENT_PID     kill QEMU when this process dies (the Swift harness sets it, so a crashed
#                  test run leaves no QEMU behind); MAX_RUNTIME seconds (default 3600) caps
#                  the run in that mode.
#   QEMU           QEMU binary (default: the one QEMU_VERSION names)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${BALLOOND_CACHE:-$ROOT/.cache}
die() { echo "run-guest: error: $*" >&2; exit 1; }
# shellcheck source=scripts/platform.sh
. "$ROOT/scripts/platform.sh"
KERNEL=$PLATFORM_KDIR/vmlinuz
INITRD=$PLATFORM_GUEST_DIR/initramfs.cpio.gz
QEMU=${QEMU:-$PLATFORM_QEMU}

[ -e "$KERNEL" ] || die "no guest kernel $GUEST_KERNEL at $KERNEL: run scripts/setup.sh"
[ -f "$INITRD" ] || die "no guest image for kernel $GUEST_KERNEL at $INITRD: run GUEST_KERNEL=$GUEST_KERNEL scripts/build-guest.sh"
command -v "$QEMU" >/dev/null || die "$QEMU not found: run scripts/setup.sh"

RUN_DIR=${RUN_DIR:-$CACHE/runs/manual-$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
CONSOLE_LOG=$RUN_DIR/console.log
AGENT_SOCK=$RUN_DIR/agent.sock
QMP_SOCK=$RUN_DIR/qmp.sock
# sun_path holds 108 bytes including the NUL; QEMU fails obscurely past that.
[ ${#AGENT_SOCK} -le 107 ] || die "run directory path too long for a unix socket (${#AGENT_SOCK} > 107 bytes): $RUN_DIR"
rm -f "$AGENT_SOCK" "$QMP_SOCK" "$RUN_DIR/qemu.pid"
: >"$CONSOLE_LOG"

# panic=-1: reboot at once on a panic, and -no-reboot turns that into QEMU exiting, so a
# crashed guest never hangs a test.
APPEND="console=ttyS0 panic=-1 printk.time=1 ${KERNEL_ARGS:-}"

args=(
  -accel tcg -M q35 -cpu "${CPU:-max}" -m "${MEM:-1G}" -smp "${SMP:-1}"
  -name balloond-guest -nodefaults -nographic -no-reboot
  -kernel "$KERNEL" -initrd "$INITRD"
  -pidfile "$RUN_DIR/qemu.pid"
  -qmp "unix:$QMP_SOCK,server=on,wait=off"
)

case ${CONSOLE:-file} in
  file)
    args+=(-chardev "file,id=con0,path=$CONSOLE_LOG" -serial chardev:con0)
    ;;
  stdio)
    APPEND+=" balloond.shell=1"
    args+=(-chardev "stdio,id=con0,mux=on,signal=off,logfile=$CONSOLE_LOG"
      -serial chardev:con0 -mon "chardev=con0,mode=readline")
    ;;
  *) die "CONSOLE must be file or stdio, not '$CONSOLE'" ;;
esac
# ttyS1: the command agent. server=on,wait=off: QEMU listens and boots without waiting;
# the host connects whenever it likes (after the ready marker).
args+=(-chardev "socket,id=agent0,path=$AGENT_SOCK,server=on,wait=off" -serial chardev:agent0)

if [ "${VIOMMU:-0}" = 1 ]; then
  # intremap=on: vfio's type1 IOMMU refuses a container without interrupt remapping (it is
  # QEMU's default under TCG anyway; spelled out so a KVM run fails loudly instead).
  args+=(-device "intel-iommu,intremap=on")
  APPEND+=" intel_iommu=on"
fi

if [ "${BALLOON:-1}" != 0 ]; then
  # free-page-hint needs an iothread (QEMU refuses it without one).
  props="id=balloon0,iothread=io0,free-page-hint=on"
  # iommu_platform=on needs a modern-only device (QEMU refuses it on a transitional one).
  if [ "${VIOMMU:-0}" = 1 ] && [ "${VIOMMU_PLATFORM:-1}" = 1 ]; then props+=",iommu_platform=on"; fi
  props+="${BALLOON_PROPS:+,$BALLOON_PROPS}"
  args+=(-object "iothread,id=io0")
  if [ "${MODERN_ONLY:-0}" = 1 ]; then
    # On q35's pcie.0 (the root bus) disable-legacy=auto means "off", so the function is
    # transitional (1af4:1002). Behind a PCIe root port auto means "on": modern-only,
    # 1af4:1045, revision 1, no I/O BAR (docs/virtio-balloon.md §1.1).
    args+=(-device "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1")
    props+=",bus=rp0"
  fi
  args+=(-device "virtio-balloon-pci,$props")
fi

args+=(-append "$APPEND")
# shellcheck disable=SC2206 # QEMU_EXTRA is whitespace-split on purpose
[ -z "${QEMU_EXTRA:-}" ] || args+=(${QEMU_EXTRA})
args+=("$@")

printf '%s\n' "$QEMU" "${args[@]}" >"$RUN_DIR/cmdline"
cat >"$RUN_DIR/paths" <<EOF
QEMU_VERSION=$QEMU_VERSION
GUEST_KERNEL=$GUEST_KERNEL
RUN_DIR=$RUN_DIR
CONSOLE_LOG=$CONSOLE_LOG
AGENT_SOCK=$AGENT_SOCK
QMP_SOCK=$QMP_SOCK
EOF
sed 's/^/run-guest: /' "$RUN_DIR/paths" >&2

if [ -z "${PARENT_PID:-}" ]; then
  exec "$QEMU" "${args[@]}"
fi

# Supervised mode: QEMU is our child; it dies when PARENT_PID dies, when MAX_RUNTIME passes,
# or when we get SIGTERM/SIGINT (so killing this script is enough).
"$QEMU" "${args[@]}" </dev/null &
qpid=$!
stop() { kill -TERM "$qpid" 2>/dev/null || true; }
trap stop TERM INT HUP
deadline=$((SECONDS + ${MAX_RUNTIME:-3600}))
while kill -0 "$qpid" 2>/dev/null; do
  if ! kill -0 "$PARENT_PID" 2>/dev/null; then
    echo "run-guest: parent $PARENT_PID is gone; stopping QEMU" >&2; stop; break
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "run-guest: MAX_RUNTIME (${MAX_RUNTIME:-3600} s) reached; stopping QEMU" >&2; stop; break
  fi
  sleep 0.5
done
# Give QEMU 10 s to exit after SIGTERM, then SIGKILL.
for _ in $(seq 20); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.5; done
kill -KILL "$qpid" 2>/dev/null || true
rc=0
wait "$qpid" || rc=$?
exit "$rc"
