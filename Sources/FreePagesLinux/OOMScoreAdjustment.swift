import PlatformLinux

/// Raises `/proc/self/oom_score_adj` while an owned source holds memory, so that under
/// memory pressure the OOM killer picks balloond (freeing what it holds) rather than a
/// workload; restores the previous value when everything is released. Dies with the
/// process, so a crash needs no cleanup.
final class OOMScoreAdjustment {
    let path: String
    let raisedValue: Int
    private var previous: Int?

    init(root: SysRoot, raisedValue: Int = 1000) {
        path = root.path("/proc/self/oom_score_adj")
        self.raisedValue = raisedValue
    }

    var isRaised: Bool { previous != nil }

    /// Raises it (once); returns an error text when the file cannot be written.
    func raise() -> String? {
        guard previous == nil else { return nil }
        do {
            let old = Int(try Sys.readAttribute(path)) ?? 0
            if old < raisedValue { try Sys.writeAttribute(path, "\(raisedValue)\n") }
            previous = old
            return nil
        } catch { return "cannot raise \(path) to \(raisedValue): \(error)" }
    }

    /// Restores the value from before `raise`.
    func restore() -> String? {
        guard let old = previous else { return nil }
        previous = nil
        do {
            if old < raisedValue { try Sys.writeAttribute(path, "\(old)\n") }
            return nil
        } catch { return "cannot restore \(path) to \(old): \(error)" }
    }
}
