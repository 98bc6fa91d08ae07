#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// MAP_HUGE_2MB: log2(2 MiB) << MAP_HUGE_SHIFT (26), from uapi `linux/mman.h`.
private let mapHuge2MB: Int32 = 21 << 26

/// A private anonymous mapping that balloond holds as balloon memory: 4 KiB pages, or 2 MiB
/// hugetlb pages. It is given back in 2 MiB slots (slot `i` is `[address + i × 2 MiB,
/// +min(2 MiB, rest))`), so the balloon can release one block at a time; whatever is still
/// mapped is unmapped in deinit.
///
/// Memory safety: balloond never reads or writes this memory from Swift. The only accesses
/// are the kernel's (`madvise`, `mlock`, `MAP_POPULATE`) and `populateForWrite`'s fallback,
/// which stores one byte per 4 KiB page inside `[address, address + length)` and is only
/// allowed while every slot is still mapped (checked). Unmapping is per slot, each once.
public final class OwnedAnonymousMapping {
    public enum PageKind: Hashable, Sendable {
        /// Ordinary 4 KiB pages (`MAP_PRIVATE | MAP_ANONYMOUS`), populated by the caller.
        case small
        /// 2 MiB hugetlb pages (`MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB |
        /// MAP_POPULATE`): reserved at mmap time and faulted in by the mmap itself.
        case hugeTLB2MiB
    }

    /// Slot size: one balloon block.
    public static let slotBytes = 2 << 20
    // uapi asm-generic/mman-common.h (Swift does not import all of them).
    public static let adviceDontFork: Int32 = 10
    public static let adviceUnmergeable: Int32 = 13
    public static let adviceNoHugePage: Int32 = 15
    public static let advicePopulateWrite: Int32 = 23

    public let address: UInt
    public let length: Int
    public let kind: PageKind
    private let base: UnsafeMutableRawPointer
    private var mapped: [Bool]

    /// Maps `length` bytes (a multiple of 4 KiB, or of 2 MiB for hugetlb).
    ///
    /// For `.hugeTLB2MiB` the kernel reserves every page at mmap time (no `MAP_NORESERVE`),
    /// allocating surplus pages within `nr_overcommit_hugepages` if the pool has too few
    /// free ones, and fails with ENOMEM when it cannot. `MAP_POPULATE` then faults the pages
    /// from that reservation, so a populated hugetlb mapping never raises SIGBUS later.
    public init(length: Int, kind: PageKind) throws(SystemCallError) {
        precondition(length > 0 && length % 4096 == 0, "length must be a positive multiple of 4 KiB")
        var flags = MAP_PRIVATE | MAP_ANONYMOUS
        if kind == .hugeTLB2MiB {
            precondition(length % Self.slotBytes == 0, "hugetlb mappings are whole 2 MiB pages")
            flags |= Int32(MAP_HUGETLB) | mapHuge2MB | Int32(MAP_POPULATE)
        }
        base = try unsafe MappedMemory.map(length: length, protection: PROT_READ | PROT_WRITE, flags: flags)
        address = unsafe MappedMemory.address(of: base)
        self.length = length
        self.kind = kind
        mapped = Array(repeating: true, count: (length + Self.slotBytes - 1) / Self.slotBytes)
    }

    deinit {
        for i in mapped.indices where mapped[i] { unmapSlot(i) }
    }

    public var slotCount: Int { mapped.count }
    public var mappedSlotCount: Int { mapped.lazy.filter { $0 }.count }
    private var fullyMapped: Bool { !mapped.contains(false) }

    /// The virtual range of slot `i`.
    public func slot(_ i: Int) -> (address: UInt, length: Int) {
        precondition(mapped.indices.contains(i))
        let offset = i * Self.slotBytes
        return (address + UInt(offset), min(Self.slotBytes, length - offset))
    }

    /// Unmaps slot `i` (once; later calls do nothing).
    public func unmapSlot(_ i: Int) {
        guard mapped.indices.contains(i), mapped[i] else { return }
        mapped[i] = false
        let offset = i * Self.slotBytes
        _ = unsafe munmap(base + offset, min(Self.slotBytes, length - offset))
    }

    /// `madvise(advice)` over the whole mapping (before any slot is unmapped).
    public func advise(_ advice: Int32) throws(SystemCallError) {
        precondition(fullyMapped, "advise before unmapping slots")
        _ = try Sys.call("madvise(\(advice))") { unsafe madvise(base, length, advice) }
    }

    /// Faults every page in for write: `MADV_POPULATE_WRITE` (Linux ≥ 5.14), or, when the
    /// kernel does not know it (EINVAL), one byte stored per 4 KiB page. Returns whether
    /// MADV_POPULATE_WRITE was used. ENOMEM means the kernel could not get the memory.
    @discardableResult
    public func populateForWrite() throws(SystemCallError) -> Bool {
        precondition(fullyMapped, "populate before unmapping slots")
        do {
            try advise(Self.advicePopulateWrite)
            return true
        } catch where error.errno == .invalidArgument {
            unsafe MappedMemory.touch(base, length: length, stride: 4096)
            return false
        }
    }

    /// `mlock` of the whole mapping: resident and not reclaimable (not pinned: see the
    /// callers' notes on migration).
    public func lock() throws(SystemCallError) {
        precondition(fullyMapped, "lock before unmapping slots")
        try unsafe MappedMemory.lock(base, length: length)
    }
}
