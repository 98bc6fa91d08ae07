#if canImport(Glibc)
import Glibc
#endif
import SystemPackage


/// Memory balloond holds that the device may read or write (balloon blocks, reported
/// blocks, hint chunks, hugetlb pool reservations, DMA pages): the one mapping funnel for it
/// (issue 13 item 1). Every mapping is `MAP_SHARED` from a `DeviceMemoryArena` memfd (4 KiB
/// shmem pages, or 2 MiB hugetlbfs pages) at a fresh file offset, so a guardian process
/// holding the memfds keeps the pages from the kernel until the device is stopped, even if
/// balloond is killed. It is given back in 2 MiB slots (slot `i` is `[address + i × 2 MiB,
/// +min(2 MiB, rest))`): munmap, then `fallocate(PUNCH_HOLE)` of the slot's file range, so
/// the balloon can release one block at a time; whatever is still mapped is released in deinit.
///
/// Memory safety: balloond never reads or writes this memory from Swift, except DMA pages
/// through `DMARegion` (`unsafeBase`). The only other accesses are the kernel's (`madvise`,
/// `mlock`, `MAP_POPULATE`) and `populateForWrite`'s fallback, which stores one byte per
/// 4 KiB page inside `[address, address + length)` and is only allowed while every slot is
/// still mapped (checked). Unmapping is per slot, each once.
@safe public final class OwnedAnonymousMapping {
    /// Which of the arena's files, and so which pages, back the mapping (`DeviceMemoryArena.Backing`).
    public typealias PageKind = DeviceMemoryArena.Backing

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
    public let arena: DeviceMemoryArena
    /// Where the mapping starts in the arena's file.
    public let fileOffset: Int
    private let base: UnsafeMutableRawPointer
    private var mapped: [Bool]

    /// Maps `length` bytes (a multiple of 4 KiB, or of 2 MiB for hugetlb) `MAP_SHARED` from
    /// `arena`.
    ///
    /// For `.hugeTLB2MiB` the kernel reserves every page at mmap time (no `MAP_NORESERVE`),
    /// allocating surplus pages within `nr_overcommit_hugepages` if the pool has too few
    /// free ones, and fails with ENOMEM when it cannot. With `populate`, `MAP_POPULATE` then
    /// faults the pages from that reservation, so a populated hugetlb mapping never raises
    /// SIGBUS later. Without it (`protection` PROT_NONE) the mapping only holds the
    /// reservation: the hugetlb pool hint source's way of keeping free pool pages.
    public init(length: Int, kind: PageKind, arena: DeviceMemoryArena, protection: Int32 = PROT_READ | PROT_WRITE,
                populate: Bool = true) throws(SystemCallError) {
        precondition(length > 0 && length % 4096 == 0, "length must be a positive multiple of 4 KiB")
        var flags = MAP_SHARED
        switch kind {
        case .small:
            break
        case .hugeTLB2MiB:
            precondition(length % Self.slotBytes == 0, "hugetlb mappings are whole 2 MiB pages")
            if populate { flags |= Int32(MAP_POPULATE) }
        case .hugeTLBReservation:
            precondition(length % Self.slotBytes == 0 && !populate, "reservations are whole 2 MiB pages, never faulted")
        }
        let file = try arena.file(kind)
        let offset = try arena.allocateOffset(length: length, backing: kind)
        do {
            unsafe base = try MappedMemory.map(length: length, protection: protection, flags: flags, descriptor: file.descriptor,
                                               offset: offset, path: file.path)
        } catch {
            arena.release(offset: offset, length: length, backing: kind)
            throw error
        }
        address = unsafe MappedMemory.address(of: base)
        self.length = length
        self.kind = kind
        self.arena = arena
        fileOffset = offset
        mapped = Array(repeating: true, count: (length + Self.slotBytes - 1) / Self.slotBytes)
    }

    /// The mapping's first byte, for the one type that may access it (`DMARegion`).
    var unsafeBase: UnsafeMutableRawPointer { unsafe base }

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

    /// Unmaps slot `i` and frees its pages (punch hole) (once; later calls do nothing).
    public func unmapSlot(_ i: Int) {
        guard mapped.indices.contains(i), mapped[i] else { return }
        mapped[i] = false
        let offset = i * Self.slotBytes
        let n = min(Self.slotBytes, length - offset)
        _ = unsafe munmap(base + offset, n)
        arena.release(offset: fileOffset + offset, length: n, backing: kind)
    }

    /// Unmaps and frees every slot still mapped.
    public func unmapAll() {
        for i in mapped.indices where mapped[i] { unmapSlot(i) }
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
