# Sourced by run-guest.sh and build-guest.sh (bash): resolves the test platform.
#
#   QEMU_VERSION  7.2 (default): the system QEMU (Debian bookworm's 7.2)
#                 10.0: QEMU 10.0 from bookworm-backports, unpacked by setup.sh into
#                 $CACHE/qemu-10.0 (run through its wrapper, which adds the -L options)
#   GUEST_KERNEL  6.1 (default): bookworm's kernel in $CACHE/kernel, image in $CACHE/guest
#                 6.12: bookworm-backports' kernel in $CACHE/kernel-6.12, image in
#                 $CACHE/guest-6.12
#
# Needs CACHE set and a die() function. Sets PLATFORM_QEMU (the QEMU command, unless QEMU
# is set explicitly), PLATFORM_KDIR (unpacked kernel) and PLATFORM_GUEST_DIR (guest image
# directory).
QEMU_VERSION=${QEMU_VERSION:-7.2}
GUEST_KERNEL=${GUEST_KERNEL:-6.1}
case $QEMU_VERSION in
  7.2) PLATFORM_QEMU=qemu-system-x86_64 ;;
  10.0)
    PLATFORM_QEMU=$CACHE/qemu-10.0/qemu-system-x86_64
    [ -f "$CACHE/qemu-10.0/.done" ] && [ -x "$PLATFORM_QEMU" ] ||
      die "QEMU 10.0 is not set up in $CACHE/qemu-10.0: run scripts/setup.sh"
    ;;
  *) die "QEMU_VERSION must be 7.2 or 10.0, not '$QEMU_VERSION'" ;;
esac
case $GUEST_KERNEL in
  6.1) PLATFORM_KDIR=$CACHE/kernel PLATFORM_GUEST_DIR=$CACHE/guest ;;
  6.12) PLATFORM_KDIR=$CACHE/kernel-6.12 PLATFORM_GUEST_DIR=$CACHE/guest-6.12 ;;
  *) die "GUEST_KERNEL must be 6.1 or 6.12, not '$GUEST_KERNEL'" ;;
esac
export QEMU_VERSION GUEST_KERNEL
