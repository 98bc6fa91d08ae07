#!/usr/bin/env python3
"""Benchmarks balloon inflate and deflate in a 1 GiB TCG guest, per driver.

For each driver and run it boots a fresh guest, dirties --dirty-mib MiB in it (memhog, so
the pages are resident on the host) and frees them again, then measures:
  - inflate: from the QMP `balloon value=<target>` command to the first `query-balloon`
    whose actual is <= the target (polled every --poll-ms), and the rate in MiB/s,
  - QEMU's RSS on the host (VmRSS) before and after inflating, once it is stable, and
    the difference (MiB given back to the host),
  - deflate: from `balloon value=<RAM>` to actual == RAM, and the rate in MiB/s.
Runs are interleaved (every driver once per round) so a busy machine affects all drivers
alike; the table shows medians.

Drivers:
  kernel     the in-kernel virtio_balloon driver (modprobed at boot)
  balloond   bg-run /run/bg/balloond balloond run --log-level info [--balloond-args ...]

Usage: scripts/bench-balloon.py [--drivers kernel,balloond] [--runs 3] [--json FILE]
QMP (QEMU's qemu.qmp library) and the guest agent go through scripts/guestlib.py.
Needs scripts/setup.sh and scripts/build-guest.sh (with a release balloond for the
balloond driver); scripts/bench-balloon.sh checks that and runs this.
"""
import argparse, json, os, shlex, statistics, sys, time

import guestlib
from guestlib import CACHE, MIB, Fail


def log(msg):
    print(f"bench-balloon: {msg}", file=sys.stderr, flush=True)


class Guest(guestlib.Guest):
    """A guest with a balloon, booted by scripts/run-guest.sh (see guestlib.Guest)."""

    def __init__(self, run_dir, kernel_args="", mem_mib=1024, balloon_props=""):
        super().__init__(run_dir, f"{mem_mib}M", kernel_args, max_runtime=1800, agent_prefix="b",
                         env={"SMP": "1", "BALLOON_PROPS": balloon_props, "MODERN_ONLY": "0", "BALLOON": "1",
                              "CONSOLE": "file", "QEMU_EXTRA": ""})

    def wait_ready(self, timeout=180):
        super().wait_ready(timeout, probe=True)

    def actual(self):
        return self.qmp.cmd("query-balloon")["actual"]


def start_driver(g, driver, args):
    a = g.agent
    if driver == "kernel":
        a.check("grep -q '^virtio_balloon ' /proc/modules || modprobe virtio_balloon")
        ok = lambda: any(s.startswith("VIRTIO_CONFIG_S_DRIVER_OK") for s in
                         g.qmp.cmd("x-query-virtio-status", path="/machine/peripheral/balloon0/virtio-backend")["status"]["statuses"])
    else:
        a.check("bg-run /run/bg/balloond balloond run --log-level info " + " ".join(shlex.quote(x) for x in args.balloond_args))

        def ok():
            out, rc = a.run("cat /run/bg/balloond/rc 2>/dev/null")
            if rc == 0:
                raise Fail(f"balloond exited with {out.strip()}:\n" + a.run("tail -c 2000 /run/bg/balloond/log")[0])
            return "DRIVER_OK" in a.run("balloond status")[0]
    deadline = time.time() + 90
    while not ok():
        if time.time() > deadline:
            raise Fail(f"{driver} did not reach DRIVER_OK in 90 s")
        time.sleep(0.5)


def driver_diagnostics(g, driver):
    try:
        if driver == "balloond":
            return g.agent.run("tail -c 1500 /run/bg/balloond/log", timeout=30)[0]
        return g.agent.run("dmesg | grep -iE 'balloon|virtio' | tail -10", timeout=30)[0]
    except Exception as e:  # the guest may be gone
        return f"(no diagnostics: {e})"


def wait_actual(g, driver, condition, what, timeout, poll_s):
    """Polls query-balloon until condition(actual); returns (seconds, actual)."""
    t0 = time.time()
    while True:
        actual = g.actual()
        now = time.time()
        if condition(actual):
            return now, actual
        if now - t0 > timeout:
            raise Fail(f"{driver}: actual did not reach {what} within {timeout} s (last {actual / MIB:.0f} MiB); "
                       f"driver says:\n{driver_diagnostics(g, driver)}")
        time.sleep(poll_s)


def bench_once(driver, run, args):
    run_dir = os.path.join(CACHE, "runs", "bench-balloon", f"{driver}-{run}")
    kernel_args = "balloond.modprobe=virtio_pci,virtio_balloon" if driver == "kernel" else "balloond.modprobe=virtio_pci"
    ram = args.mem_mib * MIB
    target = args.target_mib * MIB
    poll_s = args.poll_ms / 1000
    g = Guest(run_dir, f"{kernel_args} {args.kernel_args}".strip(), args.mem_mib, args.balloon_props)
    try:
        g.wait_ready()
        start_driver(g, driver, args)
        a = g.agent
        # Dirty, then free: the guest's free memory is now resident on the host.
        out = a.check(f"memhog {args.dirty_mib}", timeout=900)
        if f"memhog: ok {args.dirty_mib} MiB" not in out:
            raise Fail(f"memhog {args.dirty_mib}: {out[-500:]}")
        start_actual = g.actual()
        if start_actual != ram:
            raise Fail(f"{driver}: actual is {start_actual / MIB:.0f} MiB before inflating, not {args.mem_mib}")
        rss_before = g.stable_rss_mib()

        t0 = time.time()
        g.qmp.cmd("balloon", value=target)
        t1, reached = wait_actual(g, driver, lambda x: x <= target, f"<= {args.target_mib} MiB", args.timeout, poll_s)
        inflate_s = t1 - t0
        inflated_mib = (start_actual - reached) / MIB
        rss_after = g.stable_rss_mib()

        t2 = time.time()
        g.qmp.cmd("balloon", value=ram)
        t3, _ = wait_actual(g, driver, lambda x: x >= ram, f"{args.mem_mib} MiB", args.timeout, poll_s)
        deflate_s = t3 - t2

        bad, _ = a.run("dmesg | grep -E 'BUG[: ]|Oops|soft lockup|rcu.*stall|Out of memory'", timeout=30)
        alive = True
        if driver == "balloond":
            alive = a.run("test -e /run/bg/balloond/rc")[1] != 0
        return {
            "driver": driver, "run": run,
            "inflate_s": round(inflate_s, 3), "inflate_mib_s": round(inflated_mib / inflate_s, 1) if inflate_s > 0 else None,
            "inflated_mib": inflated_mib,
            "deflate_s": round(deflate_s, 3), "deflate_mib_s": round(inflated_mib / deflate_s, 1) if deflate_s > 0 else None,
            "rss_before_mib": round(rss_before), "rss_after_mib": round(rss_after),
            "rss_reclaimed_mib": round(rss_before - rss_after),
            "kernel_log_errors": bad.splitlines()[:5], "driver_alive": alive, "run_dir": run_dir,
        }
    finally:
        g.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drivers", default="kernel,balloond", help="comma-separated: kernel, balloond (default both)")
    ap.add_argument("--runs", type=int, default=3, help="runs per driver, interleaved (default 3)")
    ap.add_argument("--mem-mib", type=int, default=1024, help="guest RAM (default 1024)")
    ap.add_argument("--target-mib", type=int, default=512, help="balloon target: RAM left to the guest (default 512)")
    ap.add_argument("--dirty-mib", type=int, default=600, help="MiB the guest dirties and frees first (default 600)")
    ap.add_argument("--poll-ms", type=int, default=50, help="query-balloon polling period (default 50)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds allowed for each of inflate and deflate")
    ap.add_argument("--kernel-args", default="", help="extra guest kernel command line")
    ap.add_argument("--balloon-props", default="", help="extra virtio-balloon-pci properties (BALLOON_PROPS)")
    ap.add_argument("--balloond-args", default="", type=shlex.split, help="extra arguments of balloond run")
    ap.add_argument("--json", help="write every run's results to this file")
    args = ap.parse_args()
    drivers = [d for d in args.drivers.split(",") if d]
    for d in drivers:
        if d not in ("kernel", "balloond"):
            ap.error(f"unknown driver {d!r} (want kernel or balloond)")
    if not 0 < args.target_mib < args.mem_mib:
        ap.error("--target-mib must be between 0 and --mem-mib")

    results = []
    for r in range(args.runs):
        for d in drivers:
            log(f"run {r + 1}/{args.runs} driver {d} ...")
            try:
                res = bench_once(d, r, args)
            except (Fail, OSError, ValueError, KeyError) as e:
                res = {"driver": d, "run": r, "error": str(e)[:2000],
                       "run_dir": os.path.join(CACHE, "runs", "bench-balloon", f"{d}-{r}")}
            log("  " + json.dumps({k: v for k, v in res.items() if k != "run_dir"}))
            results.append(res)
            if args.json:  # after every run, so an interrupted benchmark keeps what it has
                with open(args.json, "w") as f:
                    json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}, f, indent=2)

    cols = [("inflate_s", "inflate s", ".2f"), ("inflate_mib_s", "inflate MiB/s", ".0f"),
            ("deflate_s", "deflate s", ".2f"), ("deflate_mib_s", "deflate MiB/s", ".0f"),
            ("rss_before_mib", "RSS before MiB", ".0f"), ("rss_after_mib", "RSS after MiB", ".0f"),
            ("rss_reclaimed_mib", "reclaimed MiB", ".0f")]
    print(f"\nballoon {args.mem_mib} MiB -> {args.target_mib} MiB -> {args.mem_mib} MiB after dirtying {args.dirty_mib} MiB "
          f"(medians of {args.runs} run{'s' if args.runs != 1 else ''})")
    header = f"{'driver':<10} {'ok/runs':>7}" + "".join(f" {c[1]:>14}" for c in cols)
    print(header)
    print("-" * len(header))
    failed = []
    for d in drivers:
        all_rs = [x for x in results if x["driver"] == d]
        rs = [x for x in all_rs if "error" not in x]
        failed += [x for x in all_rs if "error" in x or x.get("kernel_log_errors") or not x.get("driver_alive", True)]
        line = f"{d:<10} {f'{len(rs)}/{len(all_rs)}':>7}"
        if not rs:
            print(line + f"  every run failed: {all_rs[0]['error'].splitlines()[0][:100]}")
            continue
        for key, _, fmt in cols:
            vals = [x[key] for x in rs if x.get(key) is not None]
            line += f" {format(statistics.median(vals), fmt) if vals else '-':>14}"
        print(line)
    for x in failed:
        why = x.get("error") or (f"kernel log: {x['kernel_log_errors'][:2]}" if x.get("kernel_log_errors") else "balloond exited")
        log(f"{x['driver']} run {x['run'] + 1} failed: {why.splitlines()[0][:200]} (see {x['run_dir']})")
    if args.json:
        log(f"results: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fail as e:
        log(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
