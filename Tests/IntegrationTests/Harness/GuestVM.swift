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
        /// A virtual Intel IOMMU with interrupt remapping (run-guest.sh VIOMMU=1), the guest
        /// booted with intel_iommu=on: what balloond's vfio backend needs.
        var viommu: Bool
        /// With `viommu`: the balloon gets iommu_platform=on (ACCESS_PLATFORM; needs
        /// `modernOnly`), so QEMU translates every address it uses through the vIOMMU.
        var iommuPlatform: Bool
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
             balloon: Bool = true, viommu: Bool = false, iommuPlatform: Bool = false, extraQEMUArgs: [String] = [],
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
            self.viommu = viommu
            self.iommuPlatform = iommuPlatform
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

    /// The command channel and the run-guest.sh process (used by the extensions in
    /// GuestVM+Commands.swift and GuestVM+BackgroundProcesses.swift).
    let agent: GuestAgent
    let process: ChildProcess
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
        env["VIOMMU"] = options.viommu ? "1" : "0"
        env["VIOMMU_PLATFORM"] = options.iommuPlatform ? "1" : "0"
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
