import GuestMemoryLinux
import BalloonBlocks
import Logging
import PlatformLinux
import VirtioCore

/// Balloon memory from locked anonymous 4 KiB pages (the fallback when hugetlb pages cannot
/// be had): private memory mapped in steps, `MADV_NOHUGEPAGE`, populated for write,
/// `mlock`ed, PFNs from /proc/self/pagemap, handed out as blocks of up to 512 pages (2 MiB
/// of address space each) in any physical order. It cannot provide 2 MiB-contiguous
/// blocks, so `hugeOnly` takes nothing.
///
/// Why the frames stay where `take` found them (docs/virtio-balloon.md §4, the userspace hazard).
/// mlock does not pin. What could still move a locked anonymous page, and what stops it:
/// - *Reclaim and swap*: `mlock` (the pages are unevictable).
/// - *Compaction*: it migrates unevictable (mlocked) pages only while
///   `vm.compact_unevictable_allowed` is 1, the default. It is set to 0 before the first
///   page is taken and put back once none is held, with a `SysctlStateFile`
///   (`/run/balloond/balloon-compact.state`) so that a restart after SIGKILL puts it back. If
///   it cannot be set, `take` refuses. (A kernel without the file has no compaction.)
/// - *khugepaged / THP*: `MADV_NOHUGEPAGE` before the pages are faulted: they are never
///   collapsed into a new huge page.
/// - *KSM*: `MADV_UNMERGEABLE`. *fork copy-on-write*: `MADV_DONTFORK`, and balloond never
///   writes the pages after populating them.
/// - *Not prevented*: NUMA balancing (on guests with several NUMA nodes and
///   `kernel.numa_balancing=1`), `alloc_contig_range` (CMA, gigantic page allocation), memory
///   offlining, `move_pages`/`migrate_pages` by a privileged process, memory-failure
///   handling. These are detected, not prevented: the driver calls `stillInPlace` (a fresh
///   pagemap read) right before it sends a block's PFNs. The hugetlb backend, whose pages
///   compaction and NUMA balancing never move, is preferred for that reason.
///
/// Memory pressure: each step takes at most `memoryAllowance(.availableMemory, …)` (MemAvailable − margin,
/// stop on PSI pressure), re-read between steps; `oom_score_adj` is raised while memory is
/// held (`BalloonMemoryBudget`).
public final class LockedAnonymousBalloonMemory: BalloonMemory {
    public let name = "locked-anonymous"
    static let blockPages = balloonPagesPerHugeBlock
    public static let compactUnevictableSetting = "/proc/sys/vm/compact_unevictable_allowed"

    public struct Options: Hashable, Sendable {
        /// Most memory mapped per step; the allowance is re-read between steps.
        public var stepBytes: UInt64
        public init(stepBytes: UInt64 = 64 << 20) { self.stepBytes = stepBytes }
    }

    private struct Held {
        let mapping: BalloonMapping
        let slot: Int
        let address: UInt
        /// PFN of each 4 KiB page, in address order, as read right after locking.
        let pfns: [UInt64]
    }

    public let root: SysRoot
    public let options: Options
    public let budget: BalloonMemoryBudget
    private let pages: LockedAnonymousPages
    private let compaction: CompactionHold
    /// Whether this backend holds `compaction` (from the first page taken to the last released).
    private var holdingCompaction = false
    private let logger: Logger
    private var held: [UInt64: Held] = [:]
    private var nextHandle: UInt64 = 1
    private var heldPages = 0

    public var heldBytes: UInt64 { UInt64(heldPages) * balloonPageSize }

    /// - Parameters:
    ///   - pages: the kernel side (`LinuxBalloonPages`; tests pass a fake).
    ///   - budget: shared with the other backends of this balloond (limits, OOM score).
    ///   - compactionHold: balloond's one `CompactionHold` (shared with the DMA pages and the
    ///     anonymous hint source); nil: a private one over `stateFile`.
    ///   - stateFile: where the original `compact_unevictable_allowed` is kept while it is 0.
    public init(root: SysRoot = .host, pages: LockedAnonymousPages, budget: BalloonMemoryBudget, options: Options = Options(),
                compactionHold: CompactionHold? = nil, stateFile: SysctlStateFile? = nil,
                logger: Logger = Logger(label: "balloond.balloon.anonymous")) {
        self.root = root
        self.pages = pages
        self.budget = budget
        self.options = options
        self.logger = logger
        compaction = compactionHold ?? CompactionHold(root: root, stateFile: stateFile, logger: logger)
    }

    deinit { releaseAll() }

    /// Puts `compact_unevictable_allowed` back to what a balloond that was killed found, if it
    /// left a state file.
    @discardableResult
    public static func recoverAfterCrash(root: SysRoot = .host, stateFile: SysctlStateFile? = nil,
                                         logger: Logger = Logger(label: "balloond.balloon.anonymous")) throws(BalloonMemoryError) -> SysctlRecovery {
        try recoverBalloonSysctl(root: root, stateFile: stateFile ?? SysctlStateFile(root: root, path: SysctlStateFile.compactUnevictablePath), logger: logger)
    }

    // MARK: BalloonMemory

    public func take(maxPages: Int, hugeOnly: Bool) throws(BalloonMemoryError) -> BalloonTake {
        guard !hugeOnly else {
            return BalloonTake(blocks: [], limitedBy: "locked anonymous memory is 4 KiB pages in any physical order: it cannot provide the 2 MiB-aligned contiguous blocks that free page reporting and hugepage-backed hosts need")
        }
        guard maxPages > 0 else { return BalloonTake(blocks: []) }

        budget.beginTaking()
        defer {
            if held.isEmpty { restoreCompaction() }
            budget.endTaking()
        }
        do { try preventCompaction() } catch {
            throw LinuxBalloonMemoryError.compactionNotPrevented(path: root.path(Self.compactUnevictableSetting), error).balloonError
        }

        var blocks: [BalloonBlock] = []
        var taken = 0
        var limitedBy: String?
        var stepPages = max(Self.blockPages, Int(options.stepBytes / balloonPageSize) / Self.blockPages * Self.blockPages)
        var pressureAtStart: MemoryPressure?
        var first = true
        func stop(_ error: LinuxBalloonMemoryError) throws(BalloonMemoryError) -> BalloonTake {
            if blocks.isEmpty { throw error.balloonError }
            logger.error("locked anonymous balloon memory stops: \(error)")
            return BalloonTake(blocks: blocks, limitedBy: error.description)
        }

        while taken < maxPages {
            let now: MemorySnapshot
            do { now = try budget.snapshot() } catch { return try stop(error) }
            if first { pressureAtStart = now.pressure; first = false }
            let allowance = budget.allowance(now: now, pressureAtStart: pressureAtStart)
            var n = min(maxPages - taken, stepPages, Int(allowance.bytes / balloonPageSize))
            // Whole blocks, except for the last one asked or when the allowance is below one.
            if n > Self.blockPages && n < maxPages - taken { n = n / Self.blockPages * Self.blockPages }
            guard n > 0 else {
                limitedBy = "allowance \(allowance)"
                break
            }
            let mapping: BalloonMapping
            do { mapping = try pages.mapLocked(pages: n) } catch {
                if error.kind == .noMemory {
                    if n > Self.blockPages {
                        stepPages = max(Self.blockPages, n / 2 / Self.blockPages * Self.blockPages)
                        continue
                    }
                    limitedBy = "no memory to be had: \(error)"
                    break
                }
                return try stop(.mapFailed(error))
            }
            let pfns: [UInt64]
            do { pfns = try verifiedPFNs(of: mapping, pages: n) } catch { return try stop(error) }
            for slot in 0..<mapping.slotCount {
                let count = mapping.slotPages(slot)
                let start = slot * Self.blockPages
                let slotPFNs = Array(pfns[start..<(start + count)])
                let handle = nextHandle
                nextHandle += 1
                held[handle] = Held(mapping: mapping, slot: slot, address: mapping.slotAddress(slot), pfns: slotPFNs)
                heldPages += count
                budget.took(UInt64(count) * balloonPageSize)
                let ranges = slotPFNs.sorted().map { GuestPhysicalRange(start: $0 * balloonPageSize, length: balloonPageSize) }
                blocks.append(BalloonBlock(handle: handle, ranges: coalesce(ranges, maxLength: balloonHugeBlockSize)))
            }
            taken += n
        }
        if let limitedBy { logger.debug("locked anonymous balloon memory took \(taken) of \(maxPages) pages: \(limitedBy)") }
        return BalloonTake(blocks: blocks, limitedBy: limitedBy)
    }

    public func stillInPlace(_ block: BalloonBlock) -> Bool {
        guard let h = held[block.handle] else { return false }
        guard let entries = try? pages.pagemap(at: h.address, pages: h.pfns.count), entries.count == h.pfns.count else { return false }
        for (e, pfn) in zip(entries, h.pfns) where !e.present || e.swapped || e.pfn != pfn { return false }
        return true
    }

    public func release(_ blocks: [BalloonBlock]) {
        var any = false
        for b in blocks {
            guard let h = held.removeValue(forKey: b.handle) else { continue }
            h.mapping.release(slot: h.slot)
            heldPages -= h.pfns.count
            budget.released(UInt64(h.pfns.count) * balloonPageSize)
            any = true
        }
        if any, held.isEmpty { restoreCompaction() }
    }

    public func releaseAll() {
        for (_, h) in held { h.mapping.release(slot: h.slot) }
        let bytes = heldBytes
        held = [:]
        heldPages = 0
        if bytes > 0 { budget.released(bytes) }
        restoreCompaction()
    }

    // MARK: internals

    /// `compact_unevictable_allowed` = 0 while anything is held (checked again on every
    /// take, in case someone set it back).
    private func preventCompaction() throws(GuestMemoryError) {
        if holdingCompaction {
            try compaction.reassert()
        } else {
            try compaction.hold()
            holdingCompaction = true
        }
    }

    private func restoreCompaction() {
        guard holdingCompaction else { return }
        holdingCompaction = false
        compaction.release()
    }

    /// Every page's PFN: present, not swapped, a real PFN (CAP_SYS_ADMIN), all distinct.
    private func verifiedPFNs(of mapping: BalloonMapping, pages count: Int) throws(LinuxBalloonMemoryError) -> [UInt64] {
        let entries: [PagemapEntry]
        do { entries = try pages.pagemap(at: mapping.base, pages: count) } catch {
            throw .cannotReadPFNs(.lockedAnonymous, error)
        }
        guard entries.count == count else { throw .pagemapCount(entries: entries.count, pages: count) }
        var pfns: [UInt64] = []
        pfns.reserveCapacity(count)
        for (i, e) in entries.enumerated() {
            guard e.present, !e.swapped else {
                throw .pageNotPresent(index: i, entry: e)
            }
            guard e.pfn != 0 else {
                throw .pfnsHidden
            }
            pfns.append(e.pfn)
        }
        guard Set(pfns).count == pfns.count else {
            throw .sharedFrame
        }
        return pfns
    }
}
