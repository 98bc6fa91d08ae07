import PlatformLinux
import Synchronization

/// Raises `/proc/self/oom_score_adj` while an owned source or the balloon holds memory, so
/// that under memory pressure the OOM killer picks balloond (freeing what it holds) rather
/// than a workload; restores the previous value when everything is released. Dies with the
/// process, so a crash needs no cleanup.
///
/// Several holders (the anonymous hint source, the balloon backends) each have one of these
/// for the same file. The raise is counted per file across all of them: the value is written
/// by the first `raise` and restored by the last `restore`, so one holder letting go does not
/// lower the score while another still holds memory.
package final class OOMScoreAdjustment {
    package let path: String
    package let raisedValue: Int
    private var holding = false

    private struct Holders {
        var count: Int
        var previous: Int
    }
    private static let holders = Mutex<[String: Holders]>([:])

    package init(root: SysRoot, raisedValue: Int = 1000) {
        path = root.path("/proc/self/oom_score_adj")
        self.raisedValue = raisedValue
    }

    deinit { _ = restore() }

    /// Whether this holder has raised it.
    package var isRaised: Bool { holding }

    /// Raises it (once per holder); returns an error text when the file cannot be written.
    package func raise() -> String? {
        guard !holding else { return nil }
        let path = path, raisedValue = raisedValue
        let problem: String? = Self.holders.withLock { table in
            if var h = table[path] {
                h.count += 1
                table[path] = h
                return nil
            }
            do {
                let old = Int(try Sys.readAttribute(path)) ?? 0
                if old < raisedValue { try Sys.writeAttribute(path, "\(raisedValue)\n") }
                table[path] = Holders(count: 1, previous: old)
                return nil
            } catch { return "cannot raise \(path) to \(raisedValue): \(error)" }
        }
        if problem == nil { holding = true }
        return problem
    }

    /// Lets go; the last holder restores the value from before the first `raise`.
    package func restore() -> String? {
        guard holding else { return nil }
        holding = false
        let path = path, raisedValue = raisedValue
        return Self.holders.withLock { table in
            guard var h = table[path] else { return nil }
            h.count -= 1
            if h.count > 0 {
                table[path] = h
                return nil
            }
            table[path] = nil
            do {
                if h.previous < raisedValue { try Sys.writeAttribute(path, "\(h.previous)\n") }
                return nil
            } catch { return "cannot restore \(path) to \(h.previous): \(error)" }
        }
    }
}
