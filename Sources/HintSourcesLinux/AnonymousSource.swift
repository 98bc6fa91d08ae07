import GuestMemoryLinux
import FreePages
import Logging
import PlatformLinux
import VirtioCore

/// Owned free pages from anonymous memory (`--hint-source anonymous`, and the fallback of
/// the hugetlb source): chunks of private 4 KiB pages (`MADV_NOHUGEPAGE`) populated for
/// write and locked, their PFNs read from /proc/self/pagemap right after and again right
/// before they are handed to the driver, coalesced into ranges.
///
/// Safety argument (docs/virtio-balloon.md §9).
/// - *Nobody else writes these pages while balloond holds them.* They are balloond's private,
///   locked (not reclaimable), not mergeable (`MADV_UNMERGEABLE`), not shared with children
///   (`MADV_DONTFORK`) memory, and balloond never touches them after populating. The kernel's
///   zeroing on population happens before the PFNs are read: writes before the decision are
///   fine.
/// - *PFNs are read after the new cmd id*, for each chunk just after populating it: a PFN
///   read before the round's bitmap sync could belong to a page that moved and was rewritten
///   by its new owner before the sync, and the hint would erase that write on any host.
/// - *Release only when no hint can be applied.* A chunk is unmapped once its round has ended
///   and every descriptor for it has come back (`hintsApplied`), or at `releaseAll` (DONE,
///   reset). Its pages are then freed (and re-zeroed or re-poisoned under init_on_free or
///   page_poison) after their hints: those writes are logged and re-sent.
/// - *Page migration.* mlock does not pin. What could move a locked 4 KiB page, and what
///   stops it: compaction migrates unevictable (mlocked) pages only while
///   `vm.compact_unevictable_allowed` is 1, so the shared `CompactionHold` keeps it at 0
///   from before the first chunk is mapped until the last one is released (a chunk is not
///   taken if it cannot be set); THP (a huge page can be split or migrated as a unit, and
///   khugepaged collapses small pages into new frames): `MADV_NOHUGEPAGE` before the pages
///   are faulted; KSM: `MADV_UNMERGEABLE`; fork: `MADV_DONTFORK`. Not prevented: NUMA
///   balancing, memory offlining, CMA, `move_pages`. Those are detected: each chunk's pagemap
///   is re-read right before its ranges are handed to the driver (a chunk with a moved page
///   is not hinted at all), when its last descriptor comes back, and before munmap; any
///   move is logged as an error naming the old frames. On KVM with manual dirty-log protect a
///   frame that moved and was rewritten between the re-check and QEMU applying the hint can
///   still be lost; the hugetlb source has no such window, which is why it is the default.
/// - *Memory pressure.* Each chunk is sized by `memoryAllowance(.freeMemory, …)` (margin, MemFree,
///   MemAvailable, PSI), and `oom_score_adj` is raised to 1000 while memory is held, so the
///   OOM killer takes balloond (freeing all of it at once) rather than a workload.
public final class AnonymousSource: FreePageSource {
    public let name = "anonymous"
    public let ownership = FreePageOwnership.owned

    public struct Options: Hashable, Sendable {
        public var limits: OwnedMemoryLimits
        /// The first chunk (small, so the first hint leaves quickly) and the later ones.
        public var firstChunkBytes: UInt64
        public var chunkBytes: UInt64
        /// `oom_score_adj` while memory is held (nil: leave it alone).
        public var oomScoreAdj: Int?
        public init(limits: OwnedMemoryLimits = OwnedMemoryLimits(), firstChunkBytes: UInt64 = 32 << 20, chunkBytes: UInt64 = 64 << 20,
                    oomScoreAdj: Int? = 1000) {
            self.limits = limits
            self.firstChunkBytes = firstChunkBytes
            self.chunkBytes = chunkBytes
            self.oomScoreAdj = oomScoreAdj
        }
    }

    public struct RoundStatistics: Hashable, Sendable {
        public var chunks = 0
        public var bytesTaken: UInt64 = 0
        public var populateNanos: UInt64 = 0
        public var pagemapNanos: UInt64 = 0
        public var stoppedBecause: String?
        /// Chunks not hinted because a page moved before their ranges were handed out.
        public var chunksDroppedMoved = 0
    }

    private final class Held {
        let id: Int
        let round: Int
        let chunk: AnonymousChunk
        /// PFN of each 4 KiB page, as read right after populating.
        let pfns: [UInt64]
        var verifiedAfterHints = false
        /// Pages already reported as moved (each is counted and logged once).
        var reportedMoves: Set<Int> = []
        /// The chunk's IOMMU mapping (vfio): its device address (the length is the chunk's).
        var deviceAddress: UInt64?
        init(id: Int, round: Int, chunk: AnonymousChunk, pfns: [UInt64]) {
            self.id = id
            self.round = round
            self.chunk = chunk
            self.pfns = pfns
        }
    }

    public let root: SysRoot
    public let options: Options
    private let backend: AnonymousMemoryBackend
    private let oom: OOMScoreAdjustment?
    private let compaction: CompactionHold
    private var holdingCompaction = false
    private let logger: Logger

    private var held: [Int: Held] = [:]
    private var nextChunkID = 0
    private var round = 0
    private var roundOpen = false
    private var growthStopped = false
    private var pressureAtRoundStart: MemoryPressure?
    private var pending: [(range: GuestPhysicalRange, chunk: Int)] = []
    private var outstanding = OutstandingHints<Int>()

    /// With vfio and ACCESS_PLATFORM: each chunk is mapped in the IOMMU (one mapping, at a
    /// device address the mapper picks) before its ranges are handed out, the ranges are
    /// those device addresses, and the mapping is removed before the chunk is released.
    public var deviceMapper: DeviceAddressMapper?
    /// Longest hint range through the IOMMU: 256 pages, so QEMU never needs more than 256
    /// I/O vectors for one descriptor (it refuses more than 1024).
    public static let maxTranslatedRangeBytes: UInt64 = 1 << 20
    /// Chunks kept because their IOMMU mappings could not be removed (never released).
    private var keptMapped: [AnonymousChunk] = []

    public private(set) var lastRound = RoundStatistics()
    /// Pages found moved (see the safety argument); 0 in a healthy run.
    public private(set) var movedPages = 0

    public var heldBytes: UInt64 { held.values.reduce(0) { $0 + UInt64($1.chunk.bytes) } }

    /// - Parameters:
    ///   - backend: the memory (tests pass a fake).
    ///   - compactionHold: balloond's one `CompactionHold` (nil: a private one).
    ///   - holdings: balloond's one `GuestMemoryHoldings`, which counts the OOM score's holders
    ///     (nil: a private one).
    public init(root: SysRoot = .host, backend: AnonymousMemoryBackend, options: Options = Options(),
                compactionHold: CompactionHold? = nil, holdings: GuestMemoryHoldings? = nil,
                logger: Logger = Logger(label: "balloond.hint.anonymous")) {
        self.root = root
        self.options = options
        self.backend = backend
        self.compaction = compactionHold ?? CompactionHold(root: root, logger: logger)
        let holdings = holdings ?? GuestMemoryHoldings(root: root)
        self.oom = options.oomScoreAdj.map { OOMScoreAdjustment(holdings: holdings, raisedValue: $0) }
        self.logger = logger
    }

    /// The real source. `pagemap` must have been opened while privileged.
    public convenience init(root: SysRoot = .host, pagemap: PagemapResolver, arena: DeviceMemoryArena, options: Options = Options(),
                            compactionHold: CompactionHold? = nil, holdings: GuestMemoryHoldings? = nil,
                            logger: Logger = Logger(label: "balloond.hint.anonymous")) {
        self.init(root: root, backend: LinuxAnonymousMemory(pagemap: pagemap, arena: arena), options: options, compactionHold: compactionHold,
                  holdings: holdings, logger: logger)
    }

    public func beginRound(id: UInt32) throws(FreePageSourceError) {
        round += 1
        roundOpen = true
        growthStopped = false
        pending = []
        lastRound = RoundStatistics()
        pressureAtRoundStart = (try? MemorySnapshot.read(root: root, withBuddyInfo: false))?.pressure
    }

    public func nextBatch(maxRanges: Int, maxRangeBytes: UInt64) throws(FreePageSourceError) -> [GuestPhysicalRange] {
        guard roundOpen, maxRanges > 0 else { return [] }
        var out: [(range: GuestPhysicalRange, chunk: Int)] = []
        var checked: Set<Int> = []
        // A chunk dropped because a page moved is replaced by a new one, a few times at most.
        var replacements = 0
        while out.isEmpty {
            if pending.isEmpty {
                guard !growthStopped, replacements <= 3 else { break }
                do { try takeChunk(maxRangeBytes: max(balloonPageSize, maxRangeBytes)) } catch {
                    growthStopped = true
                    lastRound.stoppedBecause = error.description
                    logger.warning("anonymous source stops taking memory this round: \(error)")
                    throw error.sourceError
                }
                if pending.isEmpty { break }
            }
            while out.count < maxRanges, !pending.isEmpty {
                let p = pending.removeFirst()
                if !checked.contains(p.chunk) {
                    checked.insert(p.chunk)
                    // The last look before QEMU may act on these frames: with any page moved,
                    // none of the chunk's remaining ranges is hinted.
                    if let h = held[p.chunk], !stillInPlace(h) {
                        pending.removeAll { $0.chunk == p.chunk }
                        lastRound.chunksDroppedMoved += 1
                        replacements += 1
                        continue
                    }
                }
                out.append(p)
            }
        }
        for p in out { outstanding.handedOut(p.range, tag: p.chunk) }
        return out.map(\.range)
    }

    public func hintsApplied(_ ranges: [GuestPhysicalRange]) {
        for r in ranges {
            guard let id = outstanding.applied(r), outstanding.outstanding(id) == 0, let h = held[id] else { continue }
            let stillPending = pending.contains { $0.chunk == id }
            if !stillPending && !h.verifiedAfterHints {
                // Every hint for this chunk is applied: if no page moved until now, none of its
                // hints could have raced a move.
                h.verifiedAfterHints = true
                verify(h, when: "once its hints were applied")
            }
        }
        releaseIdleChunks()
    }

    public func endRound() {
        roundOpen = false
        pending = []
        if lastRound.chunks > 0 {
            logger.debug("anonymous round ended", metadata: [
                "taken_mib": "\(lastRound.bytesTaken >> 20)", "chunks": "\(lastRound.chunks)",
                "populate_ms": "\(lastRound.populateNanos / 1_000_000)", "held_mib": "\(heldBytes >> 20)",
                "outstanding": "\(outstanding.total)",
            ])
        }
        releaseIdleChunks()
    }

    public func releaseAll() {
        roundOpen = false
        pending = []
        for id in held.keys.sorted() { release(id) }
        outstanding.retireAll()
    }

    // MARK: chunks

    private func takeChunk(maxRangeBytes: UInt64) throws(GuestMemoryError) {
        let snapshot = try MemorySnapshot.read(root: root, withBuddyInfo: false)
        let allowance = memoryAllowance(.freeMemory, limits: options.limits, now: snapshot, pressureAtStart: pressureAtRoundStart,
                                             heldBytes: heldBytes)
        let want = lastRound.chunks == 0 ? options.firstChunkBytes : options.chunkBytes
        let huge: UInt64 = 2 << 20
        let bytes = min(want, allowance.bytes) / huge * huge
        guard bytes > 0 else {
            growthStopped = true
            lastRound.stoppedBecause = "allowance \(allowance)"
            logger.debug("anonymous source stops taking memory: allowance \(allowance)", metadata: ["held_mib": "\(heldBytes >> 20)"])
            return
        }
        do {
            if holdingCompaction {
                try compaction.reassert()
            } else {
                try compaction.hold()
                holdingCompaction = true
            }
        } catch {
            releaseCompactionIfIdle()
            throw .compactionNotPrevented(error)
        }
        if let oom, let problem = oom.raise() { logger.warning("\(problem)") }
        let t0 = Sys.monotonicNanos()
        let chunk: AnonymousChunk
        do { chunk = try backend.mapPopulated(bytes: Int(bytes)) } catch {
            releaseCompactionIfIdle()
            throw error
        }
        let t1 = Sys.monotonicNanos()
        let entries: [PagemapEntry]
        do { entries = try backend.pagemap(of: chunk) } catch {
            chunk.release()
            releaseCompactionIfIdle()
            throw error
        }
        lastRound.populateNanos += t1 - t0
        lastRound.pagemapNanos += Sys.monotonicNanos() - t1
        var pfns: [UInt64] = []
        pfns.reserveCapacity(entries.count)
        for (i, e) in entries.enumerated() {
            guard e.present, !e.swapped, e.pfn != 0 else {
                chunk.release()
                releaseCompactionIfIdle()
                throw .noPFN(page: i, entry: e)
            }
            pfns.append(e.pfn)
        }
        let id = nextChunkID
        nextChunkID += 1
        let h = Held(id: id, round: round, chunk: chunk, pfns: pfns)
        if let deviceMapper {
            // One IOMMU mapping for the whole chunk, in a window above guest RAM: the device
            // sees the chunk contiguous, and the hints name its pages by those addresses.
            do { h.deviceAddress = try deviceMapper.mapWindow(virtualAddress: chunk.base, length: chunk.bytes) } catch {
                chunk.release()
                releaseCompactionIfIdle()
                throw .deviceMappingFailed(error)
            }
        }
        held[id] = h
        lastRound.chunks += 1
        lastRound.bytesTaken += bytes
        if let deviceBase = h.deviceAddress {
            // At most 1 MiB per descriptor: QEMU maps a descriptor into one I/O vector per
            // physically contiguous piece, and refuses more than 1024 of them.
            let step = min(max(balloonPageSize, maxRangeBytes), Self.maxTranslatedRangeBytes)
            var offset: UInt64 = 0
            while offset < UInt64(chunk.bytes) {
                let length = min(step, UInt64(chunk.bytes) - offset)
                pending.append((GuestPhysicalRange(start: deviceBase + offset, length: length), id))
                offset += length
            }
        } else {
            let ranges = pfns.sorted().map { GuestPhysicalRange(start: $0 * balloonPageSize, length: balloonPageSize) }
            for r in coalesce(ranges, maxLength: maxRangeBytes) { pending.append((r, id)) }
        }
    }

    /// Whether every page of `h` is still present at the PFN read after populating; a moved
    /// page is logged (once) and counted.
    private func stillInPlace(_ h: Held) -> Bool {
        let before = movedPages
        guard let entries = try? backend.pagemap(of: h.chunk), entries.count == h.pfns.count else {
            logger.error("cannot re-read the pagemap of an anonymous chunk before hinting it; not hinting it")
            return false
        }
        var moved: [(old: UInt64, new: UInt64)] = []
        var inPlace = true
        for (i, e) in entries.enumerated() where !e.present || e.swapped || e.pfn != h.pfns[i] {
            inPlace = false
            if !h.reportedMoves.contains(i) {
                h.reportedMoves.insert(i)
                moved.append((h.pfns[i], e.pfn))
            }
        }
        movedPages += moved.count
        if movedPages > before {
            logger.error("the kernel moved \(moved.count) page(s) of an anonymous chunk after it was populated; the chunk is not hinted", metadata: [
                "old_frames": "\(moved.prefix(16).map { "0x" + String($0.old * balloonPageSize, radix: 16) })",
            ])
        }
        return inPlace
    }

    private func releaseCompactionIfIdle() {
        guard held.isEmpty, holdingCompaction else { return }
        holdingCompaction = false
        compaction.release()
    }

    /// Re-reads a chunk's pagemap and logs every page whose PFN changed since it was read.
    private func verify(_ h: Held, when: String) {
        let entries: [PagemapEntry]
        do { entries = try backend.pagemap(of: h.chunk) } catch {
            logger.error("cannot re-read the pagemap of a hinted chunk \(when): \(error); page moves cannot be ruled out")
            return
        }
        var moved: [(old: UInt64, new: UInt64)] = []
        for (i, e) in entries.enumerated() where i < h.pfns.count && e.pfn != h.pfns[i] && !h.reportedMoves.contains(i) {
            moved.append((h.pfns[i], e.pfn))
            h.reportedMoves.insert(i)
        }
        guard !moved.isEmpty else { return }
        movedPages += moved.count
        logger.error("the kernel moved \(moved.count) hinted anonymous page(s) (found \(when)). If a moved page's old frame was reused and written before QEMU applied its hint, and the guest runs on KVM with manual dirty-log protect, the migration destination may hold stale data in that frame (under TCG, or if the move came after the hint, it is re-sent). Prefer --hint-source hugetlb on KVM, or set vm.compact_unevictable_allowed=0", metadata: [
            "old_frames": "\(moved.prefix(16).map { "0x" + String($0.old * balloonPageSize, radix: 16) })",
        ])
    }

    /// Unmaps chunks whose round is over and whose descriptors have all come back.
    private func releaseIdleChunks() {
        for (id, h) in held where (!roundOpen || h.round != round) && outstanding.outstanding(id) == 0 {
            release(id)
        }
    }

    private func release(_ id: Int) {
        guard let h = held.removeValue(forKey: id) else { return }
        verify(h, when: "just before release")
        if let deviceMapper, let address = h.deviceAddress {
            // The device loses its way in first; a mapping that cannot be removed keeps the
            // chunk (vfio also keeps its pages pinned, so the kernel could not reuse them).
            do { try deviceMapper.unmap(deviceAddress: address, length: h.chunk.bytes) } catch {
                logger.critical("\(error); keeping the chunk")
                keptMapped.append(h.chunk)
                return
            }
        }
        h.chunk.release()
        if held.isEmpty, let oom, let problem = oom.restore() { logger.warning("\(problem)") }
        releaseCompactionIfIdle()
    }
}
