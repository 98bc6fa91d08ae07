#!/usr/bin/env python3
"""Live-migrates a balloond test guest between two QEMUs on 127.0.0.1 and reports what
free page hinting saved.

For each mode it boots a source guest (TCG; 1 GiB unless --mem) and an incoming destination,
makes the guest dirty most of its RAM and free it again (keeping a region with a known
checksum), starts the mode's balloon driver, migrates, and reads QEMU's own numbers
(`query-migrate`). On the destination it checks the kept region and the console (no
BUG/Oops/pagealloc/corruption lines). QMP goes through QEMU's qemu.qmp library and the
guest agent through scripts/guestlib.py (shared with bench-balloon.py).

Modes:
  floor                no balloon driver, and the guest does NOT dirty-and-free memory (only
                       the kept region is written): only used memory is sent, the best any
                       hinter can do
  none                 no balloon driver in the guest (the baseline)
  kernel               the in-kernel virtio_balloon driver (the anchor)
  balloond[:SOURCE]    balloond run --hint-source SOURCE (default auto; the table's "source"
                       column shows what auto picked)
  balloond:SOURCE-control
                       the same rounds, taking and releasing memory, but no hint sent
                       (tells a wrong hint from the churn of the rounds themselves)
  balloond:offline+reserve
                       balloond run --hint-source offline --hint-reserve-mib (guest size):
                       free memory blocks are kept offline between migrations; the migration
                       starts once the reserve has stopped growing after the dirty-and-free
  MODE@poison          MODE on a guest booted with page_poison=1 (@initfree: init_on_free=1),
                       on the --poison-mem sizes only

Usage: scripts/migrate.py [--modes none,balloond] [--runs N[,M]] [--mem 1024[,4096]]
                         [--dirty-mib 600 | --dirty-percent 75] [--json FILE] [--plot FILE.png]
                         [--bandwidth-mib MIB | --bandwidth-gbit GBIT] [--downtime-ms 300]
                         [--qemu-version 7.2|10.0[,...]] [--guest-kernel 6.1|6.12]
--qemu-version / --guest-kernel (default: the QEMU_VERSION / GUEST_KERNEL environment, else
7.2 and 6.1) pick the platform of both guests, source and destination (scripts/run-guest.sh;
10.0 is the QEMU scripts/setup.sh unpacks from bookworm-backports). A list of versions
compares them: --runs N,M runs N times per mode on the first and M on the others.
Bandwidth and downtime default to QEMU's (128 MiB/s) and 300 ms; the seed's configuration
is --bandwidth-gbit 100 --downtime-ms 2000 (scripts/bench-migrate.sh and demo.sh use it).
Runs are interleaved (every mode once per run index, version and size). One table per QEMU
version and guest size shows medians; "vs none" is the total-time reduction against the
none mode, "x floor" the bytes sent relative to the floor mode, "1st hint ms" / "STOP ms"
balloond's lastRoundFirstHintMicros / lastRoundStopMicros (from reading the cmd id).
--plot draws total time and MB sent per mode, a row per guest size and a bar per QEMU
version (matplotlib, pip-installed when missing; gnuplot for one version and size).
scripts/bench-migrate.sh is the benchmark command.
Needs scripts/setup.sh, a release balloond and scripts/build-guest.sh (scripts/demo.sh does
all of that).
"""
import argparse, json, os, random, re, shutil, statistics, subprocess, sys, textwrap, time

from guestlib import CACHE, Fail, Guest, ensure_matplotlib, free_port, qemu_available

QEMU_VERSIONS = ("7.2", "10.0")
GUEST_KERNELS = ("6.1", "6.12")
# MODE@VARIANT runs MODE on a guest with these extra kernel arguments.
GUEST_VARIANTS = {"poison": "page_poison=1", "initfree": "init_on_free=1"}


def split_mode(mode):
    """'balloond:hugetlb@poison' -> ('balloond:hugetlb', 'poison'); no variant -> (mode, None)."""
    base, _, variant = mode.partition("@")
    return base, (variant or None)


def run_tag(mode, run_index, cfg, args):
    """The run directory's name: <mode>-<run> for the single default platform and size (as
    before), else prefixed with the QEMU version and guest size."""
    tag = f"{mode.replace(':', '-').replace('@', '-')}-{run_index}"
    if len(args.qemu_versions) > 1 or len(args.mems) > 1 or cfg["mem"] != 1024:
        tag = f"q{cfg['qemu']}-{cfg['mem']}M-{tag}"
    return tag


def dirty_command(mode, cfg, args, agent):
    """The guest command that dirties memory and frees it again, and the MiB it dirties.
    --dirty-percent: memhog (anonymous memory, every page non-zero) with that share of RAM,
    capped at MemAvailable - 64 MiB; else --dirty-mib MiB of text in /dev/shm."""
    if mode == "floor":
        return "sync", 0
    if args.dirty_percent:
        avail_kib = int(re.search(r"MemAvailable:\s+(\d+)", agent.check("cat /proc/meminfo")).group(1))
        # A hint reserve (offline blocks) is memory the guest gets back under pressure: the
        # workload is the same size as in the other modes, and makes it give way.
        reserve_mib = offline_mib(agent) if mode.split("@")[0].endswith("+reserve") else 0
        mib = min(cfg["mem"] * args.dirty_percent // 100, avail_kib // 1024 + reserve_mib - 64)
        if mib <= 0:
            raise Fail(f"the guest has only {avail_kib // 1024} MiB available, nothing to dirty")
        return f"memhog -q {mib} | tail -1 | grep -q 'memhog: ok' && sync", mib
    return (f"yes balloond-dirty-page-pattern | dd of=/dev/shm/dirty bs=1M count={args.dirty_mib} iflag=fullblock 2>/dev/null; "
            f"rm /dev/shm/dirty; sync"), args.dirty_mib


def migrate_once(mode, run_index, cfg, args):
    """One migration of `mode` on platform/size `cfg` ({"qemu": "10.0", "mem": 1024})."""
    tag = run_tag(mode, run_index, cfg, args)
    base = os.path.join(CACHE, "runs", "migrate", tag)
    driver, variant = split_mode(mode)
    kernel_args = "balloond.modprobe=virtio_pci,virtio_balloon" if driver == "kernel" else ""
    if variant:
        kernel_args += " " + GUEST_VARIANTS[variant]
    kernel_args += " " + args.kernel_args
    port = free_port()
    # run-guest.sh reads QEMU_VERSION/GUEST_KERNEL for both guests; QEMU (an explicit binary)
    # would override them, so main() drops it.
    env = {"QEMU_VERSION": cfg["qemu"], "GUEST_KERNEL": args.guest_kernel}
    if args.viommu:
        # Both guests: a virtual IOMMU and the balloon behind it with iommu_platform=on
        # (modern-only), so balloond picks its vfio backend and maps what it hints.
        env.update({"VIOMMU": "1", "MODERN_ONLY": "1"})
    runtime = 900 + 2 * cfg["mem"] // 4  # seconds: 4 GiB guests dirty and send more under TCG
    mem = f"{cfg['mem']}M"
    src = Guest(base + "-src", mem, kernel_args, env=env, max_runtime=runtime, agent_prefix="m")
    try:
        dst = Guest(base + "-dst", mem, kernel_args, incoming=f"tcp:127.0.0.1:{port}", env=env, max_runtime=runtime,
                    agent_prefix="m")
    except Fail:
        src.stop()
        raise
    try:
        src.wait_ready()
        a = src.agent
        if driver.startswith("balloond"):
            source = driver.split(":", 1)[1] if ":" in driver else "auto"
            control = source.endswith("-control")
            source = source.removesuffix("-control")
            reserve = source.endswith("+reserve")
            source = source.removesuffix("+reserve")
            extra = ""
            if control:
                extra += " --hint-control"
            if reserve:
                extra += f" --hint-reserve-mib {cfg['mem']}"
            a.check(f"bg-run /run/bg/balloond balloond run --hint-source {source}{extra} --log-level {args.balloond_log_level}")
            deadline = time.time() + 60
            while "DRIVER_OK" not in a.run("balloond status")[0]:
                if time.time() > deadline:
                    raise Fail("balloond did not reach DRIVER_OK:\n" + a.run("cat /run/bg/balloond/log")[0])
                time.sleep(0.5)
        # Dirty most of RAM with non-zero data (QEMU sends zero pages cheaply), free it,
        # and keep a region whose checksum the destination must reproduce. The floor mode
        # skips the dirtying: its free memory was never written, so only used memory is sent.
        a.check(f"dd if=/dev/urandom of=/dev/shm/keep bs=1M count={args.keep_mib} 2>/dev/null && md5sum /dev/shm/keep > /run/keep.md5", timeout=300)
        command, dirty_mib = dirty_command(mode, cfg, args, a)
        a.check(command, timeout=300 + cfg["mem"] // 4)
        if driver.endswith("+reserve"):
            result_reserve = wait_reserve(a, cfg["mem"])
        free_kib = int(re.search(r"MemFree:\s+(\d+)", a.check("cat /proc/meminfo")).group(1))
        params = {"downtime-limit": args.downtime_ms}
        if args.bandwidth_bytes:
            params["max-bandwidth"] = args.bandwidth_bytes
        src.qmp.cmd("migrate-set-parameters", **params)
        if args.postcopy:
            src.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
            dst.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
        t0 = time.time()
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        if args.cancel:
            return cancel_during_round(mode, run_index, base, src, a, t0)
        killed = kill_during_round(src, a, args) if args.kill_during_round and driver.startswith("balloond") else None
        samples = []
        while True:
            info = src.qmp.cmd("query-migrate")
            st = info.get("status")
            if args.sample_ms and "ram" in info:
                samples.append([round((time.time() - t0) * 1000, 1), info["ram"]["transferred"], info["ram"]["normal"]])
            if st in ("completed", "failed", "cancelled"):
                break
            if time.time() - t0 > 600:
                raise Fail("migration did not finish in 600 s")
            time.sleep(args.sample_ms / 1000 if args.sample_ms else 0.05)
        if st != "completed":
            raise Fail(f"migration {st}: {info.get('error-desc', '')}")
        ram = info["ram"]
        result = {
            "mode": mode, "run": run_index, "qemu_version": cfg["qemu"], "guest_kernel": args.guest_kernel,
            "mem_mib": cfg["mem"], "total_ms": info["total-time"], "downtime_ms": info.get("downtime"),
            "transferred_bytes": ram["transferred"], "normal_pages": ram["normal"], "duplicate_pages": ram["duplicate"],
            "guest_free_mib": free_kib // 1024, "dirtied_mib": dirty_mib, "run_dir": base,
        }
        if samples:
            result["samples"] = samples
        if driver.endswith("+reserve"):
            result.update(result_reserve)
        # Destination: it runs now; the agent's serial line continues there.
        d = dst.connect_agent()
        ok = d.check("md5sum -c /run/keep.md5", timeout=120)
        result["kept_region_ok"] = "OK" in ok
        if killed is not None:
            result.update(killed)
            result["hog_ok"] = wait_hog(d) if killed.get("killed") else None
            if result["hog_ok"] is False:
                result["kept_region_ok"] = False
        if driver.startswith("balloond"):
            st_out = d.run("balloond status --json")[0]
            # The start-up decisions (hint source, hinting off, warnings) come first in the log;
            # keep them with its tail.
            result["balloond_log_tail"] = d.run("grep -E 'hint source|hinting disabled|warning|error|critical' /run/bg/balloond/log | head -n 8; "
                                                "echo ...; tail -c 1500 /run/bg/balloond/log; cat /run/bg/balloond/rc 2>/dev/null")[0]
            m = re.search(r'"bytesHinted"\s*:\s*(\d+)', st_out)
            result["hinted_mib"] = int(m.group(1)) >> 20 if m else None
            m = re.search(r'"lastRoundFirstHintMicros"\s*:\s*(\d+)', st_out)
            result["first_hint_ms"] = int(m.group(1)) / 1000 if m else None
            m = re.search(r'"lastRoundStopMicros"\s*:\s*(\d+)', st_out)
            result["stop_ms"] = int(m.group(1)) / 1000 if m else None
            m = re.search(r'"lastRoundAppliedMicros"\s*:\s*(\d+)', st_out)
            result["applied_ms"] = int(m.group(1)) / 1000 if m else None
            if args.balloond_log_level in ("debug", "trace"):
                result["balloond_log"] = d.run("cat /run/bg/balloond/log", timeout=120)[0]
            m = re.search(r'"hintRounds"\s*:\s*(\d+)', st_out)
            result["hint_rounds"] = int(m.group(1)) if m else None
            # Re-initialisations of the device (NEEDS_RESET, a device error): none in a sound run.
            m = re.search(r'"deviceResets"\s*:\s*(\d+)', st_out)
            result["device_resets"] = int(m.group(1)) if m else None
            m = re.search(r'"hintSource"\s*:\s*"([a-z]+)"', st_out)
            # No source: balloond runs without hinting (e.g. auto on a TCG poisoning guest).
            # (balloond's status JSON leaves hintSource out then).
            result["hint_source"] = m.group(1) if m else ("off" if st_out.lstrip().startswith("{") else None)
            # Memory blocks still offline on the destination once DONE has been handled (the
            # offline source onlines its blocks at DONE): must be 0. A reserve stays offline.
            deadline = time.time() + 30
            while not driver.endswith("+reserve"):
                result["dest_offline_blocks"] = offline_blocks(d)
                if result["dest_offline_blocks"] in (0, None) or time.time() > deadline:
                    break
                time.sleep(0.5)
            if driver.endswith("+reserve"):
                # The reserve stays offline on the destination (balloond runs on there); a
                # SIGTERM gives it back: every block online again once balloond has exited.
                result["dest_offline_blocks"] = offline_blocks(d)
                d.run("kill -TERM $(cat /run/bg/balloond/pid)")
                deadline = time.time() + 60
                while not d.run("cat /run/bg/balloond/rc 2>/dev/null")[0].strip() and time.time() < deadline:
                    time.sleep(0.5)
                result["dest_offline_mib_after_stop"] = offline_mib(d)
        time.sleep(1)
        bad = [l for l in dst.console().splitlines() if re.search(r"BUG|Oops|pagealloc|corruption", l)]
        result["dest_console_errors"] = bad[:5]
        return result
    finally:
        src.stop()
        dst.stop()


def irq_disabled_lines(base):
    """The guest kernels' "irq N: nobody cared" / "Disabling IRQ #N" lines (an interrupt storm
    on the balloon's INTx line, after which the kernel turns the line off and balloond hears the
    device only through the kernel's 100 ms spurious-IRQ poll, if at all), from the source's and
    the destination's console."""
    out = []
    for side in ("src", "dst"):
        try:
            text = open(f"{base}-{side}/console.log", errors="replace").read()
        except (FileNotFoundError, TypeError):
            continue
        out += [f"{side}: {l.strip()}" for l in text.splitlines() if re.search(r"irq \d+: nobody cared|Disabling IRQ #\d+", l)]
    return out[:4]


def offline_blocks(agent):
    """How many of the guest's memory blocks are offline (None: unreadable)."""
    n = agent.run("grep -l '^offline' /sys/devices/system/memory/memory*/state 2>/dev/null | wc -l")[0].strip()
    return int(n) if n.isdigit() else None


def offline_mib(agent):
    """MiB of guest memory in offline memory blocks (balloond's hint reserve)."""
    block = int(agent.check("cat /sys/devices/system/memory/block_size_bytes").strip(), 16)
    return ((offline_blocks(agent) or 0) * block) >> 20


def wait_reserve(agent, target_mib, timeout=150):
    """Waits until balloond's hint reserve (offline memory blocks) has taken what it may: it
    stopped growing (a pass runs every second while it grows) and either reached target_mib or
    made a pass after the last time memory pressure took some back (balloond refills 60 s
    after that). Returns its size and how long that took."""
    t0 = time.time()
    last, since = None, time.time()
    log = "/run/bg/balloond/log"
    while True:
        held = offline_mib(agent)
        if held != last:
            last, since = held, time.time()
        elif time.time() - since >= 5:
            if held + 128 > target_mib:
                break
            # Line numbers of the last pressure release and of the last reserve pass that took a block.
            out = agent.run(f"grep -n 'gave back memory held for free page hinting' {log} | tail -1 | cut -d: -f1; echo -; "
                            f"grep -n 'reserve holds' {log} | tail -1 | cut -d: -f1")[0]
            released, _, filled = (x.strip() for x in out.partition("-"))
            if filled and (not released or int(filled) > int(released)):
                break
        if time.time() - t0 > timeout:
            print(f"migrate: the hint reserve stayed at {held} MiB for {timeout} s; migrating anyway", file=sys.stderr)
            break
        time.sleep(1)
    return {"reserve_mib": last, "reserve_wait_s": round(time.time() - t0, 1)}


def median_of(rs, key):
    vals = [x[key] for x in rs if x.get(key) is not None]
    return statistics.median(vals) if vals else None


def group_key(x):
    return (x.get("qemu_version"), x.get("mem_mib"))


def summarize(modes, results):
    """Per mode: medians over the runs that completed, min/max total time, and whether every
    run's destination verified. `results` are one group's (one QEMU version and size)."""
    summary = []
    for mode in modes:
        all_rs = [x for x in results if x["mode"] == mode]
        if not all_rs:
            continue
        rs = [x for x in all_rs if "error" not in x]
        sources = sorted({x["hint_source"] for x in rs if x.get("hint_source")})
        s = {"mode": mode, "runs": len(all_rs), "completed": len(rs),
             "dest_ok": all(x["kept_region_ok"] and not x["dest_console_errors"] for x in all_rs),
             "first_error": next((x for x in all_rs if "error" in x), None), "source": "/".join(sources) or None}
        if rs:
            s.update(total_ms=median_of(rs, "total_ms"), min_ms=min(x["total_ms"] for x in rs),
                     max_ms=max(x["total_ms"] for x in rs), mb=median_of(rs, "transferred_bytes") / 1e6,
                     hinted_mib=median_of(rs, "hinted_mib"), first_hint_ms=median_of(rs, "first_hint_ms"),
                     stop_ms=median_of(rs, "stop_ms"))
        summary.append(s)
    return summary


def reference(summary, mode):
    return next((s for s in summary if s["mode"] == mode and s.get("total_ms") is not None), None)


def describe_config(args):
    bw = "QEMU's default max-bandwidth (128 MiB/s)" if not args.bandwidth_bytes else (
        f"max-bandwidth {args.bandwidth_bytes * 8 / 1e9:g} Gbit/s" if args.bandwidth_bytes >= 1e9
        else f"max-bandwidth {args.bandwidth_bytes / (1 << 20):g} MiB/s")
    return f"{bw}, downtime limit {args.downtime_ms} ms"


def describe_group(qemu, mem, results, args):
    dirtied = sorted({x["dirtied_mib"] for x in results if x.get("dirtied_mib")})
    d = (f"{dirtied[0]}-{dirtied[-1]}" if len(dirtied) > 1 else f"{dirtied[0]}") if dirtied else "0"
    return (f"QEMU {qemu} / Linux {args.guest_kernel}, {mem} MiB guest, {describe_config(args)}, "
            f"{d} MiB dirtied and freed (floor: none)")


def print_table(summary, title=None):
    if title:
        print(f"\n{title}", end="")
    none, floor = reference(summary, "none"), reference(summary, "floor")
    fmt = lambda v, f: "-" if v is None else format(v, f)
    print(f"\n{'mode':<22} {'runs':>4} {'total ms':>9} {'MB sent':>8} {'vs none':>8} {'x floor':>8} {'hinted MiB':>10} "
          f"{'1st hint ms':>11} {'STOP ms':>8} {'min ms':>7} {'max ms':>7} {'dest ok':>7} {'source':>10}")
    for s in summary:
        if s.get("total_ms") is None:
            e = s["first_error"]
            print(f"{s['mode']:<22} {s['runs']:>4}   every run failed: {e['error'][:80]} (see {e['run_dir']}-dst)")
            continue
        rel = f"{100 * (1 - s['total_ms'] / none['total_ms']):.0f}%" if none and s is not none else "-"
        xfl = f"{s['mb'] / floor['mb']:.2f}" if floor and s is not floor else "-"
        runs = f"{s['runs']}" if s["completed"] == s["runs"] else f"{s['completed']}/{s['runs']}"
        print(f"{s['mode']:<22} {runs:>4} {s['total_ms']:>9.0f} {s['mb']:>8.0f} {rel:>8} {xfl:>8} {fmt(s['hinted_mib'], '.0f'):>10} "
              f"{fmt(s['first_hint_ms'], '.1f'):>11} {fmt(s['stop_ms'], '.1f'):>8} {s['min_ms']:>7.0f} {s['max_ms']:>7.0f} "
              f"{'yes' if s['dest_ok'] else 'NO':>7} {s['source'] or '-':>10}")
    # The issue's targets for the TCG default source (reported only; they do not decide the
    # exit status).
    k = reference(summary, "balloond:kpageflags")
    if k:
        checks = []
        if floor:
            r = k["mb"] / floor["mb"]
            checks.append(f"bytes {r:.2f} x floor (<= 1.10: {'met' if r <= 1.10 else 'MISSED'})")
        if none:
            r = 1 - k["total_ms"] / none["total_ms"]
            checks.append(f"time -{100 * r:.0f}% vs none (>= 84%: {'met' if r >= 0.84 else 'MISSED'})")
        if k["first_hint_ms"] is not None:
            checks.append(f"first hint {k['first_hint_ms']:.1f} ms (<= 100 ms: {'met' if k['first_hint_ms'] <= 100 else 'MISSED'})")
        if checks:
            print("targets, balloond:kpageflags: " + "; ".join(checks))
    # Owned sources against the in-kernel driver (issue 11: <= 1.0x at 1 GiB, <= 0.6x at 4 GiB).
    kern = reference(summary, "kernel")
    owned = [s for s in summary if s.get("total_ms") is not None and s["mode"].startswith("balloond")
             and "@" not in s["mode"] and s["source"] in ("hugetlb", "anonymous", "offline") and not s["mode"].endswith("-control")]
    if kern and owned:
        print("owned vs kernel: " + "; ".join(f"{s['mode']} ({s['source']}) time x{s['total_ms'] / kern['total_ms']:.2f}, "
                                              f"bytes x{s['mb'] / kern['mb']:.2f}" for s in owned))
    if any(0 < s["completed"] < s["runs"] for s in summary):
        print("(runs shown as completed/total: failed runs count in 'dest ok' but not in the medians)")


def plot_tool():
    """matplotlib if importable (pip-installed when missing), else gnuplot if installed, else None."""
    if ensure_matplotlib():
        return "matplotlib"
    return "gnuplot" if shutil.which("gnuplot") else None


MODE_COLORS = {"floor": "#8c8c8c", "none": "#b2182b", "kernel": "#ef8a62"}
VERSION_COLORS = ["#2166ac", "#1b9e77", "#7570b3", "#d95f02"]


def plot_title(args, results):
    d = f"{args.dirty_percent}% of RAM" if args.dirty_percent else f"{args.dirty_mib} MiB"
    runs = ", ".join(f"QEMU {v}: {n}" for v, n in zip(args.qemu_versions, args.runs_per_version))
    variants = sorted({split_mode(x["mode"])[1] for x in results} - {None})
    notes = "".join(f"; @{v}: {GUEST_VARIANTS[v]} guest" for v in variants)
    return (f"live migration of a TCG guest over loopback ({describe_config(args)}; Linux {args.guest_kernel} guest): "
            f"{d} dirtied and freed before (floor: nothing dirtied)\nruns per mode, interleaved: {runs}{notes}")


def plot_matplotlib(modes, results, path, args):
    """Per guest size a total time and an MB sent panel; per mode one bar (median) per QEMU
    version, with each run as a point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    mems = [m for m in args.mems if any(x.get("mem_mib") == m for x in results)]
    versions = [v for v in args.qemu_versions if any(x.get("qemu_version") == v for x in results)]
    nv = len(versions)
    width = 0.75 / nv
    # Panels stacked: per guest size, total time above MB sent.
    fig, axes = plt.subplots(2 * len(mems), 1, figsize=(max(10, (0.6 + 0.5 * nv) * len(modes) + 1.5), 3.7 * 2 * len(mems) + 1.0),
                             squeeze=False)
    axes = [axes[2 * i:2 * i + 2, 0] for i in range(len(mems))]
    panels = [("total_ms", "total time (ms)", lambda v: v),
              ("transferred_bytes", "sent (MB = 10^6 bytes)", lambda v: v / 1e6)]
    for row, mem in zip(axes, mems):
        row_modes = [m for m in modes if any(x["mode"] == m and x.get("mem_mib") == mem for x in results)]
        for ax, (key, label, conv) in zip(row, panels):
            for vi, ver in enumerate(versions):
                for i, mode in enumerate(row_modes):
                    all_rs = [x for x in results if x["mode"] == mode and group_key(x) == (ver, mem)]
                    rs = [x for x in all_rs if "error" not in x]
                    color = VERSION_COLORS[vi % len(VERSION_COLORS)] if nv > 1 else MODE_COLORS.get(split_mode(mode)[0], "#2166ac")
                    xc = i + (vi - (nv - 1) / 2) * width
                    vals = [conv(x[key]) for x in rs]
                    if vals:
                        med = statistics.median(vals)
                        ax.bar(xc, med, width=width * 0.9, color=color, alpha=0.45, edgecolor=color,
                               hatch="//" if "@" in mode else None)
                        ax.annotate(f"{med:.0f}", (xc, max(vals)), xytext=(0, 3), textcoords="offset points",
                                    ha="center", va="bottom", fontsize=8, fontweight="bold")
                        n = len(vals)
                        offs = [(j - (n - 1) / 2) * (0.5 * width / max(n - 1, 1)) for j in range(n)]
                        ax.scatter([xc + o for o in offs], vals, color=color, edgecolor="black", linewidth=0.5, s=20, zorder=3)
                    failed = len(all_rs) - len(rs)
                    unverified = sum(1 for x in rs if not x["kept_region_ok"] or x["dest_console_errors"])
                    marks = ([f"{failed} failed"] if failed else []) + ([f"{unverified} dest\nerror"] if unverified else [])
                    if marks:
                        ax.text(xc, 0, "\n".join(marks), ha="center", va="bottom", color="red", fontsize=8, fontweight="bold")
            ax.set_xticks(range(len(row_modes)))
            ax.set_xticklabels(row_modes, rotation=20, ha="right", fontsize=9)
            ax.set_ylabel(label)
            ax.set_title(f"{mem} MiB guest: {label}, median (bar), each run (point); red: runs failed or destination errors",
                         fontsize=10)
            ax.set_xlim(-0.6, len(row_modes) - 0.4)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
            ax.grid(axis="y", alpha=0.3)
            if nv > 1:
                ax.legend(handles=[Patch(facecolor=VERSION_COLORS[vi % len(VERSION_COLORS)], alpha=0.45, label=f"QEMU {v}")
                                   for vi, v in enumerate(versions)], loc="best", fontsize=8)
            elif len(mems) == 1:
                # The issue's targets for kpageflags, against this run's none and floor.
                grp = summarize(modes, results)
                none, floor = reference(grp, "none"), reference(grp, "floor")
                if key == "total_ms" and none:
                    ax.axhline(none["total_ms"] * (1 - 0.84), color="#2166ac", linestyle=":", linewidth=1,
                               label="target: 84% less than none")
                    ax.legend(loc="best", fontsize=8)
                if key == "transferred_bytes" and floor:
                    ax.axhline(floor["mb"] * 1.10, color="#2166ac", linestyle=":", linewidth=1, label="target: 1.10 x floor")
                    ax.legend(loc="best", fontsize=8)
    chars = int(fig.get_figwidth() * 14)
    fig.suptitle("\n".join(textwrap.fill(line, chars) for line in plot_title(args, results).splitlines()), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gnuplot(summary, results, path, args):
    """Fallback without matplotlib: one QEMU version and one guest size only."""
    work = path + ".gnuplot"
    os.makedirs(work, exist_ok=True)
    q = lambda t: '"' + t.replace('"', "'") + '"'
    with open(os.path.join(work, "median.dat"), "w") as f:
        for i, s in enumerate(summary):
            t = s.get("total_ms")
            f.write(f"{i} {q(s['mode'])} {t if t is not None else 'NaN'} {s['mb'] if t is not None else 'NaN'}\n")
    with open(os.path.join(work, "runs.dat"), "w") as f:
        for i, s in enumerate(summary):
            rs = [x for x in results if x["mode"] == s["mode"] and "error" not in x]
            n = len(rs)
            for j, x in enumerate(rs):
                f.write(f"{i + (j - (n - 1) / 2) * (0.3 / max(n - 1, 1)):.3f} {x['total_ms']} {x['transferred_bytes'] / 1e6:.1f}\n")
    terms = subprocess.run(["gnuplot", "-e", "set terminal"], capture_output=True, text=True)
    term = "pngcairo" if "pngcairo" in terms.stdout + terms.stderr else "png"
    d = lambda n: q(os.path.join(work, n))
    script = f"""set terminal {term} size {max(1100, 290 * len(summary))},560
set output {q(path)}
set datafile missing "NaN"
set multiplot layout 1,2 title {q(plot_title(args, results).splitlines()[0])}
set style fill solid 0.45 border
set boxwidth 0.6
set xrange [-0.6:{len(summary) - 0.4}]
set yrange [0:*]
set grid ytics
set xtics rotate by -15
set key top right
set title "total time (ms): median (bar), each run (point)"
plot {d('median.dat')} using 1:3:xtic(2) with boxes title "median", {d('runs.dat')} using 1:2 with points pt 7 ps 1 title "run"
set title "sent (MB = 10^6 bytes): median (bar), each run (point)"
plot {d('median.dat')} using 1:4:xtic(2) with boxes title "median", {d('runs.dat')} using 1:3 with points pt 7 ps 1 title "run"
unset multiplot
"""
    with open(os.path.join(work, "plot.gp"), "w") as f:
        f.write(script)
    r = subprocess.run(["gnuplot", os.path.join(work, "plot.gp")], capture_output=True, text=True)
    if r.returncode != 0:
        raise Fail(f"gnuplot failed: {r.stderr.strip()[-500:]} (script {work}/plot.gp)")


def write_plot(modes, results, path, args):
    tool = plot_tool()
    groups = {group_key(x) for x in results}
    if tool == "gnuplot" and len(groups) > 1:
        tool = None
    if tool is None:
        print(f"migrate: --plot {path}: matplotlib is not available{' (gnuplot draws one QEMU version and size only)' if len(groups) > 1 else ' and neither is gnuplot'}, "
              f"so no plot was written. Install it: {sys.executable} -m pip install matplotlib, then rerun; "
              f"the results are in the table above" + (f" and in {args.json}" if args.json else ""), file=sys.stderr)
        return None
    if not any("error" not in x for x in results):
        print(f"migrate: --plot {path}: every run failed, nothing to plot", file=sys.stderr)
        return None
    try:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        if tool == "matplotlib":
            plot_matplotlib(modes, results, path, args)
        else:
            plot_gnuplot(summarize(modes, results), results, path, args)
        print(f"migrate: plot ({tool}) written to {path}", file=sys.stderr)
        return path
    except Exception as e:  # a plot problem must not hide the results or change the exit status
        print(f"migrate: --plot {path}: {tool} failed: {e}", file=sys.stderr)
        return None


def kill_during_round(src, agent, args):
    """--kill-during-round: SIGKILL balloond at a random moment early in the migration, when
    its hint round runs (balloond's guardian must stop the device before the worker's memory is reused), then
    start a memhog that takes freed memory, writes a pattern into it and verifies it after a
    hold, so the check runs on the destination (wait_hog): a page the device dropped from
    the migration after the kernel reused it would fail there."""
    def ended():
        return src.qmp.cmd("query-migrate").get("status") in ("completed", "failed", "cancelled")

    # QEMU sends the round's cmd id as the migration starts; balloond publishes its status
    # only between rounds, so the kill goes by time and balloond's log tells where it landed.
    time.sleep(random.uniform(args.kill_min_delay_ms, args.kill_max_delay_ms) / 1000)
    if ended():
        return {"killed": False, "kill_note": "the migration ended before the kill"}
    agent.check("kill -9 $(cat /run/bg/balloond/pid)", timeout=5)
    agent.check(f"bg-run /run/bg/hog memhog -q -H {args.kill_hog_hold_s} {args.kill_hog_mib}", timeout=5)
    log = agent.run("cat /run/bg/balloond/log", timeout=5)[0]
    started = len(re.findall(r"^.*cmd_id=round 0x[0-9a-f]+.*free page hint command", log, re.M))
    ended_rounds = len(re.findall(r"free page hint round ended", log))
    return {"killed": True, "killed_in_round": started > ended_rounds, "rounds_started": started}


def wait_hog(agent, timeout=300):
    """The memhog started after the kill, on the destination: True when it verified its pages."""
    deadline = time.time() + timeout
    while agent.run("test -e /run/bg/hog/rc && echo done")[0].strip() != "done":
        if time.time() > deadline:
            raise Fail("the memhog started after the kill did not finish in time")
        time.sleep(0.5)
    out = agent.run("cat /run/bg/hog/rc; tail -3 /run/bg/hog/log")[0]
    return out.split()[0] == "0" and "memhog: ok" in out


def status_json(agent, timeout=120):
    out = agent.run("balloond status --json", timeout=timeout)[0]
    def num(key):
        m = re.search(r'"' + key + r'"\s*:\s*(\d+)', out)
        return int(m.group(1)) if m else 0
    m = re.search(r'"hintCommand"\s*:\s*"([^"]*)"', out)
    return {"rounds": num("hintRounds"), "held": num("hintHeldBytes"), "hinted": num("bytesHinted"), "command": m.group(1) if m else ""}


def cancel_during_round(mode, run_index, base, src, agent, t0):
    """--cancel: migrate_cancel once balloond has started a hint round; QEMU then sends DONE
    from its cleanup and balloond must give back everything it still holds (an owned source
    gives memory back as soon as its hints are used, so it may hold little by then)."""
    deadline = time.time() + 120
    while True:
        st = status_json(agent)
        if st["rounds"] >= 1:
            break
        if src.qmp.cmd("query-migrate").get("status") in ("completed", "failed"):
            raise Fail("the migration ended before balloond started a hint round; lower --bandwidth-mib")
        if time.time() > deadline:
            raise Fail(f"no hint round within 120 s: {st}")
        time.sleep(0.1)
    held_at_cancel = st["held"]
    src.qmp.cmd("migrate_cancel")
    t_cancel = time.time()
    while src.qmp.cmd("query-migrate").get("status") not in ("cancelled", "failed", "completed"):
        if time.time() - t_cancel > 60:
            raise Fail("migrate_cancel did not take effect in 60 s")
        time.sleep(0.05)
    final = src.qmp.cmd("query-migrate").get("status")
    while True:
        st = status_json(agent)
        if st["held"] == 0 and st["command"] == "DONE":
            break
        if time.time() - t_cancel > 60:
            raise Fail(f"balloond still holds {st['held'] >> 20} MiB (cmd {st['command']}) 60 s after migrate_cancel")
        time.sleep(0.1)
    released_ms = int((time.time() - t_cancel) * 1000)
    alive = "running" if agent.run("kill -0 $(cat /run/bg/balloond/pid) && echo running")[0].strip() == "running" else "exited"
    # What the guest's hugetlb pool still holds back once balloond gave everything back: free
    # pool pages and reservations (the ring's one page is faulted, so both must be 0).
    meminfo = agent.run("cat /proc/meminfo")[0]
    def pool(key):
        m = re.search(rf"{key}:\s+(\d+)", meminfo)
        return int(m.group(1)) if m else None
    return {"mode": mode, "run": run_index, "cancelled": final == "cancelled", "migration_status": final,
            "held_at_cancel_mib": held_at_cancel >> 20, "hinted_mib": st["hinted"] >> 20, "released_ms": released_ms,
            "balloond": alive, "pool_free_pages": pool("HugePages_Free"), "pool_reserved_pages": pool("HugePages_Rsvd"),
            "kept_region_ok": True, "dest_console_errors": [], "run_dir": base}


def comma_list(kind, allowed=None):
    """argparse type: a comma-separated list of `kind` values (each in `allowed`, if given)."""
    def parse(text):
        try:
            vals = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"want a comma-separated list of {kind.__name__} values, not {text!r}")
        if not vals:
            raise argparse.ArgumentTypeError("empty list")
        bad = [v for v in vals if allowed is not None and v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(map(str, bad))}: want one of {', '.join(allowed)}")
        return vals
    return parse


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="none,balloond")
    ap.add_argument("--runs", type=comma_list(int), default=[1], metavar="N[,M]",
                    help="runs per mode, interleaved (default 1); N,M: N on the first --qemu-version, M on the others")
    ap.add_argument("--mem", dest="mems", type=comma_list(int), default=[1024], metavar="MIB[,MIB...]",
                    help="guest RAM sizes in MiB, each a group of its own (default 1024)")
    ap.add_argument("--dirty-mib", type=int, default=600,
                    help="MiB of text written to /dev/shm and removed before migrating (default 600)")
    ap.add_argument("--dirty-percent", type=int, default=0, metavar="P",
                    help="instead: memhog dirties P%% of the guest's RAM (at most MemAvailable - 64 MiB) and frees it")
    ap.add_argument("--keep-mib", type=int, default=16)
    ap.add_argument("--kernel-args", default="")
    ap.add_argument("--poison-mem", type=comma_list(int), metavar="MIB[,MIB...]",
                    help="guest sizes on which MODE@VARIANT modes run (default: every --mem size)")
    # Both set the same cap; the last one given wins (so a wrapper's default can be overridden).
    ap.add_argument("--bandwidth-mib", dest="bandwidth_bytes", type=lambda v: int(v) << 20, default=0, metavar="MIB",
                    help="migration bandwidth cap in MiB/s (default: QEMU's own default, 128 MiB/s, about a 1 Gbit/s link)")
    ap.add_argument("--bandwidth-gbit", dest="bandwidth_bytes", type=lambda v: int(float(v) * 1e9 / 8), default=0, metavar="GBIT",
                    help="migration bandwidth cap in Gbit/s, e.g. 100 (the seed's configuration)")
    ap.add_argument("--downtime-ms", type=int, default=300, help="downtime-limit (default 300; the seed's configuration: 2000)")
    ap.add_argument("--postcopy", action="store_true", help="enable the postcopy-ram capability (QEMU then never hints)")
    ap.add_argument("--cancel", action="store_true",
                    help="migrate_cancel during balloond's first hint round and check it gives back everything (prints the per-run results only)")
    ap.add_argument("--kill-during-round", action="store_true",
                    help="SIGKILL balloond at a random moment of its first hint round, start a checksumming memhog in the "
                         "freed memory, and verify it (and the kept region) on the destination")
    ap.add_argument("--kill-min-delay-ms", type=int, default=100, help="with --kill-during-round: earliest kill after the migration starts")
    ap.add_argument("--kill-max-delay-ms", type=int, default=2500, help="with --kill-during-round: latest kill after the migration starts")
    ap.add_argument("--kill-hog-mib", type=int, default=256, help="with --kill-during-round: the memhog's size")
    ap.add_argument("--kill-hog-hold-s", type=int, default=20, help="with --kill-during-round: how long the memhog holds before verifying")
    ap.add_argument("--qemu-version", dest="qemu_versions", type=comma_list(str, QEMU_VERSIONS),
                    default=[os.environ.get("QEMU_VERSION") or "7.2"], metavar="7.2|10.0[,...]",
                    help="QEMU of both source and destination (default: $QEMU_VERSION, else 7.2); a list compares them")
    ap.add_argument("--guest-kernel", choices=GUEST_KERNELS, default=os.environ.get("GUEST_KERNEL") or "6.1",
                    help="guest kernel and image (default: $GUEST_KERNEL, else 6.1)")
    ap.add_argument("--viommu", action="store_true",
                    help="guests with a virtual IOMMU and the balloon behind it with iommu_platform=on (balloond uses vfio)")
    ap.add_argument("--balloond-log-level", choices=["info", "debug", "trace"], default="info",
                    help="balloond's --log-level in the source guest; with debug or trace the whole log is kept in the JSON "
                         "(trace: one line per hint, with when it was posted and seen used)")
    ap.add_argument("--sample-ms", type=int, default=0, metavar="MS",
                    help="poll query-migrate every MS ms and keep [ms since migrate, bytes transferred, normal pages] per poll in the results (\"samples\")")
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--plot", metavar="FILE.png", help="plot total time and MB sent per mode (matplotlib, else gnuplot)")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        v = split_mode(m)[1]
        if v is not None and v not in GUEST_VARIANTS:
            ap.error(f"mode {m}: unknown guest variant @{v} (want @{', @'.join(GUEST_VARIANTS)})")
    if len(args.runs) > 2 or min(args.runs) < 1:
        ap.error("--runs: want N or N,M with N, M >= 1")
    args.runs_per_version = [args.runs[0]] + [args.runs[-1]] * (len(args.qemu_versions) - 1)
    if args.poison_mem is None:
        args.poison_mem = args.mems
    if not 0 <= args.dirty_percent < 100:
        ap.error("--dirty-percent must be between 1 and 99")
    # run-guest.sh gets QEMU_VERSION/GUEST_KERNEL per guest; QEMU (an explicit binary) would override them.
    os.environ.pop("QEMU", None)
    for v in args.qemu_versions:
        if not qemu_available(v):
            ap.error(f"QEMU {v} is not set up: run scripts/setup.sh")
    print(f"migrate: platform QEMU {'/'.join(args.qemu_versions)} / Linux {args.guest_kernel}; {describe_config(args)}",
          file=sys.stderr, flush=True)
    if args.plot and plot_tool() is None:
        print("migrate: note: --plot needs matplotlib (pip install matplotlib) or gnuplot; neither is available, "
              "so only the table will be printed", file=sys.stderr)
    for path in (args.json, args.plot):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plan = []  # interleaved: every mode once per run index, on every version and size
    for r in range(max(args.runs_per_version)):
        for ver, n in zip(args.qemu_versions, args.runs_per_version):
            if r >= n:
                continue
            for mem in args.mems:
                for mode in modes:
                    if split_mode(mode)[1] and mem not in args.poison_mem:
                        continue
                    plan.append((r, {"qemu": ver, "mem": mem}, mode))
    results = []
    for i, (r, cfg, mode) in enumerate(plan):
        where = f" QEMU {cfg['qemu']} {cfg['mem']} MiB" if len(args.qemu_versions) > 1 or len(args.mems) > 1 else ""
        print(f"migrate: [{i + 1}/{len(plan)}] run {r + 1}{where} mode {mode} ...", file=sys.stderr, flush=True)
        try:
            res = migrate_once(mode, r, cfg, args)
        except (Fail, OSError) as e:
            # A destination that crashes (seen under TCG even with the in-kernel driver,
            # docs/virtio-balloon.md §9) is a result, not a reason to stop the comparison.
            res = {"mode": mode, "run": r, "qemu_version": cfg["qemu"], "guest_kernel": args.guest_kernel,
                   "mem_mib": cfg["mem"], "error": str(e)[:300], "kept_region_ok": False,
                   "dest_console_errors": [f"run failed: {e}"[:200]],
                   "run_dir": os.path.join(CACHE, "runs", "migrate", run_tag(mode, r, cfg, args))}
        res["irq_disabled"] = irq_disabled_lines(res.get("run_dir"))
        print("migrate:   " + json.dumps({k: v for k, v in res.items() if k != "run_dir"}), file=sys.stderr, flush=True)
        results.append(res)
        if args.json:  # after every run, so an interrupted benchmark keeps what it has
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    if args.cancel:
        for x in results:
            print(json.dumps({k: v for k, v in x.items() if k != "run_dir"}))
        return 1 if any("error" in x or not x.get("cancelled") for x in results if x["mode"].startswith("balloond")) else 0
    for ver in args.qemu_versions:
        for mem in args.mems:
            rs = [x for x in results if group_key(x) == (ver, mem)]
            if rs:
                print_table(summarize(modes, rs), describe_group(ver, mem, rs, args))
    sys.stdout.flush()
    if args.plot:
        write_plot(modes, results, args.plot, args)
    bad = [x for x in results if not (x["kept_region_ok"] and not x["dest_console_errors"])]
    for x in bad:
        print(f"migrate: {x['mode']} run {x['run'] + 1} (QEMU {x['qemu_version']}, {x['mem_mib']} MiB): destination failed "
              f"verification: {x['dest_console_errors'][:2]} (see {x['run_dir']}-dst)", file=sys.stderr)
    # Only balloond's own runs decide the exit status: the no-driver and in-kernel runs are
    # comparisons (the in-kernel driver's destination crashes now and then under TCG, §9).
    return 1 if any(x["mode"].startswith("balloond") for x in bad) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fail as e:
        print(f"migrate: error: {e}", file=sys.stderr)
        sys.exit(1)
