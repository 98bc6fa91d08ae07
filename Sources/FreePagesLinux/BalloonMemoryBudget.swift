import FreePages
import Logging
import PlatformLinux

/// How much more memory the balloon may take now (pure): the least of
/// - MemAvailable − margin. Not MemFree: like the in-kernel driver, inflating may make the
///   kernel reclaim page cache (and compact, for a 2 MiB page); MemAvailable says how much
///   it can give without swapping;
/// - `maxHeldBytes − heldBytes` (every balloon backend together);
///
/// and zero when PSI says tasks are stalling on memory (`some avg10`, or stall time since
/// this `take` began). Memory already held is not counted again: it has left MemAvailable.
public func balloonMemoryAllowance(limits: OwnedMemoryLimits, now: MemorySnapshot, pressureAtStart: MemoryPressure?,
                                   heldBytes: UInt64) -> MemoryAllowance {
    if let p = now.pressure {
        if p.some.avg10 >= limits.maxPressureSomeAvg10 {
            return MemoryAllowance(bytes: 0, limitedBy: "memory pressure: PSI some avg10=\(p.some.avg10)% ≥ \(limits.maxPressureSomeAvg10)%")
        }
        if let start = pressureAtStart, p.some.totalMicroseconds >= start.some.totalMicroseconds {
            let stalled = p.some.totalMicroseconds - start.some.totalMicroseconds
            if stalled >= limits.maxStallMicrosecondsPerRound {
                return MemoryAllowance(bytes: 0, limitedBy: "memory pressure: tasks stalled \(stalled / 1000) ms on memory while the balloon was taking memory (limit \(limits.maxStallMicrosecondsPerRound / 1000) ms)")
            }
        }
    }
    let margin = limits.margin(memTotal: now.memTotal)
    let available = now.memAvailable > margin ? now.memAvailable - margin : 0
    var best = MemoryAllowance(bytes: available, limitedBy: "MemAvailable \(now.memAvailable >> 20) MiB − margin \(margin >> 20) MiB")
    if let cap = limits.maxHeldBytes {
        let left = cap > heldBytes ? cap - heldBytes : 0
        if left < best.bytes { best = MemoryAllowance(bytes: left, limitedBy: "the cap of \(cap >> 20) MiB held") }
    }
    return best
}

/// What every balloon backend of one balloond shares: the limits, the bytes held by all of
/// them together (for the cap), and `oom_score_adj`.
///
/// `oom_score_adj` is raised to 1000 (by default) before memory is taken and restored once
/// no backend holds any. Why: if the guest runs out of memory anyway, the OOM killer then
/// picks balloond, and killing it gives all balloon memory back at once (hugetlb surplus
/// pages go straight back to the buddy allocator, locked anonymous memory is freed), which
/// is what the guest needs, rather than killing a workload. The raise is per process
/// (`OOMScoreAdjustment` counts every holder, the hint sources' too).
public final class BalloonMemoryBudget {
    public let root: SysRoot
    public let limits: OwnedMemoryLimits
    /// Bytes held by every backend using this budget.
    public private(set) var heldBytes: UInt64 = 0
    private let oom: OOMScoreAdjustment?
    private let logger: Logger

    /// - Parameter oomScoreAdj: the value while memory is held (nil: leave it alone).
    public init(root: SysRoot = .host, limits: OwnedMemoryLimits = OwnedMemoryLimits(), oomScoreAdj: Int? = 1000,
                logger: Logger = Logger(label: "balloond.balloon")) {
        self.root = root
        self.limits = limits
        oom = oomScoreAdj.map { OOMScoreAdjustment(root: root, raisedValue: $0) }
        self.logger = logger
    }

    /// Whether `oom_score_adj` is raised by this budget now.
    public var oomScoreRaised: Bool { oom?.isRaised ?? false }

    func snapshot() throws(BalloonMemoryError) -> MemorySnapshot {
        do { return try MemorySnapshot.read(root: root, withBuddyInfo: false) } catch {
            throw BalloonMemoryError("cannot read the guest's memory state: \(error)")
        }
    }

    func allowance(now: MemorySnapshot, pressureAtStart: MemoryPressure?) -> MemoryAllowance {
        balloonMemoryAllowance(limits: limits, now: now, pressureAtStart: pressureAtStart, heldBytes: heldBytes)
    }

    /// Before mapping anything: raise the OOM score first, so that an OOM while populating
    /// already picks balloond.
    func beginTaking() {
        if let oom, let problem = oom.raise() { logger.warning("\(problem)") }
    }

    /// After a `take`: restore the OOM score if it took nothing and nothing else is held.
    func endTaking() { restoreIfIdle() }

    func took(_ bytes: UInt64) { heldBytes += bytes }

    func released(_ bytes: UInt64) {
        heldBytes -= min(heldBytes, bytes)
        restoreIfIdle()
    }

    private func restoreIfIdle() {
        guard heldBytes == 0, let oom, oom.isRaised else { return }
        if let problem = oom.restore() { logger.warning("\(problem)") }
    }
}
