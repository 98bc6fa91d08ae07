"""Host side of the balloond test guests, shared by scripts/migrate.py, scripts/bench-balloon.py
and (through them) scripts/demo.sh and the benchmarks.

- `Guest` boots one guest with scripts/run-guest.sh (TCG, platform from QEMU_VERSION /
  GUEST_KERNEL) in a run directory, and stops it again.
- `QMP` talks to its QEMU through QEMU's own QMP library, `qemu.qmp` (PyPI package
  `qemu.qmp`; installed with pip on first use when it is missing).
- `Agent` talks to the guest command agent on ttyS1 (protocol: scripts/guest/balloond-agent).

Every failure (QEMU gone, QMP error, agent timeout, guest command failing) is raised as
`Fail` with a one-line reason; callers treat a failed run as a result.
"""
import asyncio, base64, importlib, logging, os, re, shutil, signal, socket, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("BALLOOND_CACHE", os.path.join(ROOT, ".cache"))
MIB = 1 << 20


class Fail(Exception):
    pass


def pip_install(*packages, why=""):
    """Installs PyPI packages with this interpreter's pip (quietly, on stderr). Returns
    whether it worked. Debian's own python3 refuses plain pip installs (PEP 668); then it
    retries with --break-system-packages, which only adds packages to that interpreter."""
    base = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *packages]
    print(f"guestlib: {' '.join(packages)} missing{why}; installing it with pip", file=sys.stderr, flush=True)
    r = subprocess.run(base, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0 and "externally-managed-environment" in r.stderr:
        r = subprocess.run(base + ["--break-system-packages"], stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        print(f"guestlib: pip install {' '.join(packages)} failed: {r.stderr.strip()[-400:]}", file=sys.stderr)
        return False
    importlib.invalidate_caches()
    return True


def _load_qmp():
    try:
        importlib.import_module("qemu.qmp.legacy")
    except ImportError:
        if not pip_install("qemu.qmp", why=" (QEMU's QMP library)"):
            raise SystemExit("guestlib: error: the scripts need QEMU's QMP library: run "
                             f"`{sys.executable} -m pip install qemu.qmp` (or scripts/setup.sh), then retry")
    import qemu.qmp
    from qemu.qmp import legacy
    # qemu.qmp logs every lost connection at WARNING; a QEMU that quits or crashes is
    # expected here and reported through Fail.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    return qemu.qmp, legacy


qmp_lib, qmp_legacy = _load_qmp()


class QMP:
    """A QMP connection (qemu.qmp's synchronous QEMUMonitorProtocol). `cmd` returns the
    command's return value; any error, a closed connection or a timeout raises Fail."""

    def __init__(self, path, timeout=60, cmd_timeout=120, alive=None):
        """Connects to the QMP socket `path`, retrying for `timeout` s while `alive()` (the
        QEMU process is still there) holds."""
        deadline = time.time() + timeout
        while True:
            m = qmp_legacy.QEMUMonitorProtocol(path)
            try:
                m.connect(negotiate=True)
                break
            except (qmp_lib.QMPError, OSError) as e:
                if alive is not None and not alive():
                    raise Fail(f"QEMU exited before its QMP socket {path} came up")
                if time.time() > deadline:
                    raise Fail(f"QMP socket {path} did not come up in {timeout} s: {e}")
                time.sleep(0.2)
        m.settimeout(cmd_timeout)
        self.m = m
        self.path = path

    def cmd(self, name, **args):
        try:
            return self.m.cmd(name, **args)
        except qmp_lib.ExecuteError as e:
            raise Fail(f"QMP {name}: {e}")
        except (qmp_lib.QMPError, asyncio.TimeoutError, OSError, EOFError) as e:
            raise Fail(f"QMP {name}: {type(e).__name__}: {e or 'connection lost'}")

    def close(self):
        try:
            self.m.close()
        except Exception:  # closing a connection QEMU already dropped
            pass


class Agent:
    """Client of the guest command agent (protocol: scripts/guest/balloond-agent)."""

    def __init__(self, path, prefix="c"):
        self.s = socket.socket(socket.AF_UNIX)
        try:
            self.s.connect(path)
        except OSError as e:
            self.s.close()
            raise Fail(f"cannot connect to the guest agent at {path}: {e}")
        self.prefix = prefix
        self.n = 0
        self.buf = b""

    def run(self, command, timeout=120):
        """Runs `command` in the guest (killed after `timeout` s there); returns (output, rc)."""
        self.n += 1
        cid = f"{self.prefix}{self.n}"
        self.s.settimeout(timeout + 20)
        try:
            self.s.sendall(f"{cid} {timeout} {base64.b64encode(command.encode()).decode()}\n".encode())
        except OSError as e:
            raise Fail(f"guest agent: cannot send: {e}")
        begin = re.compile(rb"<<<BEGIN " + cid.encode() + rb" len=(\d+)>>>\n")
        while True:
            m = begin.search(self.buf)
            if m:
                n = int(m.group(1))
                end = re.compile(rb"\n<<<END " + cid.encode() + rb" rc=(-?\d+)>>>\n")
                m2 = end.match(self.buf, m.end() + n)
                if m2:
                    out = self.buf[m.end():m.end() + n].decode(errors="replace")
                    self.buf = self.buf[m2.end():]
                    return out, int(m2.group(1))
            try:
                d = self.s.recv(65536)
            except socket.timeout:
                raise Fail(f"guest agent did not answer within {timeout + 20} s: {command[:200]}")
            except OSError as e:
                raise Fail(f"guest agent: {e}")
            if not d:
                raise Fail("guest agent closed the channel")
            self.buf += d

    def check(self, command, timeout=120):
        """Like run, but a non-zero exit status raises Fail (with the output's tail)."""
        out, rc = self.run(command, timeout)
        if rc != 0:
            raise Fail(f"guest command failed (rc={rc}): {command}\n{out[-2000:]}")
        return out

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


class Guest:
    """One guest under scripts/run-guest.sh in `run_dir` (made afresh). `env` adds to the
    launcher's environment (MEM, KERNEL_ARGS, BALLOON_PROPS, ...; see run-guest.sh);
    `incoming` makes it a migration destination. QEMU dies with this process (PARENT_PID)."""

    def __init__(self, run_dir, mem="1G", kernel_args="", incoming=None, env=None, max_runtime=900, agent_prefix="c"):
        self.run_dir = run_dir
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        full_env = dict(os.environ, RUN_DIR=run_dir, MEM=str(mem), KERNEL_ARGS=kernel_args,
                        PARENT_PID=str(os.getpid()), MAX_RUNTIME=str(max_runtime))
        full_env.update(env or {})
        extra = ["-incoming", incoming] if incoming else []
        self.log = open(os.path.join(run_dir, "qemu.log"), "w")
        self.p = subprocess.Popen([os.path.join(ROOT, "scripts/run-guest.sh")] + extra, env=full_env,
                                  stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.agent_prefix = agent_prefix
        self.agent = None
        self.qemu_pid = None
        try:
            self.qmp = QMP(os.path.join(run_dir, "qmp.sock"), alive=lambda: self.p.poll() is None)
        except Fail as e:
            self.qmp = None
            self.stop()
            raise Fail(f"{e}; see {os.path.join(run_dir, 'qemu.log')}: {self.log_tail()}")

    def log_tail(self):
        """The last line of run-guest.sh's and QEMU's own output (why QEMU did not start)."""
        try:
            lines = [l for l in open(os.path.join(self.run_dir, "qemu.log"), errors="replace").read().splitlines() if l.strip()]
            return lines[-1][-300:] if lines else "(empty)"
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout=180, probe=False):
        """Waits for the guest's ready marker and connects the agent (probe: and runs `echo ok`)."""
        deadline = time.time() + timeout
        console = os.path.join(self.run_dir, "console.log")
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise Fail(f"QEMU exited early; see {self.run_dir}")
            try:
                if "BALLOOND-GUEST-READY" in open(console, errors="replace").read():
                    self.connect_agent()
                    if probe:
                        self.agent.check("echo ok", timeout=30)
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.2)
        raise Fail(f"guest not ready after {timeout} s; see {console}")

    def connect_agent(self):
        """Connects the agent (a migration destination: after the migration, the guest's
        agent continues on the destination's serial line)."""
        self.agent = Agent(os.path.join(self.run_dir, "agent.sock"), self.agent_prefix)
        try:
            self.qemu_pid = int(open(os.path.join(self.run_dir, "qemu.pid")).read().strip())
        except (OSError, ValueError):
            self.qemu_pid = None
        return self.agent

    def console(self):
        try:
            return open(os.path.join(self.run_dir, "console.log"), errors="replace").read()
        except FileNotFoundError:
            return ""

    def rss_mib(self):
        """QEMU's resident memory on the host, MiB."""
        with open(f"/proc/{self.qemu_pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024

    def stable_rss_mib(self, timeout=60, band=2.0):
        """RSS once four 1 s samples in a row are within `band` MiB (else the last one)."""
        samples = [self.rss_mib()]
        deadline = time.time() + timeout
        while time.time() < deadline:
            time.sleep(1)
            samples.append(self.rss_mib())
            w = samples[-4:]
            if len(w) == 4 and max(w) - min(w) <= band:
                break
        return samples[-1]

    def stop(self):
        """quit over QMP, then SIGTERM to run-guest.sh (which stops QEMU), then SIGKILL."""
        if self.agent:
            self.agent.close()
        if self.qmp:
            try:
                self.qmp.cmd("quit")
            except Fail:
                pass
            self.qmp.close()
        try:
            self.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)
        self.log.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def qemu_available(version):
    """Whether the QEMU of platform `version` is set up (scripts/platform.sh's rule)."""
    if version == "7.2":
        return shutil.which("qemu-system-x86_64") is not None
    d = os.path.join(CACHE, f"qemu-{version}")
    return os.path.exists(os.path.join(d, ".done")) and os.access(os.path.join(d, "qemu-system-x86_64"), os.X_OK)


def ensure_matplotlib():
    """Imports matplotlib, installing it with pip when missing; False if that fails."""
    try:
        importlib.import_module("matplotlib")
        return True
    except ImportError:
        pass
    if not pip_install("matplotlib", why=" (for the plot)"):
        return False
    try:
        importlib.import_module("matplotlib")
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    # `python3 scripts/guestlib.py` installs what the scripts need (setup.sh and
    # bench-migrate.sh call it): qemu.qmp (importing this module did; without it the import
    # exits non-zero) and matplotlib for the plots (only a warning when it cannot).
    ok = ensure_matplotlib()
    print(f"guestlib: qemu.qmp ok, matplotlib {'ok' if ok else 'MISSING (plots fall back to gnuplot or are skipped)'}",
          file=sys.stderr)
