import PlatformLinux
import Synchronization

/// What one balloond holds of the guest's memory, shared by its hint sources and its balloon
/// backends. `balloond run` builds one and passes it to both factories (as it does its one
/// `CompactionHold`), so that nothing about the other half has to be read back from a file
/// or a process-wide table:
/// - the OOM score: `/proc/self/oom_score_adj` is raised by the first holder of memory and
///   restored by the last (each holder has its own `OOMScoreAdjustment` on this object);
/// - the hugetlb pool: while the hugetlb hint source has grown the pool, the balloon takes
///   no surplus hugetlb pages, which could be faulted from pool pages it hinted.
public final class GuestMemoryHoldings: Sendable {
    /// Where `/proc/self/oom_score_adj` is (tests use a fake tree).
    public let root: SysRoot

    private struct State {
        var oomHolders = 0
        /// The value before the first raise, restored after the last.
        var oomPrevious = 0
        var hugeTLBPoolGrownByHintSource = false
    }
    private let state = Mutex(State())

    public init(root: SysRoot = .host) { self.root = root }

    var oomScorePath: String { root.path("/proc/self/oom_score_adj") }

    /// Whether this balloond's hugetlb hint source has grown the pool and not yet put it back.
    public var hugeTLBPoolGrownByHintSource: Bool { state.withLock { $0.hugeTLBPoolGrownByHintSource } }

    /// Whether any hugetlb hint source holds a grown pool: this balloond's (told directly), or
    /// another running balloond's in the same guest, whose pool state file names its live pid
    /// (the file is the only channel between processes; a dead writer's file is recovery's).
    public var hugeTLBPoolHeldForHints: Bool {
        if hugeTLBPoolGrownByHintSource { return true }
        let file = HugeTLBPoolStateFile(root: root)
        guard let contents = try? file.read() else { return false }
        return file.writerIsAlive(contents)
    }

    /// The hugetlb hint source says it grew the pool (before the first growth) or put it back.
    package func setHugeTLBPoolGrownByHintSource(_ grown: Bool) {
        state.withLock { $0.hugeTLBPoolGrownByHintSource = grown }
    }

    /// One more holder: the first raises the score to `value` (if it is lower). An error text
    /// when the file cannot be read or written (the holder is then not counted).
    func addOOMScoreHolder(raisingTo value: Int) -> String? {
        let path = oomScorePath
        return state.withLock { s in
            if s.oomHolders > 0 {
                s.oomHolders += 1
                return nil
            }
            do {
                let old = Int(try Sys.readAttribute(path)) ?? 0
                if old < value { try Sys.writeAttribute(path, "\(value)\n") }
                s.oomPrevious = old
                s.oomHolders = 1
                return nil
            } catch { return "cannot raise \(path) to \(value): \(error)" }
        }
    }

    /// One holder fewer: the last puts back the value from before the first raise.
    func removeOOMScoreHolder(raisedTo value: Int) -> String? {
        let path = oomScorePath
        return state.withLock { s in
            guard s.oomHolders > 0 else { return nil }
            s.oomHolders -= 1
            guard s.oomHolders == 0 else { return nil }
            do {
                if s.oomPrevious < value { try Sys.writeAttribute(path, "\(s.oomPrevious)\n") }
                return nil
            } catch { return "cannot restore \(path) to \(s.oomPrevious): \(error)" }
        }
    }
}
