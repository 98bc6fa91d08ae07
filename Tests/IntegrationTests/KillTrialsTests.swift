// Issue 9 H2: `kill -9` of balloond at random moments while it inflates, holds blocks for
// free page reporting, or holds owned hint memory during a (never-finishing) migration, in
// one 1 GiB TCG guest reused for every trial. After each kill the freed memory is reused by
// a checksummed memhog (and one memhog holds its memory across the kill); the guest kernel
// log must stay clean. balloond's device memory lives in memfds that its guardian process
// holds until it has reset the device, so no trial may lose a byte.
//
// Trials: BALLOOND_KILL_TRIALS (default 30), a third of each kind. The hint trials migrate
// to `exec:cat > /dev/null` at 1 MiB/s (no destination VM: the migration only has to run
// long enough for a hint round), then migrate_cancel after the kill.

import Foundation
import Testing

private let mib: Int64 = 1 << 20

@Suite("SIGKILL never hands the kernel memory the device may still touch (issue 9 H2)", .serialized)
struct KillTrialsTests {
    enum Kind: String, CaseIterable { case inflate, report, hint }

    /// balloon held + reported + hint-held MiB from `balloond status`.
    static func heldMiB(_ status: String) -> Int {
        var total = 0
        for pattern in ["held ([0-9]+) MiB from", "holding ([0-9]+) MiB reported", "holding ([0-9]+) MiB$"] {
            guard let re = try? NSRegularExpression(pattern: pattern, options: [.anchorsMatchLines]) else { continue }
            for m in re.matches(in: status, range: NSRange(status.startIndex..., in: status)) {
                if let r = Range(m.range(at: 1), in: status), let n = Int(status[r]) { total += n }
            }
        }
        return total
    }

    @Test("kill -9 at random moments during inflate, free page reporting and hint rounds: zero memhog checksum failures, clean guest kernel log")
    func killTrials() throws {
        let trials = Int(environmentNumber("BALLOOND_KILL_TRIALS") ?? 30)
        var rng = SystemRandomNumberGenerator()
        var failures: [String] = []
        var counts: [Kind: Int] = [:]
        var guardianStops = 0
        var heldAtKill: [Kind: Int] = [:]
        var heldMiB: [String] = []
        let started = Date()
        try BalloonUnderTest.with(.balloond, name: "kill-trials", balloonProperties: ["free-page-reporting=on"]) { b in
            let vm = b.vm
            try b.kill()  // the harness's own balloond; each trial starts its own
            try b.setTarget(1 << 30)
            let hugepagesBefore = try vm.check("cat /proc/sys/vm/nr_hugepages").trimmingCharacters(in: .whitespacesAndNewlines)
            for trial in 0..<trials {
                let kind = Kind.allCases[trial % Kind.allCases.count]
                counts[kind, default: 0] += 1
                let p = try vm.spawn(["balloond", "run", "--log-level", "info", "--hint-source", "anonymous",
                                      "--report-keep-free-mib", "96", "--report-release-below-mib", "48"], name: "balloond")
                try b.waitFor(120, "balloond reaches DRIVER_OK (trial \(trial))") {
                    if let rc = try vm.exitStatus(of: p) {
                        throw HarnessError(.commandFailed, "balloond exited with \(rc) before DRIVER_OK:\n\(tail(try vm.output(of: p)))")
                    }
                    return try vm.run("balloond status").output.contains("DRIVER_OK")
                }
                // A memhog that holds its pages across the kill and verifies them after it.
                let holder = try b.spawnHoldingMemhog(64, hold: 8, name: "holder")
                switch kind {
                case .inflate:
                    try b.setTarget(Int64.random(in: 480...800, using: &rng) * mib)
                    Thread.sleep(forTimeInterval: Double.random(in: 0.2...3.0, using: &rng))
                case .report:
                    // Dirty and free memory so reporting takes and reports blocks.
                    _ = try vm.run("memhog -q 256", timeout: 120)
                    Thread.sleep(forTimeInterval: Double.random(in: 0.0...3.0, using: &rng))
                case .hint:
                    _ = try vm.qmp.execute("migrate-set-parameters", arguments: ["max-bandwidth": 1 << 20])
                    _ = try vm.qmp.execute("migrate", arguments: ["uri": "exec:cat > /dev/null"])
                    Thread.sleep(forTimeInterval: Double.random(in: 0.5...4.0, using: &rng))
                }
                // What balloond holds (state published at most a few seconds ago): balloon,
                // reported and hint memory.
                let status = (try? vm.run("balloond status", timeout: 10).output) ?? ""
                try vm.check("kill -9 \(p.pid)", timeout: 10)
                let held = Self.heldMiB(status)
                if held > 0 { heldAtKill[kind, default: 0] += 1 }
                heldMiB.append("\(kind.rawValue.prefix(1))\(held)")
                let rc = try vm.waitForExit(p, timeout: 30)
                #expect(rc == 137, "trial \(trial): balloond after SIGKILL: exit status \(rc)")
                if kind == .hint {
                    _ = try? vm.qmp.execute("migrate_cancel")
                    try b.waitFor(60, "the migration is cancelled") {
                        let s = try vm.qmp.executeObject("query-migrate")["status"] as? String
                        return s != "active" && s != "setup" && s != "cancelling"
                    }
                }
                try b.setTarget(1 << 30)
                // Reuse whatever the kill freed, and check every byte.
                let mibs = Int.random(in: 192...320, using: &rng)
                let (out, hogRC) = try vm.run("memhog -q \(mibs)", timeout: 300)
                if hogRC != 0 || !out.contains("memhog: ok \(mibs) MiB") {
                    failures.append("trial \(trial) (\(kind)): memhog \(mibs) rc \(hogRC): \(tail(out, lines: 3))")
                }
                let holderRC = try vm.waitForExit(holder, timeout: 120)
                let holderOut = try vm.output(of: holder)
                if holderRC != 0 || !holderOut.contains("memhog: ok 64 MiB") {
                    failures.append("trial \(trial) (\(kind)): holding memhog rc \(holderRC): \(tail(holderOut, lines: 3))")
                }
                // The guardian must be gone before the next start (it stops the device first).
                try b.waitFor(30, "balloond's guardian exits (trial \(trial))") {
                    try vm.run("grep -l balloond-guardian /proc/[0-9]*/cmdline 2>/dev/null").output
                        .split(separator: "\n").filter { !$0.contains("/self/") }.isEmpty
                }
                let log = try vm.run("cat \(p.directory)/log").output
                if log.contains("the worker died without quiescing the device; stopped it") { guardianStops += 1 }
                if log.contains("could not be stopped") { failures.append("trial \(trial): the guardian could not stop the device:\n\(tail(log, lines: 5))") }
            }
            let bad = try b.kernelLogLines(matching: "BUG|Oops|corruption|Bad page|pagealloc|general protection")
            #expect(bad.isEmpty, "guest kernel log:\n\(bad.prefix(10).joined(separator: "\n"))")
            let hugepagesAfter = try vm.check("cat /proc/sys/vm/nr_hugepages").trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(hugepagesAfter == hugepagesBefore, "nr_hugepages \(hugepagesBefore) before the trials, \(hugepagesAfter) after")
        }
        print("kill-trials: \(trials) trials (\(counts.map { "\($0.key.rawValue) \($0.value)" }.sorted().joined(separator: ", "))), memory held at the kill in \(heldAtKill.map { "\($0.key.rawValue) \($0.value)" }.sorted().joined(separator: ", ")) (MiB per trial: \(heldMiB.joined(separator: " "))), guardian stopped the device after \(guardianStops) kills, \(failures.count) checksum failures, \(Int(Date().timeIntervalSince(started))) s")
        #expect(heldAtKill.values.reduce(0, +) > 0, "no trial killed balloond while it held memory: the trials proved nothing")
        #expect(failures.isEmpty, "\(failures.joined(separator: "\n"))")
    }
}
