#!/usr/bin/env python3
"""Interrupt-to-service latency of balloond's two backends, side by side on one QEMU:
uio (uio_pci_generic, INTx) and vfio (vfio-pci behind a virtual IOMMU with
iommu_platform=on; MSI-X on QEMU 10.0, INTx on 7.2).

Each sample: the balloon is inflated to 768 MiB and settles; then QMP `balloon` asks for
1 GiB, and the time until `query-balloon` reports that `actual` moved is one latency. It
covers QEMU raising the config interrupt, balloond waking, reading num_pages and sending
its first deflate buffer, and QEMU applying it: the path an interrupt takes through each
backend. Prints the median and range per backend (host clock, milliseconds).

    scripts/bench-backends.py [--qemu-version 10.0] [--samples 7]
"""
import argparse, os, statistics, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guestlib import CACHE, Fail, Guest  # noqa: E402

MIB = 1 << 20


def actual(g):
    return g.qmp.cmd("query-balloon")["actual"]


def wait_actual(g, want, timeout=120):
    deadline = time.time() + timeout
    while actual(g) != want:
        if time.time() > deadline:
            raise Fail(f"actual did not reach {want >> 20} MiB")
        time.sleep(0.05)


def measure(backend, args):
    env = {"QEMU_VERSION": args.qemu_version, "GUEST_KERNEL": args.guest_kernel, "MODERN_ONLY": "1",
           "VIOMMU": "1" if backend == "vfio" else "0"}
    g = Guest(os.path.join(CACHE, "runs", "bench-backends", f"{args.qemu_version}-{backend}"), "1024M", "", env=env)
    try:
        g.wait_ready()
        a = g.agent
        a.check(f"bg-run /run/bg/balloond balloond run --backend {backend} --no-free-page-hint --no-free-page-reporting --log-level info")
        deadline = time.time() + 60
        while "DRIVER_OK" not in a.run("balloond status")[0]:
            if time.time() > deadline:
                raise Fail("balloond did not reach DRIVER_OK:\n" + a.run("cat /run/bg/balloond/log")[0])
            time.sleep(0.5)
        samples = []
        for _ in range(args.samples):
            g.qmp.cmd("balloon", value=768 * MIB)
            wait_actual(g, 768 * MIB)
            time.sleep(1)
            t0 = time.monotonic()
            g.qmp.cmd("balloon", value=1024 * MIB)
            while actual(g) == 768 * MIB:
                time.sleep(0.001)
            samples.append((time.monotonic() - t0) * 1000)
            wait_actual(g, 1024 * MIB)
        irq = a.check("grep -E 'vfio|uio' /proc/interrupts || true").strip()
        return samples, irq
    finally:
        g.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qemu-version", default="10.0", choices=["7.2", "10.0"])
    ap.add_argument("--guest-kernel", default=None, help="default: 6.12 with QEMU 10.0, 6.1 with 7.2")
    ap.add_argument("--samples", type=int, default=7)
    args = ap.parse_args()
    args.guest_kernel = args.guest_kernel or ("6.12" if args.qemu_version == "10.0" else "6.1")
    rows = []
    for backend in ["uio", "vfio"]:
        print(f"bench-backends: {backend} on QEMU {args.qemu_version} ...", file=sys.stderr, flush=True)
        samples, irq = measure(backend, args)
        rows.append((backend, samples, irq))
    print(f"QEMU {args.qemu_version} / Linux {args.guest_kernel}: QMP balloon 768 -> 1024 MiB until `actual` moves ({args.samples} samples)")
    print(f"{'backend':8} {'median ms':>10} {'min ms':>8} {'max ms':>8}  interrupts")
    for backend, samples, irq in rows:
        names = sorted({w for line in irq.splitlines() for w in line.split() if w.startswith(("vfio", "uio", "IR-", "IO-APIC", "PCI-MSI"))})
        print(f"{backend:8} {statistics.median(samples):10.1f} {min(samples):8.1f} {max(samples):8.1f}  {' '.join(names)}")


if __name__ == "__main__":
    try:
        main()
    except Fail as e:
        raise SystemExit(f"bench-backends: error: {e}")
