// The balloon driver under test in a booted guest (balloond or the in-kernel virtio_balloon),
// with the QMP balloon commands and the guest's and host's memory numbers; used by the
// sizing, kill-trial and stats tests.

import Foundation
import Testing

private let mib: Int64 = 1 << 20

// MARK: - The driver under test

/// Which balloon driver a sizing test runs against.
enum SizingDriver: String, CustomStringConvertible {
    /// The in-kernel virtio_balloon driver, loaded at boot (balloond.modprobe=...).
    case kernel
    /// `bg-run /run/bg/balloond balloond run --log-level info` (virtio_pci loaded at boot,
    /// as on a normal guest; balloond takes the function over).
    case balloond

    var description: String { rawValue }

    /// The driver of the balloond test methods: balloond, or BALLOOND_SIZING_DRIVER.
    static var forBalloondTests: SizingDriver {
        let name = ProcessInfo.processInfo.environment["BALLOOND_SIZING_DRIVER"] ?? ""
        return SizingDriver(rawValue: name) ?? .balloond
    }

    var kernelArgs: [String] {
        switch self {
        case .kernel: ["balloond.modprobe=virtio_pci,virtio_balloon"]
        case .balloond: ["balloond.modprobe=virtio_pci"]
        }
    }
}

/// A booted guest with a balloon driver: the driver's lifecycle, the QMP balloon commands,
/// and the guest's and host's memory numbers.
final class BalloonUnderTest {
    let vm: GuestVM
    let driver: SizingDriver
    /// More arguments of `balloond run` (each start).
    var balloondArgs: [String] = []
    /// balloond's process, while it runs.
    private(set) var balloond: GuestVM.GuestProcess?
    /// QEMU's pid (RUN_DIR/qemu.pid).
    let qemuPID: Int32

    static let balloondDirectory = "/run/bg/balloond"

    init(_ vm: GuestVM, driver: SizingDriver) throws {
        self.vm = vm
        self.driver = driver
        let pidFile = vm.runDirectory.appendingPathComponent("qemu.pid")
        guard let text = try? String(contentsOf: pidFile, encoding: .utf8),
              let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw HarnessError(.setup, "cannot read QEMU's pid from \(pidFile.path)")
        }
        qemuPID = pid
    }

    /// Boots a 1 GiB guest for `driver`, starts the driver, runs `body`, then checks the
    /// guest kernel log (`checkKernelLog`) and that the driver is still alive. Harness
    /// errors thrown in here get the run directory from `GuestVM.with`.
    static func with(_ driver: SizingDriver, name: String, balloonProperties: [String] = [], balloondArgs: [String] = [],
                     _ body: (BalloonUnderTest) throws -> Void) throws {
        try GuestVM.with(.init(name: "\(name)-\(driver)", memory: "1G", kernelArgs: driver.kernelArgs,
                               balloonProperties: balloonProperties)) { vm in
            let b = try BalloonUnderTest(vm, driver: driver)
            b.balloondArgs = balloondArgs
            try b.start()
            try body(b)
            try b.checkKernelLog()
            try b.expectDriverAlive()
        }
    }

    // MARK: Driver lifecycle

    /// Starts the driver (or checks that the boot-time one is there) and waits until the
    /// device is DRIVER_OK.
    func start() throws {
        switch driver {
        case .kernel:
            try vm.check("grep -q '^virtio_balloon ' /proc/modules || modprobe virtio_balloon", timeout: 60)
            try waitFor(60, "the in-kernel virtio_balloon driver reaches DRIVER_OK") { try VirtioStatus(vm).driverOK }
        case .balloond:
            let p = try vm.spawn(["balloond", "run", "--log-level", "info"] + balloondArgs, name: "balloond")
            balloond = p
            try waitFor(90, "balloond reaches DRIVER_OK") {
                if let rc = try vm.exitStatus(of: p) {
                    throw HarnessError(.commandFailed, "balloond exited with \(rc) before DRIVER_OK:\n\(tail(try vm.output(of: p)))")
                }
                return try vm.run("balloond status").output.contains("DRIVER_OK")
            }
        }
    }

    /// Stops the driver the hard way: balloond gets SIGKILL (`kill -9 $(cat
    /// /run/bg/balloond/pid)`); the in-kernel driver is unloaded (rmmod deflates it fully).
    func kill() throws {
        switch driver {
        case .kernel:
            try vm.check("rmmod virtio_balloon", timeout: 120)
        case .balloond:
            try vm.check("kill -9 $(cat \(Self.balloondDirectory)/pid)", timeout: 10)
            if let p = balloond {
                let rc = try vm.waitForExit(p, timeout: 30)
                #expect(rc == 137, "balloond after SIGKILL: exit status \(rc)")
            }
            balloond = nil
        }
    }

    /// balloond's user + system CPU time, in clock ticks (100 per second), spent over the next
    /// `seconds` of wall time (from /proc/<pid>/stat fields 14 and 15).
    func balloondCPUTicks(over seconds: Double) throws -> Int {
        func ticks() throws -> Int {
            let stat = try vm.check("cat /proc/$(cat \(Self.balloondDirectory)/pid)/stat")
            // The command name (field 2) is in parentheses and may hold spaces: split after it.
            guard let close = stat.lastIndex(of: ")") else { throw HarnessError(.commandFailed, "unreadable /proc/pid/stat: \(stat)") }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            // fields[0] is field 3 (state): utime is field 14, stime field 15.
            guard fields.count > 13, let user = Int(fields[11]), let system = Int(fields[12]) else {
                throw HarnessError(.commandFailed, "unreadable /proc/pid/stat: \(stat)")
            }
            return user + system
        }
        let before = try ticks()
        Thread.sleep(forTimeInterval: seconds)
        return try ticks() - before
    }

    /// balloond must still be running (a crash during a test is a failure of its own).
    func expectDriverAlive() throws {
        guard driver == .balloond, let p = balloond else { return }
        if let rc = try vm.exitStatus(of: p) {
            Issue.record("balloond exited with \(rc) during the test:\n\(diagnostics())")
        }
    }

    /// What the driver said: balloond's log tail, or the kernel's balloon lines.
    func diagnostics() -> String {
        let command: String
        switch driver {
        case .kernel: command = "dmesg | grep -i -E 'balloon|virtio' | tail -20"
        case .balloond: command = "tail -c 3000 \(Self.balloondDirectory)/log"
        }
        return (try? vm.run(command, timeout: 30).output) ?? "(guest did not answer)"
    }

    // MARK: QMP balloon

    /// QMP `balloon value=<bytes>`: the guest should be left with `bytes` of RAM.
    func setTarget(_ bytes: Int64) throws {
        _ = try vm.qmp.execute("balloon", arguments: ["value": bytes])
    }

    /// `query-balloon` actual: bytes of RAM the guest has (RAM minus the balloon).
    func actual() throws -> Int64 {
        let info = try vm.qmp.executeObject("query-balloon")
        guard let actual = (info["actual"] as? NSNumber)?.int64Value else {
            throw HarnessError(.protocolViolation, "query-balloon without actual: \(info)")
        }
        return actual
    }

    /// Polls `query-balloon` (every 100 ms) until `condition(actual)` holds; returns the
    /// seconds it took. Throws `.timeout` with the driver's diagnostics otherwise.
    @discardableResult
    func waitForActual(_ timeout: TimeInterval, _ what: String, _ condition: (Int64) -> Bool) throws -> Double {
        let started = Date()
        let deadline = started.addingTimeInterval(timeout)
        var last: Int64 = -1
        while Date() < deadline {
            last = try actual()
            if condition(last) { return Date().timeIntervalSince(started) }
            usleep(100_000)
        }
        throw HarnessError(.timeout, """
            \(driver): query-balloon actual did not reach \(what) within \(Int(timeout)) s \
            (last actual \(last / mib) MiB); driver diagnostics:
            \(diagnostics())
            """)
    }

    // MARK: Memory numbers

    /// A /proc/meminfo field of the guest, in MiB.
    func meminfo(_ field: String) throws -> Int64 {
        let out = try vm.check("cat /proc/meminfo", timeout: 30)
        for line in out.split(separator: "\n") where line.hasPrefix(field + ":") {
            let parts = line.split(separator: " ", omittingEmptySubsequences: true)
            if parts.count >= 2, let kib = Int64(parts[1]) { return kib / 1024 }
        }
        throw HarnessError(.protocolViolation, "no \(field) in the guest's /proc/meminfo:\n\(out)")
    }

    func memAvailable() throws -> Int64 { try meminfo("MemAvailable") }

    /// QEMU's resident set on the host (VmRSS of /proc/<qemu pid>/status), in MiB.
    func qemuRSS() throws -> Int64 {
        let path = "/proc/\(qemuPID)/status"
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw HarnessError(.closed, "cannot read \(path): QEMU has exited?")
        }
        for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            if let kib = line.split(separator: " ").compactMap({ Int64($0) }).first { return kib / 1024 }
        }
        throw HarnessError(.protocolViolation, "no VmRSS in \(path)")
    }

    /// QEMU's RSS once it has settled: sampled every second until four samples in a row lie
    /// within `band` MiB of each other (or `timeout` passes: then the last sample).
    func stableQEMURSS(timeout: TimeInterval = 60, band: Int64 = 2) throws -> Int64 {
        let deadline = Date().addingTimeInterval(timeout)
        var samples: [Int64] = [try qemuRSS()]
        while Date() < deadline {
            Thread.sleep(forTimeInterval: 1)
            samples.append(try qemuRSS())
            let window = samples.suffix(4)
            if window.count == 4, let lo = window.min(), let hi = window.max(), hi - lo <= band {
                return samples.last!
            }
        }
        return samples.last!
    }

    // MARK: Guest programs

    /// Runs `memhog <args> <mibs>` in the foreground and checks it ends with
    /// "memhog: ok <mibs> MiB".
    func memhog(_ mibs: Int, _ arguments: [String] = [], timeout: TimeInterval = 600) throws {
        let (out, rc) = try vm.run((["memhog"] + arguments + ["\(mibs)"]).joined(separator: " "), timeout: timeout)
        guard rc == 0, out.contains("memhog: ok \(mibs) MiB") else {
            throw HarnessError(.commandFailed, "memhog \(mibs) failed (rc \(rc)):\n\(tail(out))\nkernel log:\n\(kernelLogTail())")
        }
    }

    /// Starts `memhog -H hold <mibs>` in the background and waits until it holds all of
    /// its memory (its "holding" line).
    func spawnHoldingMemhog(_ mibs: Int, hold: Int, name: String = "memhog", timeout: TimeInterval = 600) throws -> GuestVM.GuestProcess {
        let p = try vm.spawn(["memhog", "-H", "\(hold)", "\(mibs)"], name: name)
        try waitFor(timeout, "memhog \(mibs) holds its memory") {
            if let rc = try vm.exitStatus(of: p) {
                throw HarnessError(.commandFailed, "memhog \(mibs) exited with \(rc) before holding:\n\(tail(try vm.output(of: p)))\nkernel log:\n\(kernelLogTail())")
            }
            return try vm.run("grep -q 'memhog: holding' \(p.logPath)").rc == 0
        }
        return p
    }

    /// Waits for a spawned memhog to finish and checks its "ok" line.
    func expectMemhogOK(_ p: GuestVM.GuestProcess, mibs: Int, timeout: TimeInterval = 300) throws {
        let rc = try vm.waitForExit(p, timeout: timeout)
        let out = try vm.output(of: p)
        #expect(rc == 0 && out.contains("memhog: ok \(mibs) MiB"), "memhog \(mibs): rc \(rc)\n\(tail(out))")
    }

    // MARK: Kernel log

    /// Lines of the guest's dmesg matching the extended regex `pattern`.
    func kernelLogLines(matching pattern: String) throws -> [String] {
        let (out, rc) = try vm.run("dmesg | grep -E \(shellQuote(pattern))", timeout: 30)
        guard rc == 0 else { return [] }  // grep: 1 = no match
        return out.split(separator: "\n").map(String.init)
    }

    func kernelLogTail() -> String {
        (try? vm.run("dmesg | tail -25", timeout: 30).output) ?? "(guest did not answer)"
    }

    /// No BUG, Oops, soft lockup or RCU stall in the guest's dmesg or on its console.
    func checkKernelLog() throws {
        let pattern = "BUG[: ]|Oops|soft lockup|rcu.*stall"
        let bad = try kernelLogLines(matching: pattern)
        #expect(bad.isEmpty, "guest kernel log (\(driver)):\n\(bad.prefix(10).joined(separator: "\n"))")
        let regex = try NSRegularExpression(pattern: pattern)
        let console = vm.consoleLog().split(whereSeparator: \.isNewline).filter { line in
            let s = String(line)
            return regex.firstMatch(in: s, range: NSRange(s.startIndex..., in: s)) != nil
        }
        #expect(console.isEmpty, "guest console (\(driver)):\n\(console.prefix(10).joined(separator: "\n"))")
    }

    // MARK: Stats

    /// `qom-get /machine/peripheral/balloon0 guest-stats`: last-update and the stats.
    func guestStats() throws -> (lastUpdate: Int64, stats: [String: UInt64]) {
        let gs = try vm.qmp.executeObject("qom-get", arguments: ["path": "/machine/peripheral/balloon0", "property": "guest-stats"])
        let last = (gs["last-update"] as? NSNumber)?.int64Value ?? 0
        var stats: [String: UInt64] = [:]
        for (key, value) in (gs["stats"] as? [String: Any]) ?? [:] {
            if let n = value as? NSNumber { stats[key] = n.uint64Value }
        }
        return (last, stats)
    }

    /// Waits for a guest-stats update whose last-update (host wall-clock seconds) is at
    /// least `after`; returns its stats.
    func guestStats(updatedAfter after: Int64, timeout: TimeInterval = 30) throws -> [String: UInt64] {
        var result: [String: UInt64] = [:]
        try waitFor(timeout, "a guest-stats update after \(after)") {
            let (last, stats) = try guestStats()
            result = stats
            return last >= after
        }
        return result
    }

    // MARK: Polling

    /// Polls `condition` every 0.5 s until it holds (true) or `timeout` passes (false): for
    /// waits whose outcome the test then checks with `#expect` and a full message.
    func poll(_ timeout: TimeInterval, _ what: String, _ condition: () throws -> Bool) throws -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if try condition() { return true }
            if Date() >= deadline { return false }
            Thread.sleep(forTimeInterval: 0.5)
        }
    }

    /// Polls `condition` every 0.5 s until it holds; throws `.timeout` (with the driver's
    /// diagnostics) if `timeout` passes first.
    func waitFor(_ timeout: TimeInterval, _ what: String, _ condition: () throws -> Bool) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if try condition() { return }
            if Date() >= deadline { break }
            Thread.sleep(forTimeInterval: 0.5)
        }
        throw HarnessError(.timeout, "\(driver): timed out after \(Int(timeout)) s waiting for: \(what); driver diagnostics:\n\(diagnostics())")
    }
}

/// The ten stats of a 6.1 guest (docs/virtio-balloon.md §5), by QOM key.
let allGuestStatKeys = ["stat-swap-in", "stat-swap-out", "stat-major-faults", "stat-minor-faults", "stat-free-memory",
                        "stat-total-memory", "stat-available-memory", "stat-disk-caches", "stat-htlb-pgalloc", "stat-htlb-pgfail"]
/// The six stats Linux 6.12 added (tags 10–15, docs/virtio-balloon.md §11), by QOM key: QEMU ≥ 9.2
/// shows them, QEMU 7.2 ignores the tags.
let linux612GuestStatKeys = ["stat-oom-kills", "stat-alloc-stalls", "stat-async-scans", "stat-direct-scans",
                             "stat-async-reclaims", "stat-direct-reclaims"]
