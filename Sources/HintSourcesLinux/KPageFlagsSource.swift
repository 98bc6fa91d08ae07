import GuestMemoryLinux
import FreePages
import Logging
import PlatformLinux
import VirtioCore

/// Observed free pages: runs of `KPF_BUDDY` pages from `/proc/kpageflags`, read in chunks
/// after the round's cmd id and streamed chunk by chunk, **highest address first**.
/// Touches nothing (`--hint-source kpageflags`).
///
/// Each chunk's free runs leave as soon as it is read (a run is cut at the chunk's end, so
/// no hint waits for the next read), each as one descriptor of up to a chunk's size. The
/// driver gathers the runs found while an earlier hint element is still out into the next
/// element (QEMU applies about one element per 50 ms send window of its migration thread).
///
/// Why top-down: QEMU's migration thread sends RAM from offset 0 upwards and on q35 a
/// higher guest-physical address is a higher `pc.ram` offset (GPA [4 GiB, …) is offset
/// [2 GiB, …) above 2 GiB of RAM), so a hint is worth something only while the sender has
/// not passed it. Scanning from the top hints what the sender reaches last first; where the
/// two meet, everything above is saved. Scanning from the bottom chases the sender and, when
/// slower than it, saves nothing.
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
/// write would be lost even under TCG. The order of the scan changes none of this: each page
/// is hinted only after its own entry, read after the sync, showed it free.
public final class KPageFlagsSource: FreePageSource {
    public let name = "kpageflags"
    public let ownership = FreePageOwnership.observed
    public var heldBytes: UInt64 { 0 }

    public let root: SysRoot
    private let file: KPageFile
    /// PFN ranges to scan, sorted ascending (scanned from the last one down).
    private let scanRanges: [Range<UInt64>]
    private let logger: Logger

    // Scan state of the current round: ranges are scanned from `scanRanges[rangeIndex]`'s
    // top down to its bottom, then the range below. `cursor` is the exclusive upper end of
    // what is still to read. No run is open between reads (each is cut at its chunk's end).
    private var roundActive = false
    private var rangeIndex = 0
    private var cursor: UInt64 = 0
    private var scanDone = true
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
    ///   - chunkEntries: entries per pread (8192 = 64 KiB of flags = 32 MiB of RAM): the
    ///     longest hint, and how much scanned memory at most waits unhinted.
    ///   - memoryMap: the RAM to scan; nil reads /proc/iomem, and without usable addresses
    ///     there scans every PFN up to the end of /proc/kpageflags (found by probing reads:
    ///     the file reports no size).
    public init(root: SysRoot = .host, chunkEntries: Int = 8192, memoryMap: PhysicalMemoryMap? = nil,
                logger: Logger = Logger(label: "balloond.hint.kpageflags")) throws(FreePageSourceError) {
        self.root = root
        self.logger = logger
        do { file = try KPageFile(path: root.path("/proc/kpageflags"), chunkEntries: chunkEntries) } catch { throw error.sourceError }
        if let ranges = (memoryMap ?? PhysicalMemoryMap.read(root: root))?.ramFrames {
            scanRanges = ranges.sorted { $0.lowerBound < $1.lowerBound }.filter { !$0.isEmpty }
        } else {
            let end: UInt64
            do { end = try Self.endOfFile(file) } catch { throw error.sourceError }
            scanRanges = end > 0 ? [0..<end] : []
        }
    }

    /// The first PFN past the end of the file: a read there returns nothing.
    private static func endOfFile(_ file: KPageFile) throws(GuestMemoryError) -> UInt64 {
        guard try file.entry(pfn: 0) != nil else { return 0 }
        var present: UInt64 = 0  // known to have an entry
        var step: UInt64 = 1
        var absent = UInt64.max  // known to have none (or beyond any file)
        while absent == UInt64.max {
            let probe = present + step
            if probe >= 1 << 52 { absent = probe; break }  // 2^52 frames: beyond any address space
            if try file.entry(pfn: probe) != nil { present = probe; step *= 2 } else { absent = probe }
        }
        while absent - present > 1 {
            let mid = present + (absent - present) / 2
            if try file.entry(pfn: mid) != nil { present = mid } else { absent = mid }
        }
        return absent
    }

    public func beginRound(id: UInt32) throws(FreePageSourceError) {
        roundActive = true
        rangeIndex = scanRanges.count - 1
        cursor = scanRanges.last?.upperBound ?? 0
        scanDone = scanRanges.isEmpty
        pending = []
        lastScan = ScanStatistics()
        roundStartNanos = Sys.monotonicNanos()
    }

    public func nextBatch(maxRanges: Int, maxRangeBytes: UInt64) throws(FreePageSourceError) -> [GuestPhysicalRange] {
        guard roundActive, maxRanges > 0 else { return [] }
        let maxRunPages = max(1, maxRangeBytes / balloonPageSize)
        let started = Sys.monotonicNanos()
        defer { lastScan.scanNanos += Sys.monotonicNanos() - started }

        while !scanDone && pending.count < maxRanges {
            let bottom = scanRanges[rangeIndex].lowerBound
            let want = Int(min(UInt64(file.chunkEntries), cursor - bottom))
            let base = cursor - UInt64(want)
            let n: Int
            // The hot loop: plain masks and locals (this runs once per 4 KiB of RAM), walking
            // the chunk from its last entry down.
            let buddyMask = KPageFlags.buddy.rawValue
            let excludeMask = KPageFlags.notFreeMask
            var top: UInt64?  // the open run is [top - pages, top)
            var pages: UInt64 = 0
            var free: UInt64 = 0
            var found: [GuestPhysicalRange] = []
            func closeRun() {
                if let t = top { found.append(GuestPhysicalRange(start: (t - pages) * balloonPageSize, length: pages * balloonPageSize)) }
                top = nil
                pages = 0
            }
            do {
                (n, _) = try file.read(startPFN: base, count: want) { entries in
                    var i = entries.count
                    while i > 0 {
                        i -= 1
                        let v = UInt64(littleEndian: entries[i])
                        if v & buddyMask != 0 && v & excludeMask == 0 {
                            if top == nil { top = base + UInt64(i) + 1 }
                            pages += 1
                            free += 1
                            if pages == maxRunPages { closeRun() }
                        } else if top != nil {
                            closeRun()
                        }
                    }
                }
            } catch { throw error.sourceError }
            // The chunk's end: what it found leaves now rather than after the next read.
            closeRun()
            pending += found
            lastScan.freeFrames += free
            lastScan.reads += 1
            lastScan.framesScanned += UInt64(n)
            cursor = base
            if cursor <= bottom {
                // The bottom of a RAM range: the next read starts at the top of the one below.
                if rangeIndex > 0 {
                    rangeIndex -= 1
                    cursor = scanRanges[rangeIndex].upperBound
                } else {
                    scanDone = true
                }
            }
            // Stream: hand out what this chunk found rather than scanning on.
            if !pending.isEmpty { break }
        }
        let take = min(maxRanges, pending.count)
        let out = Array(pending.prefix(take))
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

    /// A chunk's worth: a free run is never longer (it is cut at each chunk's end).
    public var preferredMaxRangeBytes: UInt64? { UInt64(file.chunkEntries) * balloonPageSize }

    /// Nothing is held: the pages were only observed.
    public func hintsApplied(_ ranges: [GuestPhysicalRange]) {}

    public func endRound() {
        roundActive = false
        pending = []
        scanDone = true
    }

    public func releaseAll() { endRound() }
}
