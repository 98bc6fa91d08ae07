import GuestMemoryLinux
import FreePages
import Logging
import PlatformLinux
import VirtioCore

/// Observed free pages: runs of `KPF_BUDDY` pages from `/proc/kpageflags`, read in large
/// chunks after the round's cmd id and streamed batch by batch. Touches nothing
/// (`--hint-source kpageflags`).
///
/// Safety argument. balloond does not own these pages: any task may allocate and write one
/// between the scan and QEMU applying its hint. That write is safe only if it is dirty-logged
/// *after* the hint clears the page from the round. Under TCG it is: QEMU's own dirty log
/// records it and the next bitmap sync re-sends the page. On KVM with manual dirty-log protect
/// the hint's `KVM_CLEAR_DIRTY_LOG` drops it and the destination keeps stale data
/// (docs/virtio-balloon.md §9). So this source is allowed only under TCG or with the explicit
/// unsafe opt-in (`chooseHintSource` decides; this type does not re-check). It is also refused
/// with `page_poison` or `init_on_free`: a scanned page is never rewritten by a free path, so
/// the destination holds zeros (or stale data) where the kernel expects 0xaa or zero, and the
/// next allocation reports "pagealloc: memory corruption" or hands out dirty "zeroed" memory.
/// The scan starts only in `beginRound` (after the new id, i.e. after the round's bitmap
/// sync): a page read as free before that sync may have been written before it, and that
/// write would be lost even under TCG.
public final class KPageFlagsSource: FreePageSource {
    public let name = "kpageflags"
    public let ownership = FreePageOwnership.observed
    public var heldBytes: UInt64 { 0 }

    public let root: SysRoot
    private let file: KPageFile
    /// PFN ranges to scan; nil: from PFN 0 to the end of the file.
    private let scanRanges: [Range<UInt64>]?
    private let logger: Logger

    // Scan state of the current round.
    private var roundActive = false
    private var rangeIndex = 0
    private var cursor: UInt64 = 0
    private var scanDone = true
    private var runStart: UInt64?
    private var runPages: UInt64 = 0
    private var pending: [GuestPhysicalRange] = []
    private var roundStartNanos: UInt64 = 0

    /// What the last (or current) round's scan covered.
    public private(set) var lastScan = ScanStatistics()

    public struct ScanStatistics: Hashable, Sendable {
        public var framesScanned: UInt64 = 0
        public var freeFrames: UInt64 = 0
        public var reads = 0
        /// Time spent inside nextBatch reading and decoding (ns).
        public var scanNanos: UInt64 = 0
        public var finished = false
        /// Milliseconds per GiB of RAM scanned.
        public var millisecondsPerGiB: Double {
            framesScanned == 0 ? 0 : Double(scanNanos) / 1e6 / (Double(framesScanned) * 4096 / Double(1 << 30))
        }
    }

    /// - Parameters:
    ///   - root: where /proc is (tests use a fake tree).
    ///   - chunkEntries: entries per pread (65536 = 512 KiB of flags = 256 MiB of RAM).
    ///   - memoryMap: the RAM to scan; nil reads /proc/iomem, and without usable addresses
    ///     there scans every PFN up to the end of /proc/kpageflags.
    public init(root: SysRoot = .host, chunkEntries: Int = 65536, memoryMap: PhysicalMemoryMap? = nil,
                logger: Logger = Logger(label: "balloond.hint.kpageflags")) throws(FreePageSourceError) {
        self.root = root
        self.logger = logger
        do { file = try KPageFile(path: root.path("/proc/kpageflags"), chunkEntries: chunkEntries) } catch { throw error.sourceError }
        scanRanges = (memoryMap ?? PhysicalMemoryMap.read(root: root))?.ramFrames
    }

    public func beginRound(id: UInt32) throws(FreePageSourceError) {
        roundActive = true
        rangeIndex = 0
        cursor = scanRanges?.first?.lowerBound ?? 0
        scanDone = scanRanges?.isEmpty ?? false
        runStart = nil
        runPages = 0
        pending = []
        lastScan = ScanStatistics()
        roundStartNanos = Sys.monotonicNanos()
    }

    public func nextBatch(maxRanges: Int, maxRangeBytes: UInt64) throws(FreePageSourceError) -> [GuestPhysicalRange] {
        guard roundActive, maxRanges > 0 else { return [] }
        let maxRunPages = max(1, maxRangeBytes / balloonPageSize)
        let started = Sys.monotonicNanos()
        defer { lastScan.scanNanos += Sys.monotonicNanos() - started }
        var out: [GuestPhysicalRange] = []

        func emitRun() {
            if let s = runStart, runPages > 0 {
                pending.append(GuestPhysicalRange(start: s * balloonPageSize, length: runPages * balloonPageSize))
            }
            runStart = nil
            runPages = 0
        }

        while !scanDone && pending.count < maxRanges {
            let end = scanRanges.map { $0[rangeIndex].upperBound } ?? UInt64.max
            let want = Int(min(UInt64(file.chunkEntries), end - cursor))
            let base = cursor
            let n: Int
            // The hot loop: plain masks and locals (this runs once per 4 KiB of RAM).
            let buddyMask = KPageFlags.buddy.rawValue
            let excludeMask = KPageFlags.notFreeMask
            var start = runStart
            var pages = runPages
            var free: UInt64 = 0
            var found: [GuestPhysicalRange] = []
            do {
                (n, _) = try file.read(startPFN: base, count: want) { entries in
                    var pfn = base
                    for i in entries.indices {
                        let v = UInt64(littleEndian: entries[i])
                        if v & buddyMask != 0 && v & excludeMask == 0 {
                            if start == nil { start = pfn }
                            pages += 1
                            free += 1
                            if pages == maxRunPages {
                                found.append(GuestPhysicalRange(start: start! * balloonPageSize, length: pages * balloonPageSize))
                                start = nil
                                pages = 0
                            }
                        } else if let s = start {
                            found.append(GuestPhysicalRange(start: s * balloonPageSize, length: pages * balloonPageSize))
                            start = nil
                            pages = 0
                        }
                        pfn += 1
                    }
                }
            } catch { throw error.sourceError }
            runStart = start
            runPages = pages
            pending += found
            lastScan.freeFrames += free
            lastScan.reads += 1
            lastScan.framesScanned += UInt64(n)
            cursor += UInt64(n)
            if n == 0 || cursor >= end {
                // The end of a RAM range (or of the file): a run never continues past a hole.
                emitRun()
                if let ranges = scanRanges, n > 0, rangeIndex + 1 < ranges.count {
                    rangeIndex += 1
                    cursor = ranges[rangeIndex].lowerBound
                } else {
                    scanDone = true
                }
            }
            // Stream: hand out what this chunk found rather than scanning on.
            if !pending.isEmpty { break }
        }
        if scanDone { emitRun() }
        let take = min(maxRanges, pending.count)
        out = Array(pending.prefix(take))
        pending.removeFirst(take)
        if scanDone && pending.isEmpty && !lastScan.finished {
            lastScan.finished = true
            logger.debug("kpageflags scan done", metadata: [
                "scanned_mib": "\((lastScan.framesScanned * 4096) >> 20)", "free_mib": "\((lastScan.freeFrames * 4096) >> 20)",
                "scan_ms": "\(lastScan.scanNanos / 1_000_000)", "ms_per_gib": "\(Int(lastScan.millisecondsPerGiB))",
                "round_ms": "\((Sys.monotonicNanos() - roundStartNanos) / 1_000_000)",
            ])
        }
        return out
    }

    /// Nothing is held: the pages were only observed.
    public func hintsApplied(_ ranges: [GuestPhysicalRange]) {}

    public func endRound() {
        roundActive = false
        pending = []
        scanDone = true
    }

    public func releaseAll() { endRound() }
}
