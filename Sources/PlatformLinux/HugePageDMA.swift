#if canImport(Glibc)
import Glibc
#endif
import Logging
import VirtioCore
import VirtioQueue

/// MAP_HUGE_2MB: log2(2 MiB) << MAP_HUGE_SHIFT (26), from uapi `linux/mman.h`; Swift does
/// not import the computed macro.
private let mapHuge2MB: Int32 = 21 << 26

/// DMA memory from one 2 MiB hugetlb page: physically contiguous (so a 1024-entry queue's
/// 16 KiB descriptor table fits), and not moved by compaction or THP in practice
/// (field-notes §5.6–5.8). Allocations are carved from it by a `DMAArena`.
///
/// If the pool has no free page it grows `nr_hugepages` by one and shrinks it again when
/// the page is unmapped, i.e. when this allocator and every region it handed out are gone.
/// Process exit through `exit()` skips that: let the objects go (return from main).
public final class HugePageDMAAllocator: DMAAllocator {
    /// The whole hugepage.
    public let region: DMARegion
    private let arena: DMAArena
    /// Whether `nr_hugepages` was raised for this page (and will be lowered on release).
    public let grewPool: Bool

    /// - Parameter pagemap: opened while privileged (see `PagemapResolver`).
    public init(root: SysRoot = .host, pagemap: PagemapResolver, logger: Logger = Logger(label: "balloond.dma")) throws(DMAError) {
        let pool = HugePagePool(root: root)
        guard pool.isSupported() else {
            throw DMAError("this kernel has no 2 MiB hugetlb pages (\(root.path("/sys/kernel/mm/hugepages/hugepages-2048kB")) is missing); it needs CONFIG_HUGETLBFS")
        }
        let grew: Bool
        do { grew = try pool.reserveOne() } catch { throw DMAError("no free 2 MiB hugepage: \(error)") }
        if grew { logger.info("raised \(pool.countPath) by one for balloond's ring memory; it is lowered again at exit") }
        func undo() {
            if grew { try? pool.giveBackOne() }
        }

        let size = HugePagePool.pageSize
        let base: UnsafeMutableRawPointer
        do {
            unsafe base = try MappedMemory.map(length: size, protection: PROT_READ | PROT_WRITE,
                                        flags: MAP_SHARED | MAP_ANONYMOUS | Int32(MAP_HUGETLB) | Int32(MAP_POPULATE) | mapHuge2MB)
        } catch {
            undo()
            throw DMAError("mmap of a 2 MiB hugepage failed: \(error); check HugePages_Free in /proc/meminfo")
        }
        let unmap = unsafe MappedMemory.unmapper(base, length: size)
        let physical: PhysicalAddress
        do {
            try unsafe MappedMemory.lock(base, length: size)
            // Never share the page with a child: copy-on-write would give the parent a new
            // physical page behind the device's back.
            _ = unsafe madvise(base, size, MADV_DONTFORK)
            unsafe MappedMemory.touch(base, length: size, stride: 4096)
            physical = try unsafe Self.resolve(base, size: size, pagemap: pagemap)
        } catch {
            unmap()
            undo()
            throw DMAError("hugepage DMA setup failed: \(error)")
        }
        grewPool = grew
        let giveBack: () -> Void = {
            unmap()
            if grew {
                do { try pool.giveBackOne() } catch { logger.warning("could not lower \(pool.countPath) again: \(error)") }
            }
        }
        region = unsafe DMARegion(unsafeBase: base, physicalAddress: physical, size: size, release: giveBack)
        arena = DMAArena(region: region)
        logger.debug("hugepage DMA region at \(physical) (\(size) bytes)")
    }

    /// Bytes still free in the page.
    public var bytesFree: Int { arena.bytesFree }

    public func allocate(byteCount: Int, alignment: Int) throws(DMAError) -> DMARegion {
        try arena.allocate(byteCount: byteCount, alignment: alignment)
    }

    /// The physical address of the page, checked to be one contiguous 2 MiB frame: the
    /// first 4 KiB frame is 2 MiB aligned and the last one is where contiguity puts it.
    private static func resolve(_ base: UnsafeMutableRawPointer, size: Int, pagemap: PagemapResolver) throws(PlatformError) -> PhysicalAddress {
        let va = unsafe MappedMemory.address(of: base)
        let first = try pagemap.physicalAddress(ofVirtual: va)
        let lastOffset = size - pagemap.pageSize
        let last = try pagemap.physicalAddress(ofVirtual: va + UInt(lastOffset))
        guard first.value % UInt64(size) == 0, last.value == first.value + UInt64(lastOffset) else {
            throw .hugePages("the hugepage at \(first) is not one aligned contiguous 2 MiB frame (last 4 KiB at \(last)); was it backed by a hugetlb page?")
        }
        return first
    }
}

/// Fallback DMA memory without hugepages: every allocation gets its own locked 4 KiB page
/// (so it is physically contiguous by itself). Each ring part of a queue with ≤ 256 entries
/// fits in a page (virtio-balloon.md §1.7), so shrink the 1024-entry free-page queue.
///
/// Weaker than hugepages: mlock does not pin, and the kernel may migrate a 4 KiB page
/// (compaction, NUMA balancing) behind the device's back (field-notes §5.6).
public final class PageDMAAllocator: DMAAllocator {
    public let pagemap: PagemapResolver
    public let pageSize: Int
    /// Pages handed out so far.
    public private(set) var pagesAllocated = 0

    public init(pagemap: PagemapResolver) {
        self.pagemap = pagemap
        self.pageSize = pagemap.pageSize
    }

    public func allocate(byteCount: Int, alignment: Int) throws(DMAError) -> DMARegion {
        guard byteCount > 0 else { throw DMAError("empty DMA allocation") }
        guard byteCount <= pageSize else {
            throw DMAError("\(byteCount) bytes of physically contiguous DMA memory wanted, but without hugepages balloond only has single \(pageSize)-byte pages: queues must be ≤ 256 entries without hugepages (or make a 2 MiB hugepage available: echo 1 > /proc/sys/vm/nr_hugepages)")
        }
        guard alignment > 0, alignment <= pageSize, alignment & (alignment - 1) == 0 else {
            throw DMAError("alignment \(alignment) must be a power of two ≤ \(pageSize)")
        }
        let base: UnsafeMutableRawPointer
        do {
            unsafe base = try MappedMemory.map(length: pageSize, protection: PROT_READ | PROT_WRITE,
                                        flags: MAP_PRIVATE | MAP_ANONYMOUS | Int32(MAP_POPULATE))
        } catch { throw DMAError("mmap of a DMA page failed: \(error)") }
        let unmap = unsafe MappedMemory.unmapper(base, length: pageSize)
        let physical: PhysicalAddress
        do {
            try unsafe MappedMemory.lock(base, length: pageSize)
            _ = unsafe madvise(base, pageSize, MADV_DONTFORK)
            unsafe MappedMemory.touch(base, length: pageSize, stride: pageSize)
            physical = try unsafe pagemap.physicalAddress(ofVirtual: MappedMemory.address(of: base))
        } catch {
            unmap()
            if let e = error as? SystemCallError, e.errno == .resourceTemporarilyUnavailable || e.errno == .noMemory {
                throw DMAError("mlock of a DMA page failed: \(e); raise RLIMIT_MEMLOCK (ulimit -l) or run as root")
            }
            throw DMAError("DMA page setup failed: \(error)")
        }
        pagesAllocated += 1
        let region = unsafe DMARegion(unsafeBase: base, physicalAddress: physical, size: byteCount, release: unmap)
        region.zero()
        return region
    }
}

/// Picks balloond's DMA memory: one 2 MiB hugepage if one can be had, else single locked
/// pages (logged as a warning, with the reason). Opens /proc/self/pagemap once for it.
///
/// - Returns: the allocator and a one-line description for logs and `balloond status`.
public func makeDMAAllocator(root: SysRoot = .host, logger: Logger) throws(DMAError) -> (allocator: DMAAllocator, description: String) {
    let pagemap: PagemapResolver
    do { pagemap = try PagemapResolver(root: root) } catch { throw DMAError(error.description) }
    do {
        let huge = try HugePageDMAAllocator(root: root, pagemap: pagemap, logger: logger)
        return (huge, "one 2 MiB hugepage at \(huge.region.physicalAddress)\(huge.grewPool ? " (nr_hugepages raised by one)" : "")")
    } catch {
        logger.warning("no hugepage for DMA memory (\(error)); falling back to locked 4 KiB pages: queues are limited to 256 entries and pages are not pinned against migration")
        return (PageDMAAllocator(pagemap: pagemap), "locked 4 KiB pages (no hugepage: \(error))")
    }
}
