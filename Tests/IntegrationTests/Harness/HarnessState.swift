// State shared by every GuestVM in the test process: the guest image build (once per
// kernel), old run directories pruned once, and the slots that bound concurrent VMs.

import Foundation
#if canImport(Glibc)
import Glibc
#endif

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
