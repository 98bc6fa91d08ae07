// Boots a balloond test guest (scripts/run-guest.sh) and talks to it: QMP (`qmp`) and the
// command channel (`run`, `check`, `spawn`, ...).
//
//     try GuestVM.with(.init(kernelArgs: ["page_poison=1"])) { vm in
//         let (out, rc) = try vm.run("cat /proc/meminfo")
//         let p = try vm.spawn(["balloond", "run"], name: "balloond")
//         try vm.signal(p, "TERM")
//         #expect(try vm.waitForExit(p, timeout: 30) == 0)
//         _ = try vm.qmp.execute("balloon", arguments: ["value": 512 << 20])
//     }
//
// Everything is synchronous and every wait has a timeout. Each VM gets a run directory
// .cache/runs/<name>-<time>-<pid>-<n>/ (console.log, qemu.log, cmdline, sockets) that is
// kept after the test; error messages say where it is. Run directories of earlier test
// processes beyond the newest 20 (BALLOOND_KEEP_RUNS) are pruned at the first boot.
//
// Environment knobs: BALLOOND_BOOT_TIMEOUT (s, default 90), BALLOOND_MAX_VMS (concurrent
// VMs, default half the cores, at least 1), BALLOOND_SKIP_GUEST_BUILD=1 (do not run
// scripts/build-guest.sh before the first boot), BALLOOND_KEEP_RUNS (default 20),
// BALLOOND_QEMU_VERSION (7.2 or 10.0) and BALLOOND_GUEST_KERNEL (6.1 or 6.12): the platform
// of every VM whose Options name none (GuestPlatform.swift).

import Foundation
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Host paths

enum HarnessPaths {
    /// The package root: BALLOOND_ROOT, else derived from this file's path
    /// (<root>/Tests/IntegrationTests/Harness/GuestVM.swift).
    static let packageRoot: URL = {
        if let root = ProcessInfo.processInfo.environment["BALLOOND_ROOT"], !root.isEmpty {
            return URL(fileURLWithPath: root)
        }
        return URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent()  // Harness
            .deletingLastPathComponent()  // IntegrationTests
            .deletingLastPathComponent()  // Tests
            .deletingLastPathComponent()
    }()

    /// BALLOOND_CACHE (as the scripts use it), else <root>/.cache.
    static var cache: URL {
        if let cache = ProcessInfo.processInfo.environment["BALLOOND_CACHE"], !cache.isEmpty {
            return URL(fileURLWithPath: cache)
        }
        return packageRoot.appendingPathComponent(".cache")
    }

    /// The default platform's kernel and image (GuestPlatform.current).
    static var kernel: URL { kernel(GuestPlatform.current.guestKernel) }
    static var initramfs: URL { initramfs(GuestPlatform.current.guestKernel) }
    /// Where scripts/setup.sh unpacks the guest kernel `version` (6.1: .cache/kernel, 6.12:
    /// .cache/kernel-6.12) and where build-guest.sh puts its image (.cache/guest, .cache/guest-6.12).
    static func kernel(_ version: String) -> URL {
        cache.appendingPathComponent(version == "6.1" ? "kernel/vmlinuz" : "kernel-\(version)/vmlinuz")
    }
    static func initramfs(_ version: String) -> URL {
        cache.appendingPathComponent(version == "6.1" ? "guest/initramfs.cpio.gz" : "guest-\(version)/initramfs.cpio.gz")
    }
    /// QEMU 10.0's wrapper from scripts/setup.sh (7.2 is the system's qemu-system-x86_64).
    static var qemu10: URL { cache.appendingPathComponent("qemu-10.0/qemu-system-x86_64") }
    static var runs: URL { cache.appendingPathComponent("runs") }
    static var runGuest: URL { packageRoot.appendingPathComponent("scripts/run-guest.sh") }
    static var buildGuest: URL { packageRoot.appendingPathComponent("scripts/build-guest.sh") }
    /// The balloond binary build-guest.sh puts into the image by default.
    static var releaseBalloond: URL { packageRoot.appendingPathComponent(".build/release/balloond") }
}

func environmentNumber(_ name: String) -> Double? {
    ProcessInfo.processInfo.environment[name].flatMap { Double($0) }
}

/// Quotes `s` for the guest's `sh`.
func shellQuote(_ s: String) -> String {
    if !s.isEmpty, s.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_./=:,+@%".contains($0)) }) {
        return s
    }
    return "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'"
}

// MARK: - Process-wide state

/// Once-per-process work (image build, pruning) and the limit on concurrent VMs.
final class HarnessState: @unchecked Sendable {
    static let shared = HarnessState()

    private let lock = NSLock()
    private var pruned = false
    /// Per guest kernel: the image build's outcome (nil: built).
    private var built: [String: HarnessError?] = [:]
    private var counter = 0
    let slots: DispatchSemaphore
    let maxVMs: Int

    private init() {
        let cores = ProcessInfo.processInfo.activeProcessorCount
        maxVMs = max(1, Int(environmentNumber("BALLOOND_MAX_VMS") ?? Double(max(1, cores / 2))))
        slots = DispatchSemaphore(value: maxVMs)
    }

    func nextIndex() -> Int {
        lock.lock()
        defer { lock.unlock() }
        counter += 1
        return counter
    }

    /// Builds the guest image of the default platform's kernel (GuestPlatform.current).
    func prepare() throws {
        try prepare(guestKernel: GuestPlatform.current.guestKernel)
    }

    /// Builds the guest image for `guestKernel` (a no-op when nothing changed), once per
    /// process and kernel, and prunes old run directories once; later calls return the
    /// first result.
    func prepare(guestKernel: String) throws {
        lock.lock()
        defer { lock.unlock() }
        if !pruned {
            pruned = true
            pruneRuns()
        }
        if let outcome = built[guestKernel] {
            if let error = outcome { throw error }
            return
        }
        if ProcessInfo.processInfo.environment["BALLOOND_SKIP_GUEST_BUILD"] == "1" {
            built[guestKernel] = .some(nil)
            return
        }
        do {
            try buildImage(guestKernel: guestKernel)
            built[guestKernel] = .some(nil)
        } catch let error as HarnessError {
            built[guestKernel] = error
            throw error
        }
    }

    private func buildImage(guestKernel: String) throws {
        let fm = FileManager.default
        let imageDirectory = HarnessPaths.initramfs(guestKernel).deletingLastPathComponent()
        try? fm.createDirectory(at: imageDirectory, withIntermediateDirectories: true)
        let logURL = imageDirectory.appendingPathComponent("build.log")
        _ = fm.createFile(atPath: logURL.path, contents: nil)
        var env = ProcessInfo.processInfo.environment
        env["GUEST_KERNEL"] = guestKernel
        let p = try ChildProcess(executable: HarnessPaths.buildGuest.path, arguments: [],
                                 environment: env, outputPath: logURL.path)
        if !p.wait(timeout: 300) {
            p.signal(SIGKILL)
            throw HarnessError(.setup, "scripts/build-guest.sh did not finish within 300 s (log: \(logURL.path))")
        }
        let output = (try? String(contentsOf: logURL, encoding: .utf8)) ?? ""
        guard p.exitStatus == 0 else {
            throw HarnessError(.setup, """
                scripts/build-guest.sh failed (exit \(p.exitStatus ?? -1)); log \(logURL.path):
                \(tail(output, lines: 20))
                """)
        }
    }

    /// Keeps the newest BALLOOND_KEEP_RUNS (default 20) run directories. Only directories
    /// named the way `makeRunDirectory` names them (…-yyyyMMdd-HHmmss-<pid>-<n>) are
    /// touched; anything else under .cache/runs belongs to someone else.
    private func pruneRuns() {
        let keep = Int(environmentNumber("BALLOOND_KEEP_RUNS") ?? 20)
        let fm = FileManager.default
        guard let entries = try? fm.contentsOfDirectory(at: HarnessPaths.runs, includingPropertiesForKeys: [.contentModificationDateKey]) else { return }
        let ours = entries.filter { url in
            url.lastPathComponent.range(of: #"-[0-9]{8}-[0-9]{6}-[0-9]+-[0-9]+$"#, options: .regularExpression) != nil
        }
        let dated = ours.map { url -> (URL, Date) in
            let date = (try? url.resourceValues(forKeys: [.contentModificationDateKey]))?.contentModificationDate ?? .distantPast
            return (url, date)
        }
        for (url, _) in dated.sorted(by: { $0.1 > $1.1 }).dropFirst(max(0, keep)) {
            try? fm.removeItem(at: url)
        }
    }
}

// MARK: - GuestVM

final class GuestVM {
    struct Options {
        /// Names the run directory; defaults to the calling function's name.
        var name: String
        /// QEMU -m (e.g. "1G", "512M").
        var memory: String
        /// QEMU -smp.
        var cpus: Int
        /// QEMU -cpu; nil: run-guest.sh's default.
        var cpuModel: String?
        /// Appended to the kernel command line ("page_poison=1", "hugepages=64",
        /// "balloond.modprobe=virtio_pci,virtio_balloon").
        var kernelArgs: [String]
        /// Extra virtio-balloon-pci properties ("free-page-reporting=on"); later ones win
        /// over run-guest.sh's defaults (id=balloon0,iothread=io0,free-page-hint=on).
        var balloonProperties: [String]
        /// Put the device behind a pcie-root-port: modern-only, 1af4:1045.
        var modernOnly: Bool
        /// false: no balloon device at all.
        var balloon: Bool
        /// Appended to the QEMU command line verbatim (e.g. ["-trace", "virtio_balloon_*"]).
        var extraQEMUArgs: [String]
        /// How long to wait for the ready marker.
        var bootTimeout: TimeInterval
        /// "7.2" or "10.0"; nil: BALLOOND_QEMU_VERSION, else 7.2 (GuestPlatform.current).
        var qemuVersion: String?
        /// "6.1" or "6.12"; nil: BALLOOND_GUEST_KERNEL, else 6.1 (GuestPlatform.current).
        var guestKernel: String?

        /// The platform this VM boots: the fields above, else GuestPlatform.current.
        var platform: GuestPlatform {
            let current = GuestPlatform.current
            return GuestPlatform(qemuVersion: qemuVersion ?? current.qemuVersion, guestKernel: guestKernel ?? current.guestKernel)
        }

        init(name: String = #function, memory: String = "1G", cpus: Int = 1, cpuModel: String? = nil,
             kernelArgs: [String] = [], balloonProperties: [String] = [], modernOnly: Bool = false,
             balloon: Bool = true, extraQEMUArgs: [String] = [],
             bootTimeout: TimeInterval = environmentNumber("BALLOOND_BOOT_TIMEOUT") ?? 90,
             qemuVersion: String? = nil, guestKernel: String? = nil) {
            self.name = name
            self.memory = memory
            self.cpus = cpus
            self.cpuModel = cpuModel
            self.kernelArgs = kernelArgs
            self.balloonProperties = balloonProperties
            self.modernOnly = modernOnly
            self.balloon = balloon
            self.extraQEMUArgs = extraQEMUArgs
            self.bootTimeout = bootTimeout
            self.qemuVersion = qemuVersion
            self.guestKernel = guestKernel
        }
    }

    /// The exact line prefix the guest prints on ttyS0 when the command agent is ready.
    static let readyMarker = "BALLOOND-GUEST-READY"

    let options: Options
    /// The QEMU version and guest kernel this VM runs.
    var platform: GuestPlatform { options.platform }
    let runDirectory: URL
    /// Guest kernel release (uname -r), from the ready marker.
    let kernelVersion: String
    /// Seconds from starting QEMU to the ready marker.
    let bootSeconds: Double
    /// The QMP connection (events collect in `qmp.pendingEvents`).
    let qmp: QMPClient

    var consoleLogPath: String { runDirectory.appendingPathComponent("console.log").path }
    var qemuLogPath: String { runDirectory.appendingPathComponent("qemu.log").path }

    private let agent: GuestAgent
    private let process: ChildProcess
    private var isShutDown = false

    private init(options: Options, runDirectory: URL, process: ChildProcess, qmp: QMPClient, agent: GuestAgent,
                 kernelVersion: String, bootSeconds: Double) {
        self.options = options
        self.runDirectory = runDirectory
        self.process = process
        self.qmp = qmp
        self.agent = agent
        self.kernelVersion = kernelVersion
        self.bootSeconds = bootSeconds
    }

    deinit { shutdown() }

    /// Boots a guest and waits until its command agent answers. Throws `.setup` with
    /// instructions if the kernel or image is missing, or if the guest does not come up.
    static func boot(_ options: Options = Options()) throws -> GuestVM {
        let fm = FileManager.default
        let platform = options.platform
        try platform.validate()
        let kernel = HarnessPaths.kernel(platform.guestKernel)
        guard fm.fileExists(atPath: kernel.path) else {
            throw HarnessError(.setup, "no guest kernel \(platform.guestKernel) at \(kernel.path): run scripts/setup.sh (it installs QEMU and downloads the Debian guest kernels)")
        }
        if platform.qemuVersion == "10.0", !fm.isExecutableFile(atPath: HarnessPaths.qemu10.path) {
            throw HarnessError(.setup, "no QEMU 10.0 at \(HarnessPaths.qemu10.path): run scripts/setup.sh (it unpacks QEMU 10.0 from bookworm-backports)")
        }
        try HarnessState.shared.prepare(guestKernel: platform.guestKernel)
        let initramfs = HarnessPaths.initramfs(platform.guestKernel)
        guard fm.fileExists(atPath: initramfs.path) else {
            throw HarnessError(.setup, "no guest image at \(initramfs.path): run GUEST_KERNEL=\(platform.guestKernel) scripts/build-guest.sh")
        }

        let state = HarnessState.shared
        state.slots.wait()
        var slotHeld = true
        var launched: ChildProcess?
        let runDirectory: URL
        do {
            runDirectory = try makeRunDirectory(name: options.name, index: state.nextIndex())
        } catch {
            state.slots.signal()
            throw error
        }
        let context = { (extra: String) -> String in
            "run directory kept: \(runDirectory.path) (console log: \(runDirectory.path)/console.log, QEMU log: \(runDirectory.path)/qemu.log)" + extra
        }
        func fail(_ error: HarnessError, consoleTail: Bool) -> HarnessError {
            if let launched { stop(launched, runDirectory: runDirectory, graceSeconds: 0) }
            if slotHeld { state.slots.signal(); slotHeld = false }
            var extra = ""
            if consoleTail {
                let console = (try? String(contentsOf: runDirectory.appendingPathComponent("console.log"), encoding: .utf8)) ?? ""
                let qemuLog = (try? String(contentsOf: runDirectory.appendingPathComponent("qemu.log"), encoding: .utf8)) ?? ""
                extra = "\n--- console.log (tail) ---\n\(tail(console, lines: 25))\n--- qemu.log (tail) ---\n\(tail(qemuLog, lines: 15))"
            }
            let annotated = error.adding(context(extra))
            try? annotated.message.write(to: runDirectory.appendingPathComponent("FAILED"), atomically: true, encoding: .utf8)
            return annotated
        }

        // Launch run-guest.sh (it runs QEMU as its child and kills it if we die).
        var env = ProcessInfo.processInfo.environment
        // Set every knob explicitly so a variable exported in the developer's shell cannot
        // change what a test boots.
        env["RUN_DIR"] = runDirectory.path
        env["MEM"] = options.memory
        env["SMP"] = String(options.cpus)
        if let cpu = options.cpuModel { env["CPU"] = cpu } else { env.removeValue(forKey: "CPU") }
        env["KERNEL_ARGS"] = options.kernelArgs.joined(separator: " ")
        env["BALLOON_PROPS"] = options.balloonProperties.joined(separator: ",")
        env["MODERN_ONLY"] = options.modernOnly ? "1" : "0"
        env["BALLOON"] = options.balloon ? "1" : "0"
        env["CONSOLE"] = "file"
        env["QEMU_EXTRA"] = ""
        env["PARENT_PID"] = String(getpid())
        env.removeValue(forKey: "QEMU")  // QEMU_VERSION picks the binary
        for (key, value) in platform.scriptEnvironment { env[key] = value }
        let p: ChildProcess
        do {
            p = try ChildProcess(executable: HarnessPaths.runGuest.path, arguments: options.extraQEMUArgs,
                                 environment: env, outputPath: runDirectory.appendingPathComponent("qemu.log").path)
        } catch let error as HarnessError {
            throw fail(error, consoleTail: false)
        }
        launched = p
        let started = Date()

        // Wait for the ready marker on the console.
        let consoleURL = runDirectory.appendingPathComponent("console.log")
        var kernelVersion = "?"
        let deadline = started.addingTimeInterval(options.bootTimeout)
        while true {
            if let data = try? Data(contentsOf: consoleURL) {
                let text = String(decoding: data, as: UTF8.self)
                // The console writes CRLF; "\r\n" is a single Character, so split on isNewline.
                if let line = text.split(whereSeparator: \.isNewline).first(where: { $0.hasPrefix(readyMarker) }) {
                    if let k = line.split(separator: " ").first(where: { $0.hasPrefix("kernel=") }) {
                        kernelVersion = String(k.dropFirst("kernel=".count))
                    }
                    break
                }
                if text.contains("Kernel panic") {
                    throw fail(HarnessError(.setup, "the guest kernel panicked during boot"), consoleTail: true)
                }
            }
            if !p.isRunning {
                throw fail(HarnessError(.setup, "QEMU exited (status \(p.exitStatus ?? -1)) before the guest was ready"), consoleTail: true)
            }
            if Date() >= deadline {
                throw fail(HarnessError(.timeout, "the guest did not print \(readyMarker) within \(Int(options.bootTimeout)) s (TCG is slow; raise BALLOOND_BOOT_TIMEOUT if the machine is loaded)"), consoleTail: true)
            }
            usleep(100_000)
        }
        let bootSeconds = Date().timeIntervalSince(started)

        // Connect QMP and the command channel, then check the agent answers.
        let qmp: QMPClient
        let agent: GuestAgent
        do {
            qmp = try QMPClient(socketPath: runDirectory.appendingPathComponent("qmp.sock").path)
            agent = try GuestAgent(socketPath: runDirectory.appendingPathComponent("agent.sock").path)
            let hello = try agent.run("echo balloond-agent-ok", timeout: 20)
            guard hello.rc == 0, hello.text.contains("balloond-agent-ok") else {
                throw HarnessError(.protocolViolation, "the guest agent answered the handshake with rc=\(hello.rc): \(hello.text)")
            }
        } catch let error as HarnessError {
            throw fail(error, consoleTail: true)
        }
        return GuestVM(options: options, runDirectory: runDirectory, process: p, qmp: qmp, agent: agent,
                       kernelVersion: kernelVersion, bootSeconds: bootSeconds)
    }

    /// Boots a guest, runs `body`, and shuts the guest down whatever happens. Harness errors
    /// thrown by `body` are annotated with the run directory; other errors (e.g. from
    /// `#require`) are rethrown as they are, with the run directory printed to stderr.
    static func with<T>(_ options: Options = Options(), _ body: (GuestVM) throws -> T) throws -> T {
        let vm = try boot(options)
        defer { vm.shutdown() }
        do {
            return try body(vm)
        } catch let error as HarnessError {
            throw vm.annotate(error)
        } catch {
            vm.recordFailure("\(error)")
            FileHandle.standardError.write(Data("GuestVM: test failed; run directory kept: \(vm.runDirectory.path)\n".utf8))
            throw error
        }
    }

    // MARK: Commands

    /// Runs `command` in the guest with `sh` and returns its output (stdout and stderr
    /// together) and exit status. The guest kills it after `timeout` seconds, which throws.
    /// Output travels over an emulated serial line (~80 KiB/s): keep it small, or write big
    /// things to a file in the guest and grep there.
    func run(_ command: String, timeout: TimeInterval = 60) throws -> (output: String, rc: Int32) {
        let result = try runRaw(command, timeout: timeout)
        return (result.text, result.rc)
    }

    /// `run`, returning the output as bytes, with the elapsed time.
    func runRaw(_ command: String, timeout: TimeInterval = 60) throws -> GuestAgent.Result {
        do {
            return try agent.run(command, timeout: timeout)
        } catch let error as HarnessError {
            throw annotate(error)
        }
    }

    /// Runs `command` and returns its output; throws `.commandFailed` (with the output) if
    /// its exit status is not 0.
    @discardableResult
    func check(_ command: String, timeout: TimeInterval = 60) throws -> String {
        let (output, rc) = try run(command, timeout: timeout)
        guard rc == 0 else {
            throw annotate(HarnessError(.commandFailed, "guest command failed with rc=\(rc): \(command)\n\(tail(output))"))
        }
        return output
    }

    // MARK: Background processes

    /// A program started with `spawn`. Its files live in `directory` in the guest.
    struct GuestProcess: CustomStringConvertible {
        let name: String
        let pid: Int32
        let directory: String
        var logPath: String { directory + "/log" }
        var description: String { "\(name) (pid \(pid))" }
    }

    /// Starts `argv` in the background in the guest (new session, stdin /dev/null, output to
    /// /run/bg/<name>/log, default signal dispositions) and returns its pid, which is the
    /// program's own. Use `["sh", "-c", script]` for a pipeline.
    func spawn(_ argv: [String], name: String) throws -> GuestProcess {
        guard !argv.isEmpty else { throw HarnessError(.commandFailed, "spawn: empty argv") }
        guard !name.isEmpty, name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }) else {
            throw HarnessError(.commandFailed, "spawn: name must be [A-Za-z0-9._-]+, got '\(name)'")
        }
        let directory = "/run/bg/\(name)"
        let out = try check("bg-run \(directory) " + argv.map(shellQuote).joined(separator: " "), timeout: 30)
        guard let pid = Int32(out.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw annotate(HarnessError(.protocolViolation, "spawn \(name): bg-run printed no pid: \(out)"))
        }
        return GuestProcess(name: name, pid: pid, directory: directory)
    }

    /// Sends a signal ("TERM", "KILL", "INT", "USR1", ...) to a process in the guest.
    func signal(_ process: GuestProcess, _ signal: String = "TERM") throws {
        try check("kill -\(shellQuote(signal)) \(process.pid)", timeout: 10)
    }

    /// The exit status of a spawned process (128+N if killed by signal N), or nil while it
    /// is still running.
    func exitStatus(of process: GuestProcess) throws -> Int32? {
        let (out, rc) = try run("cat \(process.directory)/rc 2>/dev/null", timeout: 10)
        guard rc == 0 else { return nil }
        return Int32(out.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Waits (in the guest, one round trip) until a spawned process exits; returns its exit
    /// status. Throws `.timeout` if it is still running after `timeout` seconds.
    @discardableResult
    func waitForExit(_ process: GuestProcess, timeout: TimeInterval) throws -> Int32 {
        let ticks = max(1, Int(timeout * 10))
        let script = "i=0; while [ ! -e \(process.directory)/rc ]; do i=$((i+1)); [ $i -gt \(ticks) ] && exit 124; usleep 100000; done; cat \(process.directory)/rc"
        let (out, rc) = try run(script, timeout: timeout + 10)
        if rc == 124 {
            throw annotate(HarnessError(.timeout, "\(process) still running after \(Int(timeout)) s; its log:\n\(tail((try? self.output(of: process)) ?? "?"))"))
        }
        guard rc == 0, let status = Int32(out.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw annotate(HarnessError(.protocolViolation, "waitForExit \(process): unexpected answer rc=\(rc): \(out)"))
        }
        return status
    }

    /// The output (stdout+stderr) a spawned process has written so far.
    func output(of process: GuestProcess) throws -> String {
        try check("cat \(process.logPath)", timeout: 30)
    }

    // MARK: Guest facts

    struct PCIDevice: CustomStringConvertible {
        /// e.g. "0000:00:01.0"
        let address: String
        let vendor: UInt16
        let device: UInt16
        let classCode: UInt32
        let revision: UInt8
        /// Bound driver, nil if none.
        let driver: String?
        var description: String {
            String(format: "%@ %04x:%04x rev %02x class %06x driver %@", address, vendor, device, revision, classCode, driver ?? "-")
        }
    }

    /// The guest's PCI functions, from sysfs.
    func pciDevices() throws -> [PCIDevice] {
        let out = try check("""
            for d in /sys/bus/pci/devices/*; do
              drv=-; [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
              echo "${d##*/} $(cat "$d/vendor") $(cat "$d/device") $(cat "$d/class") $(cat "$d/revision") $drv"
            done
            """, timeout: 30)
        func hex<T: FixedWidthInteger>(_ s: Substring) -> T? { T(s.hasPrefix("0x") ? s.dropFirst(2) : s, radix: 16) }
        return try out.split(separator: "\n").map { line in
            let f = line.split(separator: " ")
            guard f.count == 6, let vendor: UInt16 = hex(f[1]), let device: UInt16 = hex(f[2]),
                  let cls: UInt32 = hex(f[3]), let rev: UInt8 = hex(f[4]) else {
                throw annotate(HarnessError(.protocolViolation, "cannot parse PCI device line: \(line)"))
            }
            return PCIDevice(address: String(f[0]), vendor: vendor, device: device, classCode: cls,
                             revision: rev, driver: f[5] == "-" ? nil : String(f[5]))
        }
    }

    /// The console log (ttyS0) so far.
    func consoleLog() -> String {
        (try? String(contentsOf: URL(fileURLWithPath: consoleLogPath), encoding: .utf8)) ?? ""
    }

    /// Whether QEMU is still running.
    var isRunning: Bool { process.isRunning }

    // MARK: Shutdown

    /// Stops the guest: QMP `quit`, then SIGTERM to run-guest.sh (which stops QEMU), then
    /// SIGKILL. Idempotent; also called by deinit.
    func shutdown() {
        guard !isShutDown else { return }
        isShutDown = true
        agent.close()
        if process.isRunning {
            _ = try? qmp.execute("quit", timeout: 5)
        }
        qmp.close()
        GuestVM.stop(process, runDirectory: runDirectory)
        HarnessState.shared.slots.signal()
    }

    /// Waits `graceSeconds` for QEMU to exit by itself (after QMP quit), then escalates.
    private static func stop(_ p: ChildProcess, runDirectory: URL, graceSeconds: Double = 10) {
        if p.wait(timeout: graceSeconds) { return }
        p.signal(SIGTERM)  // run-guest.sh forwards it to QEMU and SIGKILLs QEMU after 10 s
        if p.wait(timeout: 15) { return }
        if let text = try? String(contentsOf: runDirectory.appendingPathComponent("qemu.pid"), encoding: .utf8),
           let qpid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
            kill(qpid, SIGKILL)
        }
        p.signal(SIGKILL)
        _ = p.wait(timeout: 5)
    }

    // MARK: Errors

    /// Appends where the run directory is, and for lost guests the console tail.
    func annotate(_ error: HarnessError) -> HarnessError {
        var extra = "run directory kept: \(runDirectory.path) (console log: \(consoleLogPath))"
        if error.kind == .timeout || error.kind == .closed {
            extra += process.isRunning ? "\nQEMU is still running." : "\nQEMU has exited (status \(process.exitStatus ?? -1))."
            extra += "\n--- console.log (tail) ---\n" + tail(consoleLog(), lines: 25)
        }
        recordFailure(error.message)
        return error.adding(extra)
    }

    private func recordFailure(_ message: String) {
        let url = runDirectory.appendingPathComponent("FAILED")
        let previous = (try? String(contentsOf: url, encoding: .utf8)).map { $0 + "\n\n" } ?? ""
        try? (previous + message).write(to: url, atomically: true, encoding: .utf8)
    }

    private static func makeRunDirectory(name: String, index: Int) throws -> URL {
        var safe = String(name.map { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") ? $0 : "-" })
        while safe.contains("--") { safe = safe.replacingOccurrences(of: "--", with: "-") }
        safe = String(safe.trimmingCharacters(in: CharacterSet(charactersIn: "-")).prefix(32))
        if safe.isEmpty { safe = "vm" }
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        formatter.locale = Locale(identifier: "en_US_POSIX")
        let leaf = "\(safe)-\(formatter.string(from: Date()))-\(getpid())-\(index)"
        var url = HarnessPaths.runs.appendingPathComponent(leaf)
        // Unix socket paths are limited to 107 bytes; fall back to /tmp if the tree is deep.
        if url.appendingPathComponent("agent.sock").path.utf8.count > 107 {
            url = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("balloond-runs/\(leaf)")
        }
        do {
            try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        } catch {
            throw HarnessError(.setup, "cannot create run directory \(url.path): \(error)")
        }
        return url
    }
}
