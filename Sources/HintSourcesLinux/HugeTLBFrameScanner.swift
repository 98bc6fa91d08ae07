import GuestMemoryLinux
import PlatformLinux

/// Finds the 2 MiB hugetlb pool pages that nobody has mapped, by PFN: a frame whose
/// `/proc/kpageflags` entry has `KPF_HUGE` and `KPF_COMPOUND_HEAD` (and not
/// `KPF_COMPOUND_TAIL`), whose next 2 MiB frame is not a tail of the same page (that would
/// be a 1 GiB page), and whose `/proc/kpagecount` is 0.
///
/// A 2 MiB hugetlb page always starts on a 2 MiB-aligned PFN, so only every 512th entry is
/// read (one 8-byte pread per 2 MiB of RAM), not the whole file: for 1 GiB of RAM that is 512
/// small reads instead of 2 MiB of flags, most of whose cost is the kernel's per-page work.
///
/// "Mapped by nobody" is not "free": a hugetlbfs file keeps its pages in the page cache with
/// mapcount 0. The source therefore only uses this with no foreign in-use pool pages and
/// checks that the number found equals `free_hugepages`.
final class HugeTLBFrameScanner {
    private let flags: KPageFile
    private let counts: KPageFile
    private let ranges: [Range<UInt64>]?
    /// Frames read by the last scan (for statistics).
    private(set) var lastReads = 0

    init(root: SysRoot, memoryMap: PhysicalMemoryMap?) throws(GuestMemoryError) {
        flags = try KPageFile(path: root.path("/proc/kpageflags"), chunkEntries: 1)
        counts = try KPageFile(path: root.path("/proc/kpagecount"), chunkEntries: 1)
        ranges = (memoryMap ?? PhysicalMemoryMap.read(root: root))?.ramFrames
    }

    static let framePages: UInt64 = 512

    /// Head PFNs of all unmapped 2 MiB hugetlb pages, ascending, without `excluding`.
    func unmappedPoolFrames(excluding: Set<UInt64>) throws(GuestMemoryError) -> [UInt64] {
        var found: [UInt64] = []
        lastReads = 0
        let step = Self.framePages
        let scan: [Range<UInt64>] = ranges ?? [0..<UInt64.max]
        for r in scan {
            var pfn = (r.lowerBound + step - 1) / step * step
            while pfn + step <= r.upperBound {
                lastReads += 1
                guard let raw = try flags.entry(pfn: pfn) else { break }
                if try isUnmappedPoolFrame(pfn, raw: raw), !excluding.contains(pfn) { found.append(pfn) }
                pfn += step
            }
        }
        return found
    }

    /// Whether `pfn` is (still) the head of an unmapped 2 MiB hugetlb page.
    func isUnmappedPoolFrame(_ pfn: UInt64, raw: UInt64? = nil) throws(GuestMemoryError) -> Bool {
        var value = raw
        if value == nil { value = try flags.entry(pfn: pfn) }
        guard let value, KPageFlags(rawValue: value).isHugeTLBHead else { return false }
        if let next = try flags.entry(pfn: pfn + Self.framePages), KPageFlags(rawValue: next).isHugeTLBTail {
            return false  // a gigantic (1 GiB) page, not one of the 2 MiB pool's
        }
        guard let count = try counts.entry(pfn: pfn) else { return false }
        return count == 0
    }
}
