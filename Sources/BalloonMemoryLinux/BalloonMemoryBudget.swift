import GuestMemoryLinux
import BalloonBlocks
import Logging
import PlatformLinux

/// What every balloon backend of one balloond shares: the limits, the bytes held by all of
/// them together (for the cap), and `oom_score_adj`.
///
/// `oom_score_adj` is raised to 1000 (by default) before memory is taken and restored once
/// no backend holds any. Why: if the guest runs out of memory anyway, the OOM killer then
/// picks balloond, and killing it gives all balloon memory back at once (hugetlb surplus
/// pages go straight back to the buddy allocator, locked anonymous memory is freed), which
/// is what the guest needs, rather than killing a workload. The raise is counted on the one
/// `GuestMemoryHoldings` of this balloond (every holder, the hint sources' too).
public final class BalloonMemoryBudget {
    public let root: SysRoot
    public let limits: OwnedMemoryLimits
    /// Bytes held by every backend using this budget.
    public private(set) var heldBytes: UInt64 = 0
    /// balloond's one record of what it holds (shared with the hint sources).
    public let holdings: GuestMemoryHoldings
    private let oom: OOMScoreAdjustment?
    private let logger: Logger

    /// - Parameters:
    ///   - oomScoreAdj: the value while memory is held (nil: leave it alone).
    ///   - holdings: balloond's one `GuestMemoryHoldings` (nil: a private one).
    public init(root: SysRoot = .host, limits: OwnedMemoryLimits = OwnedMemoryLimits(), oomScoreAdj: Int? = 1000,
                holdings: GuestMemoryHoldings? = nil, logger: Logger = Logger(label: "balloond.balloon")) {
        self.root = root
        self.limits = limits
        let holdings = holdings ?? GuestMemoryHoldings(root: root)
        self.holdings = holdings
        oom = oomScoreAdj.map { OOMScoreAdjustment(holdings: holdings, raisedValue: $0) }
        self.logger = logger
    }

    /// Whether `oom_score_adj` is raised by this budget now.
    public var oomScoreRaised: Bool { oom?.isRaised ?? false }

    func snapshot() throws(LinuxBalloonMemoryError) -> MemorySnapshot {
        do { return try MemorySnapshot.read(root: root, withBuddyInfo: false) } catch {
            throw .cannotReadMemoryState(error)
        }
    }

    func allowance(now: MemorySnapshot, pressureAtStart: MemoryPressure?) -> MemoryAllowance {
        memoryAllowance(.availableMemory, limits: limits, now: now, pressureAtStart: pressureAtStart, heldBytes: heldBytes)
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

/// Puts back a sysctl a balloon backend of a balloond that was killed had changed, if it left
/// a state file (the backends' `recoverAfterCrash`).
func recoverBalloonSysctl(root: SysRoot, stateFile: SysctlStateFile, logger: Logger) throws(BalloonMemoryError) -> SysctlRecovery {
    do { return try SysctlOverride.recoverAfterCrash(root: root, stateFile: stateFile, logger: logger) } catch {
        throw .failed(error)
    }
}
