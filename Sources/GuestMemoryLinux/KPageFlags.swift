/// One 64-bit `/proc/kpageflags` entry (Documentation/admin-guide/mm/pagemap.rst,
/// uapi `linux/kernel-page-flags.h`): the flags of one 4 KiB page frame, by PFN.
///
/// Only the stable, documented bits are named. Two facts the free-page sources rely on:
/// - `buddy` (bit 10) is set on *every* page of a free buddy block, not only the head: since
///   Linux 4.x `stable_page_flags` also reports it for tail pages with a zero refcount that
///   `is_free_buddy_page` finds in a free block. So runs of buddy pages are free memory, with
///   no order needed. Pages on the per-CPU free lists are not marked: they are missed, never
///   wrongly included.
/// - a hugetlb page (free pool page or in use) has `huge` (bit 17) on all its frames,
///   `compoundHead` (bit 15) on its first and `compoundTail` (bit 16) on the others.
public struct KPageFlags: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let locked = KPageFlags(rawValue: 1 << 0)
    public static let error = KPageFlags(rawValue: 1 << 1)
    public static let referenced = KPageFlags(rawValue: 1 << 2)
    public static let uptodate = KPageFlags(rawValue: 1 << 3)
    public static let dirty = KPageFlags(rawValue: 1 << 4)
    public static let lru = KPageFlags(rawValue: 1 << 5)
    public static let active = KPageFlags(rawValue: 1 << 6)
    public static let slab = KPageFlags(rawValue: 1 << 7)
    public static let writeback = KPageFlags(rawValue: 1 << 8)
    public static let reclaim = KPageFlags(rawValue: 1 << 9)
    /// A free page in the buddy allocator.
    public static let buddy = KPageFlags(rawValue: 1 << 10)
    public static let mmap = KPageFlags(rawValue: 1 << 11)
    public static let anon = KPageFlags(rawValue: 1 << 12)
    public static let swapcache = KPageFlags(rawValue: 1 << 13)
    public static let swapbacked = KPageFlags(rawValue: 1 << 14)
    public static let compoundHead = KPageFlags(rawValue: 1 << 15)
    public static let compoundTail = KPageFlags(rawValue: 1 << 16)
    /// A hugetlb page (not THP).
    public static let huge = KPageFlags(rawValue: 1 << 17)
    public static let unevictable = KPageFlags(rawValue: 1 << 18)
    public static let hwpoison = KPageFlags(rawValue: 1 << 19)
    /// No struct page for this PFN (a hole, or offline memory).
    public static let noPage = KPageFlags(rawValue: 1 << 20)
    public static let ksm = KPageFlags(rawValue: 1 << 21)
    public static let thp = KPageFlags(rawValue: 1 << 22)
    public static let offline = KPageFlags(rawValue: 1 << 23)
    public static let zeroPage = KPageFlags(rawValue: 1 << 24)
    public static let idle = KPageFlags(rawValue: 1 << 25)
    public static let pageTable = KPageFlags(rawValue: 1 << 26)

    /// Flags that contradict "free buddy page" (defensive: the kernel sets none of them on one).
    public static let notFreeMask: UInt64 = KPageFlags([.noPage, .hwpoison, .offline, .slab, .mmap, .huge]).rawValue

    /// A free page in the buddy allocator, and nothing that contradicts it.
    public var isFreeBuddy: Bool { rawValue & Self.buddy.rawValue != 0 && rawValue & Self.notFreeMask == 0 }

    /// `KPF_MLOCKED` (a kernel-hacking flag, bit 33, which kpageflags reports too).
    public static let mlocked = KPageFlags(rawValue: 1 << 33)

    /// Flags that make an in-use page one memory offlining must not (or cannot) move: it is
    /// locked in memory (balloond's ring and balloon pages are: the device knows their
    /// addresses), a hugetlb page (balloond's DMA, balloon and report pages), kernel memory,
    /// or not a normal page at all.
    public static let unmovableMask: UInt64 = KPageFlags([.unevictable, .mlocked, .huge, .slab, .pageTable, .hwpoison, .offline, .noPage, .buddy]).rawValue

    /// An in-use page on an evictable LRU list (page cache or a process's anonymous memory):
    /// memory offlining migrates it (a copy; its owner keeps its contents at a new address).
    public var isMovableLRU: Bool { rawValue & Self.lru.rawValue != 0 && rawValue & Self.unmovableMask == 0 }

    /// The first frame of a hugetlb page.
    public var isHugeTLBHead: Bool { contains([.huge, .compoundHead]) && !contains(.compoundTail) }

    /// A non-head frame of a hugetlb page.
    public var isHugeTLBTail: Bool { contains([.huge, .compoundTail]) }

    private static let names: [(KPageFlags, String)] = [
        (.locked, "locked"), (.error, "error"), (.referenced, "referenced"), (.uptodate, "uptodate"),
        (.dirty, "dirty"), (.lru, "lru"), (.active, "active"), (.slab, "slab"), (.writeback, "writeback"),
        (.reclaim, "reclaim"), (.buddy, "buddy"), (.mmap, "mmap"), (.anon, "anon"), (.swapcache, "swapcache"),
        (.swapbacked, "swapbacked"), (.compoundHead, "compound_head"), (.compoundTail, "compound_tail"),
        (.huge, "huge"), (.unevictable, "unevictable"), (.hwpoison, "hwpoison"), (.noPage, "nopage"),
        (.ksm, "ksm"), (.thp, "thp"), (.offline, "offline"), (.zeroPage, "zero_page"), (.idle, "idle"),
        (.pageTable, "pgtable"),
    ]

    public var description: String {
        let set = Self.names.filter { contains($0.0) }.map(\.1)
        return set.isEmpty ? "[]" : "[" + set.joined(separator: ",") + "]"
    }
}
