import GuestMemoryLinux
import BalloonBlocks
import PlatformLinux

/// Why a Linux balloon backend cannot take or keep memory. The driver sees it inside a
/// `BalloonMemoryError`.
public enum LinuxBalloonMemoryError: Error, Hashable, Sendable, CustomStringConvertible {
    /// Mapping a taken 2 MiB page in the IOMMU (vfio) failed.
    case deviceMappingFailed(VFIOError)
    /// No `nr_overcommit_hugepages` for 2 MiB pages (`hugePagesDirectory` is the per-size
    /// sysfs directory under the root).
    case noOvercommitSetting(hugePagesDirectory: String)
    /// /proc/meminfo (or PSI) could not be read before taking memory.
    case cannotReadMemoryState(GuestMemoryError)
    /// `nr_overcommit_hugepages` holds `value`, which cannot be raised by `raiseBy`.
    case overcommitOverflow(path: String, value: UInt64, raiseBy: Int)
    /// `nr_overcommit_hugepages` could not be raised.
    case cannotRaiseOvercommit(path: String, GuestMemoryError)
    /// `compact_unevictable_allowed` could not be set to 0.
    case compactionNotPrevented(path: String, GuestMemoryError)
    /// The page provider could not map the memory.
    case mapFailed(BalloonMapFailure)
    /// The PFNs of just-mapped balloon pages could not be read.
    case cannotReadPFNs(BalloonPageKind, GuestMemoryError)
    /// Hugetlb page `index` of a populated mapping is not one present, 2 MiB-aligned page.
    case badHugePage(index: Int, HugeTLBPageProblem)
    /// /proc/self/pagemap gave `entries` entries for `pages` pages.
    case pagemapCount(entries: Int, pages: Int)
    /// Page `index` of a populated, locked mapping is not present.
    case pageNotPresent(index: Int, entry: PagemapEntry)
    /// /proc/self/pagemap shows PFN 0 (hidden without CAP_SYS_ADMIN).
    case pfnsHidden
    /// Two pages of a locked mapping have the same frame.
    case sharedFrame

    public var description: String {
        switch self {
        case .noOvercommitSetting(let directory):
            return "this kernel has no nr_overcommit_hugepages for 2 MiB hugetlb pages (neither \(directory) nor /proc/sys/vm/nr_overcommit_hugepages with Hugepagesize 2048 kB): it needs CONFIG_HUGETLBFS"
        case .deviceMappingFailed(let e): return "cannot map a balloon page for the device: \(e)"
        case .cannotReadMemoryState(let e): return "cannot read the guest's memory state: \(e)"
        case .overcommitOverflow(let path, let value, let raiseBy):
            return "\(path) is \(value): raising it by \(raiseBy) would overflow; set it to a sane value (e.g. 0) and restart balloond"
        case .cannotRaiseOvercommit(let path, let e): return "cannot raise \(path): \(e)"
        case .compactionNotPrevented(let path, let e):
            return "cannot set \(path) to 0: \(e). Without it, compaction may move locked balloon pages and QEMU would discard their new owner's data; run balloond as root"
        case .mapFailed(let f): return f.description
        case .cannotReadPFNs(let kind, let e): return "cannot read the PFNs of \(kind): \(e)"
        case .badHugePage(let index, let problem): return "hugetlb page \(index) of a populated mapping: \(problem)"
        case .pagemapCount(let entries, let pages): return "pagemap returned \(entries) entries for \(pages) pages"
        case .pageNotPresent(let index, let entry):
            return "page \(index) of a populated, locked mapping is not present in /proc/self/pagemap (\(entry))"
        case .pfnsHidden: return pfnsHiddenMessage
        case .sharedFrame: return "two pages of a locked mapping share a frame (not populated for write?); refusing to hand out their PFNs"
        }
    }
}

/// Which balloon pages (for messages).
public enum BalloonPageKind: Hashable, Sendable, CustomStringConvertible {
    /// 2 MiB hugetlb pages (`HugeTLBBalloonMemory`).
    case hugeTLB
    /// Locked anonymous 4 KiB pages (`LockedAnonymousBalloonMemory`).
    case lockedAnonymous

    public var description: String {
        switch self {
        case .hugeTLB: return "balloon hugetlb pages"
        case .lockedAnonymous: return "locked balloon pages"
        }
    }
}

/// What is wrong with one hugetlb page's 512 pagemap entries.
public enum HugeTLBPageProblem: Hashable, Sendable, CustomStringConvertible {
    /// Not 512 entries.
    case entryCount(expected: Int, got: Int)
    /// The head page is not present (or swapped).
    case notPresent(PagemapEntry)
    /// PFN 0: the kernel hides PFNs without CAP_SYS_ADMIN.
    case pfnsHidden
    /// The head PFN is not 2 MiB aligned.
    case notAligned(pfn: UInt64)
    /// The page is no longer at the head PFN `take` found.
    case moved(from: UInt64, to: UInt64)
    /// A subpage is not the next frame after the head.
    case notContiguous(subpage: Int, entry: PagemapEntry, expected: UInt64)

    public var description: String {
        switch self {
        case .entryCount(let expected, let got): return "expected \(expected) pagemap entries, got \(got)"
        case .notPresent(let e): return "not present in /proc/self/pagemap (\(e))"
        case .pfnsHidden: return pfnsHiddenMessage
        case .notAligned(let pfn): return "its PFN 0x\(String(pfn, radix: 16)) is not 2 MiB aligned, so it is not one 2 MiB hugetlb page"
        case .moved(let from, let to): return "moved from PFN 0x\(String(from, radix: 16)) to 0x\(String(to, radix: 16))"
        case .notContiguous(let subpage, let e, let expected):
            return "subpage \(subpage) is \(e), not PFN 0x\(String(expected, radix: 16)): not one contiguous 2 MiB page"
        }
    }
}

private let pfnsHiddenMessage = "/proc/self/pagemap shows PFN 0: the kernel hides PFNs from processes without CAP_SYS_ADMIN; run balloond as root and open pagemap while privileged"

extension LinuxBalloonMemoryError {
    /// The error as the driver sees it from a balloon backend.
    var balloonError: BalloonMemoryError { .failed(self) }
}
