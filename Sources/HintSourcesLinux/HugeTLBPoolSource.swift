import GuestMemoryLinux
import FreePages
import Logging
import PlatformLinux
import VirtioCore

/// Owned free pages from the hugetlb pool (`--hint-source hugetlb`, the default on KVM):
/// grow `nr_hugepages` in steps, reserve every free pool page with unfaulted mappings, find
/// the pool pages' PFNs in /proc/kpageflags, hint them as 2 MiB ranges, then unmap and shrink
/// the pool back to its original size.
///
/// Safety argument (docs/virtio-balloon.md §9: nobody may write a hinted page between balloond's
/// decision and QEMU applying the hint).
/// - *Nobody else can take a hinted page.* Before growing, the pool must have no reservations,
///   no surplus pages, overcommit 0 and no in-use pages but balloond's own ring page. After
///   each step balloond holds reservations for *every* free pool page (`HugePages_Rsvd ==
///   HugePages_Free ==` balloond's count). Any other allocation from the pool needs a free
///   unreserved page or a reservation of its own, and there is neither (overcommit 0: no
///   surplus either), so it fails. Reservations are counts, not pages; that is why *all* free
///   pages must be balloond's and why the pool is only shrunk when no hint is outstanding.
/// - *balloond never writes them.* The mappings are PROT_NONE and never faulted; a fault would
///   dequeue and zero some free page. Pages are zeroed on growth under `init_on_alloc=1`, but
///   that is before their PFNs are read, and writes before the decision are fine.
/// - *The PFNs are right.* Unmapped 2 MiB hugetlb heads are free pool pages only when no pool
///   page is in use by others (a hugetlbfs file's page has mapcount 0 too), which the
///   precondition guarantees; each step checks that the number found equals
///   `free_hugepages`, that every frame found before is still there, and that the counters
///   did not change during the scan. Free hugetlb pages are not moved by compaction.
/// - *Release only when no hint can be applied.* The pool is unmapped and shrunk at
///   `endRound` only when every descriptor handed out has come back (`hintsApplied`), else
///   when the last one does, or at `releaseAll` (DONE or reset: QEMU applies hints only in
///   START, under its lock). Shrinking frees free pages the kernel picks, any of them; after
///   unmapping, any free page can be taken by others. Both are harmless only once no hint is
///   pending. Freeing re-poisons or re-zeroes under page_poison/init_on_free after the hint,
///   so those writes are logged and the pages re-sent: correct with poisoning too.
/// - *Residual risks (not prevented, detected where possible).* A privileged process that
///   writes `nr_hugepages` or `nr_overcommit_hugepages` during a round, or a contiguous
///   allocation (CMA, memory offlining, 1 GiB pool growth) that dissolves a free 2 MiB page,
///   can hand one of balloond's frames to someone else. Each step re-checks the counters and
///   the release re-checks every hinted frame, and logs an error naming the frames if one is
///   no longer a free pool page.
///
/// Not allowed: concurrently with other hugetlb users (then `beginRound` throws and
/// `RoundFallbackSource` uses the anonymous source). The OOM score is not raised: killing
/// balloond frees nothing while the pool is grown (pool pages return only when
/// `nr_hugepages` is lowered, which `recoverAfterCrash` does on restart). The margin and PSI
/// checks are what keep the guest from starving.
public final class HugeTLBPoolSource: FreePageSource {
    public let name = "hugetlb"
    public let ownership = FreePageOwnership.owned
    public static let hugePageBytes = UInt64(HugePagePool.pageSize)

    public struct Options: Hashable, Sendable {
        public var limits: OwnedMemoryLimits
        /// First growth step (streaming: the first hint should leave within ~100 ms).
        public var firstStepBytes: UInt64
        /// Steps double up to this.
        public var maxStepBytes: UInt64
        public init(limits: OwnedMemoryLimits = OwnedMemoryLimits(), firstStepBytes: UInt64 = 32 << 20, maxStepBytes: UInt64 = 256 << 20) {
            self.limits = limits
            self.firstStepBytes = firstStepBytes
            self.maxStepBytes = maxStepBytes
        }
    }

    /// One round's (or one held session's) numbers, for logs and the benchmark.
    public struct RoundStatistics: Hashable, Sendable {
        public var steps = 0
        public var pagesGrown: UInt64 = 0
        public var pagesHinted = 0
        public var growNanos: UInt64 = 0
        public var reserveNanos: UInt64 = 0
        public var scanNanos: UInt64 = 0
        public var stoppedBecause: String?
    }

    public let root: SysRoot
    public let options: Options
    public let stateFile: HugeTLBPoolStateFile
    /// Told while the pool is grown (from before the state file is written until it is removed).
    public let holdings: GuestMemoryHoldings
    private let control: HugeTLBPoolControl
    private let scanner: HugeTLBFrameScanner
    /// Head PFNs of balloond's own pool pages (its ring/DMA hugepage).
    private let ownFrames: Set<UInt64>
    private let logger: Logger

    /// Everything held from the first growth until the pool is restored.
    private struct Session {
        var generation: Int
        var originalPoolSize: UInt64
        /// `nr_hugepages` as balloond last set it.
        var expectedPoolSize: UInt64
        var reservations: [HugeTLBReservation] = []
        var reservedPages = 0
        /// Head PFNs found free and reserved, and handed out at least once (in order).
        var known: Set<UInt64> = []
        var handedOutFrames: [UInt64] = []
        var stepPages: UInt64
        var growthStopped = false
        var failed = false
        var pressureAtRoundStart: MemoryPressure?
    }

    private var session: Session?
    private var generation = 0
    private var pendingRanges: [GuestPhysicalRange] = []
    private var outstanding = OutstandingHints<Int>()
    private var roundOpen = false
    private var lastMaxRangeBytes: UInt64 = 4 << 20

    /// Why the last `beginRound`/`nextBatch` refused, if it did.
    public private(set) var lastRefusal: HugeTLBRefusal?
    public private(set) var lastRound = RoundStatistics()
    /// Frames found no longer free at release (see the residual risks); 0 in a healthy run.
    public private(set) var framesLostBeforeRelease = 0

    public var heldBytes: UInt64 { UInt64(session?.reservedPages ?? 0) * Self.hugePageBytes }

    /// - Parameters:
    ///   - root: where /proc and /sys are (tests use a fake tree).
    ///   - control: the pool (default: the real one under `root`).
    ///   - ownHugePages: balloond's own hugetlb pages (the ring/DMA hugepage, e.g.
    ///     `[GuestPhysicalRange(start: dma.region.physicalAddress, length: 2 MiB)]` when
    ///     `HugePageDMAAllocator` is used; `[]` otherwise). They are the only in-use pool pages
    ///     allowed and are never hinted.
    ///   - stateFile: where the original pool size is kept while the pool is grown.
    ///   - memoryMap: RAM to scan (nil: /proc/iomem, or up to the end of /proc/kpageflags).
    ///   - arena: where the default control's reservations come from.
    ///   - holdings: balloond's one `GuestMemoryHoldings`: it says while the pool is grown, so
    ///     the balloon takes no surplus hugetlb pages meanwhile (nil: a private one).
    public init(root: SysRoot = .host, control: HugeTLBPoolControl? = nil, arena: DeviceMemoryArena? = nil, ownHugePages: [GuestPhysicalRange] = [],
                options: Options = Options(), stateFile: HugeTLBPoolStateFile? = nil, memoryMap: PhysicalMemoryMap? = nil,
                holdings: GuestMemoryHoldings? = nil, logger: Logger = Logger(label: "balloond.hint.hugetlb")) throws(FreePageSourceError) {
        self.root = root
        self.options = options
        self.holdings = holdings ?? GuestMemoryHoldings(root: root)
        self.control = control ?? LinuxHugeTLBPoolControl(root: root, arena: arena)
        self.stateFile = stateFile ?? HugeTLBPoolStateFile(root: root)
        self.logger = logger
        if control == nil, !HugePagePool(root: root).isSupported() {
            throw HugeTLBRefusal.noPool.sourceError
        }
        do { scanner = try HugeTLBFrameScanner(root: root, memoryMap: memoryMap) } catch {
            throw HugeTLBRefusal.unavailable(error).sourceError
        }
        var own: Set<UInt64> = []
        let framePages = HugeTLBFrameScanner.framePages
        for r in ownHugePages where r.length > 0 {
            let first = r.start.value / balloonPageSize / framePages * framePages
            let last = (r.end - 1) / balloonPageSize / framePages * framePages
            for f in stride(from: first, through: last, by: Int(framePages)) { own.insert(f) }
        }
        ownFrames = own
    }

    // MARK: crash recovery

    /// What the start-up recovery did with a pool state file (defined with the state file).
    public typealias RecoveryOutcome = HugeTLBPoolRecovery

    /// Puts `nr_hugepages` back to what a balloond that was killed mid-round found, if it
    /// left a state file and the pool is still where it left it (see `recoverAfterCrash(root:logger:)`,
    /// which runs this with the other recoveries). Call it at start, **before** allocating the
    /// ring/DMA hugepage (which would otherwise take one of the dead process's free pool pages
    /// and then be counted as part of the pool to shrink).
    @discardableResult
    public static func recoverAfterCrash(root: SysRoot = .host, stateFile: HugeTLBPoolStateFile? = nil, control: HugeTLBPoolControl? = nil,
                                         logger: Logger = Logger(label: "balloond.hint.hugetlb")) throws(FreePageSourceError) -> RecoveryOutcome {
        do { return try recoverHugeTLBPool(root: root, stateFile: stateFile ?? HugeTLBPoolStateFile(root: root), control: control, logger: logger) } catch {
            throw error.sourceError
        }
    }

    // MARK: FreePageSource

    public func beginRound(id: UInt32) throws(FreePageSourceError) {
        roundOpen = true
        lastRefusal = nil
        lastRound = RoundStatistics()
        pendingRanges = []
        do {
            if session != nil {
                try continueSession()
            } else {
                try startSession()
            }
            session!.pressureAtRoundStart = (try? MemorySnapshot.read(root: root, withBuddyInfo: false))?.pressure
        } catch {
            lastRefusal = error
            roundOpen = false
            if session != nil { session!.failed = true; releaseIfIdle() }
            throw error.sourceError
        }
    }

    public func nextBatch(maxRanges: Int, maxRangeBytes: UInt64) throws(FreePageSourceError) -> [GuestPhysicalRange] {
        guard roundOpen, session != nil, maxRanges > 0 else { return [] }
        lastMaxRangeBytes = max(balloonPageSize, maxRangeBytes)
        if pendingRanges.isEmpty, !session!.growthStopped, !session!.failed {
            do { try step(maxRangeBytes: maxRangeBytes) } catch {
                lastRefusal = error
                session!.failed = true
                lastRound.stoppedBecause = error.description
                logger.warning("hugetlb source stops for this round: \(error)")
                throw error.sourceError
            }
        }
        let take = min(maxRanges, pendingRanges.count)
        let out = Array(pendingRanges.prefix(take))
        pendingRanges.removeFirst(take)
        for r in out { outstanding.handedOut(r, tag: session!.generation) }
        return out
    }

    public func hintsApplied(_ ranges: [GuestPhysicalRange]) {
        for r in ranges { outstanding.applied(r) }
        if !roundOpen { releaseIfIdle() }
    }

    public func endRound() {
        roundOpen = false
        pendingRanges = []
        if let s = session {
            logger.debug("hugetlb round ended", metadata: [
                "held_mib": "\(heldBytes >> 20)", "hinted_mib": "\(UInt64(lastRound.pagesHinted) * 2)", "steps": "\(lastRound.steps)",
                "grow_ms": "\(lastRound.growNanos / 1_000_000)", "scan_ms": "\(lastRound.scanNanos / 1_000_000)",
                "outstanding": "\(outstanding.outstanding(s.generation))",
            ])
        }
        releaseIfIdle()
    }

    public func releaseAll() {
        roundOpen = false
        pendingRanges = []
        if session != nil { release() }
        outstanding.retireAll()
    }

    // MARK: session

    private func counters() throws(HugeTLBRefusal) -> HugePageCounters {
        do { return try control.counters() } catch { throw .system(error) }
    }

    /// The pool must be unused by others before balloond takes it.
    private func checkUnusedByOthers(_ c: HugePageCounters) throws(HugeTLBRefusal) {
        if c.reserved > 0 { throw .reservedByOthers(reserved: c.reserved) }
        if c.surplus > 0 { throw .surplusPages(c.surplus) }
        if c.overcommit > 0 { throw .overcommitEnabled(c.overcommit) }
        let own = UInt64(ownFrames.count)
        if c.inUse > own { throw .foreignPagesInUse(c.inUse - own) }
    }

    /// While balloond holds the pool: every free page is reserved by balloond, and nothing
    /// else changed.
    /// With `allowIdle` (before a step's reservation) free unreserved pages may exist: they
    /// are taken in that step.
    private func checkHeld(_ c: HugePageCounters, _ s: Session, allowIdle: Bool = false) throws(HugeTLBRefusal) {
        var problems: [String] = []
        if c.total != s.expectedPoolSize { problems.append("nr_hugepages is \(c.total), balloond set \(s.expectedPoolSize)") }
        if c.reserved != UInt64(s.reservedPages) { problems.append("HugePages_Rsvd is \(c.reserved), balloond holds \(s.reservedPages)") }
        if c.free < c.reserved || (c.free != c.reserved && !allowIdle) { problems.append("HugePages_Free \(c.free) ≠ HugePages_Rsvd \(c.reserved)") }
        if c.surplus > 0 { problems.append("\(c.surplus) surplus pages") }
        if c.overcommit > 0 { problems.append("nr_overcommit_hugepages is \(c.overcommit)") }
        if c.inUse > UInt64(ownFrames.count) { problems.append("\(c.inUse - UInt64(ownFrames.count)) foreign in-use pages") }
        if !problems.isEmpty { throw .poolChanged(problems.joined(separator: ", ")) }
    }

    private func startSession() throws(HugeTLBRefusal) {
        if stateFile.file.exists {
            // A previous balloond died holding a grown pool and nobody recovered it.
            logger.warning("found \(stateFile.path) from a balloond that did not exit cleanly; restoring the pool first")
            let outcome: RecoveryOutcome
            do { outcome = try recoverHugeTLBPool(root: root, stateFile: stateFile, control: control, logger: logger) } catch {
                throw .system(error)
            }
            if case .otherInstanceRunning(let pid) = outcome { throw .otherInstance(pid: pid) }
            // This process's own file from a release that could not restore the pool: now
            // restored (the file is gone), so the balloon may take surplus pages again.
            if !stateFile.file.exists { holdings.setHugeTLBPoolGrownByHintSource(false) }
        }
        let c = try counters()
        try checkUnusedByOthers(c)
        holdings.setHugeTLBPoolGrownByHintSource(true)
        do { try stateFile.write(originalPoolSize: c.total) } catch {
            holdings.setHugeTLBPoolGrownByHintSource(false)
            throw .system(error)
        }
        generation += 1
        let firstStep = max(1, options.firstStepBytes / Self.hugePageBytes)
        session = Session(generation: generation, originalPoolSize: c.total, expectedPoolSize: c.total, stepPages: firstStep)
    }

    /// A new round while the previous round's pages are still held (their descriptors had not
    /// all come back): they have stayed reserved and untouched, so they are hinted again
    /// (useful where the old hint was ignored) and growth continues.
    private func continueSession() throws(HugeTLBRefusal) {
        guard var s = session, !s.failed else { throw .poolChanged("the previous round's pool could not be verified") }
        try checkHeld(try counters(), s)
        pendingRanges = coalesce(s.handedOutFrames.sorted().map(frameRange), maxLength: lastMaxRangeBytes)
        s.growthStopped = false
        session = s
    }

    private func frameRange(_ pfn: UInt64) -> GuestPhysicalRange {
        GuestPhysicalRange(start: pfn * balloonPageSize, length: Self.hugePageBytes)
    }

    /// One growth step: grow by up to `stepPages` (within the allowance), reserve every free
    /// pool page, find the new frames, check everything is as expected.
    private func step(maxRangeBytes: UInt64) throws(HugeTLBRefusal) {
        guard var s = session else { return }
        defer { session = s }
        lastRound.steps += 1
        let c0 = try counters()
        // Free unreserved pages may already be in the pool (an idle admin pool at the first
        // step); they are reserved below with the grown ones.
        try checkHeld(c0, s, allowIdle: true)

        let snapshot: MemorySnapshot
        do { snapshot = try MemorySnapshot.read(root: root, withBuddyInfo: true) } catch { throw .system(error) }
        let allowance = memoryAllowance(.freeMemory, limits: options.limits, now: snapshot, pressureAtStart: s.pressureAtRoundStart,
                                             heldBytes: UInt64(s.reservedPages) * Self.hugePageBytes)
        let growPages = min(s.stepPages, allowance.bytes / Self.hugePageBytes)
        var c1 = c0
        if growPages > 0 {
            let t = Sys.monotonicNanos()
            do { try stateFile.write(originalPoolSize: s.originalPoolSize, setting: c0.total + growPages, previous: c0.total) } catch {
                throw .system(error)
            }
            do { try control.setPoolSize(c0.total + growPages) } catch {
                s.growthStopped = true
                lastRound.stoppedBecause = "growing the pool failed: \(error)"
            }
            lastRound.growNanos += Sys.monotonicNanos() - t
            c1 = try counters()
            let grown = c1.total > c0.total ? c1.total - c0.total : 0
            lastRound.pagesGrown += grown
            s.expectedPoolSize = c1.total
            do { try stateFile.write(originalPoolSize: s.originalPoolSize, setting: c1.total, previous: c1.total) } catch {
                throw .system(error)
            }
            if grown < growPages {
                s.growthStopped = true
                lastRound.stoppedBecause = "the kernel added \(grown) of \(growPages) pages (no more free 2 MiB blocks)"
            }
        } else {
            s.growthStopped = true
            lastRound.stoppedBecause = "allowance \(allowance)"
        }
        if s.growthStopped, let why = lastRound.stoppedBecause {
            logger.debug("hugetlb growth stops: \(why)", metadata: ["held_mib": "\(UInt64(s.reservedPages) * 2)"])
        }
        let toReserve = Int(c1.free > c1.reserved ? c1.free - c1.reserved : 0)
        guard toReserve > 0 else { return }

        let t = Sys.monotonicNanos()
        let r: HugeTLBReservation
        do { r = try control.reserve(pages: toReserve) } catch {
            throw .cannotReserve(pages: toReserve, error)
        }
        s.reservations.append(r)
        s.reservedPages += toReserve
        lastRound.reserveNanos += Sys.monotonicNanos() - t
        let c2 = try counters()
        try checkHeld(c2, s)

        let ts = Sys.monotonicNanos()
        let frames: [UInt64]
        do { frames = try scanner.unmappedPoolFrames(excluding: ownFrames) } catch { throw .system(error) }
        lastRound.scanNanos += Sys.monotonicNanos() - ts
        let c3 = try counters()
        if c3 != c2 { throw .poolChanged("the counters changed during the PFN scan: \(c2) → \(c3)") }
        if UInt64(frames.count) != c2.free {
            throw .scanMismatch("found \(frames.count) unmapped 2 MiB hugetlb pages, free_hugepages is \(c2.free)")
        }
        let found = Set(frames)
        let lost = s.known.subtracting(found)
        if !lost.isEmpty {
            throw .scanMismatch("\(lost.count) frame(s) found free earlier are not free pool pages any more: \(lost.sorted().prefix(8).map { "pfn 0x" + String($0, radix: 16) })")
        }
        let new = frames.filter { !s.known.contains($0) }
        s.known.formUnion(new)
        s.handedOutFrames += new
        lastRound.pagesHinted += new.count
        pendingRanges += coalesce(new.map(frameRange), maxLength: max(balloonPageSize, maxRangeBytes))
        s.stepPages = min(s.stepPages * 2, max(1, options.maxStepBytes / Self.hugePageBytes))
    }

    /// Releases the session once no descriptor for it is out.
    private func releaseIfIdle() {
        guard let s = session, !roundOpen, outstanding.outstanding(s.generation) == 0 else { return }
        release()
    }

    /// Verifies the hinted frames, unmaps every reservation and shrinks the pool back.
    private func release() {
        guard let s = session else { return }
        session = nil
        var lost: [UInt64] = []
        for f in s.handedOutFrames where !((try? scanner.isUnmappedPoolFrame(f)) ?? false) { lost.append(f) }
        if !lost.isEmpty {
            framesLostBeforeRelease += lost.count
            logger.error("hugetlb frames hinted by balloond were no longer free pool pages at release: another party took them while balloond held every free pool page (someone changed nr_hugepages or overcommit, or a contiguous allocation dissolved them). If that happened before QEMU applied the hint and the guest runs on KVM, the migration destination may hold stale data in these frames", metadata: [
                "frames": "\(lost.prefix(16).map { "0x" + String($0 * balloonPageSize, radix: 16) })", "count": "\(lost.count)",
            ])
        }
        for r in s.reservations { r.release() }
        do {
            try stateFile.write(originalPoolSize: s.originalPoolSize, setting: s.originalPoolSize, previous: s.expectedPoolSize)
            try control.setPoolSize(s.originalPoolSize)
            let after = try control.counters()
            if after.total != s.originalPoolSize {
                if let why = control.reservationReleaseError {
                    logger.error("nr_hugepages is \(after.total) after restoring \(s.originalPoolSize): balloond could not give back its pool reservations (truncating its hugetlbfs file failed: \(why)); the guest gets those pages back when balloond exits")
                } else {
                    logger.warning("nr_hugepages is \(after.total) after restoring \(s.originalPoolSize): pages in use or reserved by others stay until freed (they are surplus now)")
                }
            }
            stateFile.remove()
            holdings.setHugeTLBPoolGrownByHintSource(false)
        } catch {
            logger.error("could not restore nr_hugepages to \(s.originalPoolSize): \(error); \(stateFile.path) is kept so the next start restores it")
        }
        logger.debug("hugetlb pool released", metadata: ["pages": "\(s.reservedPages)", "pool": "\(s.originalPoolSize)"])
    }
}
