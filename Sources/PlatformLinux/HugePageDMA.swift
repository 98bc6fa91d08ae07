#if canImport(Glibc)
import Glibc
#endif
import Logging
import VirtioCore
import VirtioQueue

/// DMA memory from one 2 MiB hugetlb page: physically contiguous (so a 1024-entry queue's
/// 16 KiB descriptor table fits), and not moved by compaction or THP in practice
/// (docs/userspace-pci.md §6–8). Allocations are carved from it by a `DMAArena`.
///
/// If the pool has no free page it grows `nr_hugepages` by one and shrinks it again when
/// the page is unmapped, i.e. when this allocator and every region it handed out are gone.
/// Process exit through `exit()` skips that: let the objects go (return from main).
public final class HugePageDMAAllocator: DMAAllocator, DMAPlacementCheck {
    /// The whole hugepage.
    public let region: DMARegion
    private let bumpArena: DMAArena
    /// Whether `nr_hugepages` was raised for this page (and will be lowered on release).
    public let grewPool: Bool
    private let pagemapResolver: PagemapResolver
    private let virtualBase: UInt

    /// - Parameters:
    ///   - pagemap: opened while privileged (see `PagemapResolver`).
    ///   - arena: where the page comes from (its hugetlbfs memfd).
    ///   - deviceMapper: with vfio, maps the page in the IOMMU at its guest-physical address
    ///     (IOVA = GPA, so ring addresses mean the same to the device with or without
    ///     ACCESS_PLATFORM), and unmaps it before the page is freed.
    public init(root: SysRoot = .host, pagemap: PagemapResolver, arena: DeviceMemoryArena, deviceMapper: DeviceAddressMapper? = nil,
                logger: Logger = Logger(label: "balloond.dma")) throws(DMAError) {
        let pool = HugePagePool(root: root)
        guard pool.isSupported() else {
            throw .platform(DMAMemoryError.noHugeTLB(missing: root.path("/sys/kernel/mm/hugepages/hugepages-2048kB")))
        }
        let grew: Bool
        do { grew = try pool.reserveOne() } catch { throw .platform(DMAMemoryError.noFreeHugePage(error)) }
        if grew {
            logger.info("raised \(pool.countPath) by one for balloond's ring memory; it is lowered again at exit (by the guardian if balloond is killed)")
            arena.poolChangeObserver?(true)
        }
        func undo() {
            guard grew else { return }
            arena.poolChangeObserver?(false)
            try? pool.giveBackOne()
        }

        let size = HugePagePool.pageSize
        let mapping: OwnedAnonymousMapping
        do { mapping = try OwnedAnonymousMapping(length: size, kind: .hugeTLB2MiB, arena: arena) } catch {
            undo()
            throw .platform(DMAMemoryError.hugePageMapFailed(error))
        }
        let base = unsafe mapping.unsafeBase
        let physical: PhysicalAddress
        do throws(PlatformError) {
            do throws(SystemCallError) {
                try mapping.lock()
                // Never share the page with a child: copy-on-write would give the parent a new
                // physical page behind the device's back.
                try mapping.advise(OwnedAnonymousMapping.adviceDontFork)
            } catch { throw .system(error) }
            unsafe MappedMemory.touch(base, length: size, stride: 4096)
            physical = try unsafe Self.resolve(base, size: size, pagemap: pagemap)
        } catch {
            mapping.unmapAll()
            undo()
            throw .platform(DMAMemoryError.hugePageSetupFailed(error))
        }
        if let deviceMapper {
            do throws(DMAMemoryError) {
                do { try deviceMapper.map(virtualAddress: mapping.address, length: size, at: physical.value) } catch { throw .iommuMapFailed(error) }
                // Pinning may migrate a page first (out of ZONE_MOVABLE); then its IOVA would
                // no longer be its address, and another page could claim that IOVA later.
                let now: PhysicalAddress
                do { now = try unsafe Self.resolve(base, size: size, pagemap: pagemap) } catch {
                    try? deviceMapper.unmap(deviceAddress: physical.value, length: size)
                    throw .hugePageSetupFailed(error)
                }
                guard now == physical else {
                    try? deviceMapper.unmap(deviceAddress: physical.value, length: size)
                    throw .hugePageMoved(from: physical, to: now)
                }
            } catch {
                mapping.unmapAll()
                undo()
                throw .platform(error)
            }
        }
        grewPool = grew
        pagemapResolver = pagemap
        virtualBase = mapping.address
        let giveBack: () -> Void = {
            // The device loses its way in before the page can go back to the kernel.
            if let deviceMapper {
                do { try deviceMapper.unmap(deviceAddress: physical.value, length: size) } catch {
                    logger.critical("\(error); keeping the ring hugepage (its IOMMU mapping is still live)")
                    return
                }
            }
            mapping.unmapAll()
            if grew {
                arena.poolChangeObserver?(false)
                do { try pool.giveBackOne() } catch { logger.warning("could not lower \(pool.countPath) again: \(error)") }
            }
        }
        region = unsafe DMARegion(unsafeBase: base, physicalAddress: physical, size: size, release: giveBack)
        bumpArena = DMAArena(region: region)
        logger.debug("hugepage DMA region at \(physical) (\(size) bytes)")
    }

    /// Bytes still free in the page.
    public var bytesFree: Int { bumpArena.bytesFree }

    /// The whole page: it is physically contiguous.
    public var largestAllocation: Int { region.size }

    public func verifyPlacement() throws(DMAError) {
        let first: PhysicalAddress
        do { first = try pagemapResolver.physicalAddress(ofVirtual: virtualBase) } catch {
            throw .platform(DMAMemoryError.hugePagePlacementUnreadable(error))
        }
        guard first == region.physicalAddress else {
            throw .platform(DMAMemoryError.hugePageMoved(from: region.physicalAddress, to: first))
        }
    }

    public func allocate(byteCount: Int, alignment: Int) throws(DMAError) -> DMARegion {
        try bumpArena.allocate(byteCount: byteCount, alignment: alignment)
    }

    /// The physical address of the page, checked to be one contiguous 2 MiB frame: the
    /// first 4 KiB frame is 2 MiB aligned and the last one is where contiguity puts it.
    private static func resolve(_ base: UnsafeMutableRawPointer, size: Int, pagemap: PagemapResolver) throws(PlatformError) -> PhysicalAddress {
        let va = unsafe MappedMemory.address(of: base)
        let first = try pagemap.physicalAddress(ofVirtual: va)
        let lastOffset = size - pagemap.pageSize
        let last = try pagemap.physicalAddress(ofVirtual: va + UInt(lastOffset))
        guard first.value % UInt64(size) == 0, last.value == first.value + UInt64(lastOffset) else {
            throw .hugePages(.notContiguous(first: first, last: last))
        }
        return first
    }
}

/// Something that keeps the kernel from migrating balloond's locked 4 KiB pages while it
/// is held: `vm.compact_unevictable_allowed=0` (GuestMemoryLinux's `CompactionHold`, shared by
/// every user of locked 4 KiB pages, with a state file so a restart after SIGKILL puts the
/// setting back). `acquire`/`release` nest.
public protocol MigrationHold: AnyObject {
    /// Makes sure compaction leaves locked pages alone from now on; throws when it cannot.
    func acquire() throws(MigrationHoldError)
    /// Undoes one `acquire`; the last one puts the setting back.
    func release()
}

/// Why a `MigrationHold` could not be taken.
public enum MigrationHoldError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The holder's own error, kept with its errno (e.g. a `SystemCallError` writing the sysctl).
    case holder(any ErrorReason)
    /// The message.
    public var reason: String { description }

    public var description: String {
        switch self {
        case .holder(let e): return e.description
        }
    }

    public static func == (a: MigrationHoldError, b: MigrationHoldError) -> Bool {
        switch (a, b) {
        case let (.holder(e1), .holder(e2)): return AnyHashable(e1) == AnyHashable(e2)
        }
    }

    public func hash(into hasher: inout Hasher) {
        switch self {
        case let .holder(e): hasher.combine(0); hasher.combine(AnyHashable(e))
        }
    }
}

/// Why balloond's own DMA memory (one hugepage, or single locked 4 KiB pages) could not be
/// had or is no longer where the device was told it is. Thrown inside `DMAError.platform`.
public enum DMAMemoryError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The kernel has no 2 MiB hugetlb pages (`missing` is the sysfs directory).
    case noHugeTLB(missing: String)
    /// The hugepage pool has no free page and could not grow.
    case noFreeHugePage(PlatformError)
    /// mmap of the 2 MiB hugepage failed.
    case hugePageMapFailed(SystemCallError)
    /// Locking the hugepage or reading its physical address failed.
    case hugePageSetupFailed(PlatformError)
    /// Mapping DMA memory in the IOMMU (vfio) failed.
    case iommuMapFailed(VFIOError)
    /// The ring hugepage is no longer at the physical address the device was given.
    case hugePageMoved(from: PhysicalAddress, to: PhysicalAddress)
    /// Re-reading the ring hugepage's PFN failed.
    case hugePagePlacementUnreadable(PlatformError)
    /// Re-reading a live 4 KiB DMA page's PFN failed.
    case pagePlacementUnreadable(PlatformError)
    /// An allocation of 0 bytes.
    case emptyAllocation
    /// More than one page wanted from the 4 KiB page allocator.
    case largerThanAPage(byteCount: Int, pageSize: Int)
    /// An alignment that is not a power of two up to the page size.
    case badAlignment(Int, pageSize: Int)
    /// Compaction could not be held off locked pages, so no 4 KiB page is handed out.
    case noMigrationHold(MigrationHoldError)
    /// mmap of a 4 KiB DMA page failed.
    case pageMapFailed(SystemCallError)
    /// mlock of a 4 KiB DMA page failed with EAGAIN/ENOMEM (RLIMIT_MEMLOCK).
    case pageLockFailed(SystemCallError)
    /// Locking a 4 KiB DMA page or reading its physical address failed otherwise.
    case pageSetupFailed(PlatformError)
    /// A live 4 KiB DMA page is no longer at frame `fromPFN` (`to`: its pagemap entry now).
    case pageMoved(fromPFN: UInt64, to: PagemapEntry?)

    public var description: String {
        switch self {
        case .noHugeTLB(let missing):
            return "this kernel has no 2 MiB hugetlb pages (\(missing) is missing); it needs CONFIG_HUGETLBFS"
        case .noFreeHugePage(let e):
            return "no free 2 MiB hugepage: \(e)"
        case .hugePageMapFailed(let e):
            return "mmap of a 2 MiB hugepage failed: \(e); check HugePages_Free in /proc/meminfo"
        case .hugePageSetupFailed(let e):
            return "hugepage DMA setup failed: \(e)"
        case .iommuMapFailed(let e):
            return "cannot map DMA memory for the device: \(e)"
        case .hugePageMoved(let from, let to):
            return "the ring hugepage moved from \(from) to \(to) (memory offlining or CMA?): stop balloond and restart it"
        case .hugePagePlacementUnreadable(let e):
            return "cannot re-read the ring hugepage's PFN: \(e)"
        case .pagePlacementUnreadable(let e):
            return "cannot re-read the PFN of a 4 KiB DMA page: \(e)"
        case .emptyAllocation:
            return "empty DMA allocation"
        case .largerThanAPage(let byteCount, let pageSize):
            return "\(byteCount) bytes of physically contiguous DMA memory wanted, but without hugepages balloond only has single \(pageSize)-byte pages: queues must be ≤ 256 entries without hugepages (or make a 2 MiB hugepage available: echo 1 > /proc/sys/vm/nr_hugepages)"
        case .badAlignment(let alignment, let pageSize):
            return "alignment \(alignment) must be a power of two ≤ \(pageSize)"
        case .noMigrationHold(let e):
            return "refusing 4 KiB DMA pages: \(e). Without vm.compact_unevictable_allowed=0 compaction may move a ring page behind the device's back; run balloond as root, or make a 2 MiB hugepage available (echo 1 > /proc/sys/vm/nr_hugepages)"
        case .pageMapFailed(let e):
            return "mmap of a DMA page failed: \(e)"
        case .pageLockFailed(let e):
            return "mlock of a DMA page failed: \(e); raise RLIMIT_MEMLOCK (ulimit -l) or run as root"
        case .pageSetupFailed(let e):
            return "DMA page setup failed: \(e)"
        case .pageMoved(let pfn, let entry):
            return "a 4 KiB DMA page moved from frame 0x\(String(pfn, radix: 16)) to \(entry.map { "\($0)" } ?? "nowhere"): the kernel migrated balloond's ring memory, so the device may have written memory that is no longer balloond's. Stop balloond and give it a 2 MiB hugepage (echo 1 > /proc/sys/vm/nr_hugepages), and keep vm.compact_unevictable_allowed=0 and kernel.numa_balancing=0"
        }
    }
}

/// DMA memory whose physical placement can be re-checked (ring pages before a bring-up).
public protocol DMAPlacementCheck: AnyObject {
    /// Re-reads pagemap for every live allocation and throws if any page is no longer at
    /// the physical address the device was (or will be) given.
    func verifyPlacement() throws(DMAError)
}

/// Fallback DMA memory without hugepages: every allocation gets its own locked 4 KiB page
/// (so it is physically contiguous by itself). Each ring part of a queue with ≤ 256 entries
/// fits in a page (docs/virtio-balloon.md §1.7), so shrink the 1024-entry free-page queue, and
/// PFN buffers are sized to `largestAllocation` (1024 PFNs).
///
/// mlock does not pin: compaction migrates locked pages unless
/// `vm.compact_unevictable_allowed` is 0, so a `MigrationHold` is acquired before the first
/// page is taken and released with the last one; without one (or if it fails) no page is
/// handed out. Other movers (NUMA balancing, memory offlining, CMA) are detected, not
/// prevented: `verifyPlacement` re-reads every live page's PFN.
public final class PageDMAAllocator: DMAAllocator, DMAPlacementCheck {
    public let pagemap: PagemapReading
    public let pageSize: Int
    /// Pages handed out so far.
    public private(set) var pagesAllocated = 0
    private let hold: MigrationHold
    /// Live pages: virtual address → PFN the device was given.
    private final class Live { var pages: [UInt: UInt64] = [:] }
    private let live = Live()

    /// - Parameters:
    ///   - pagemap: opened while privileged.
    ///   - migrationHold: keeps compaction off locked pages while any page is held.
    private let arena: DeviceMemoryArena

    /// - Parameters:
    ///   - arena: where the pages come from (its shmem memfd).
    ///   - deviceMapper: with vfio, maps each page in the IOMMU at its guest-physical address.
    private let deviceMapper: DeviceAddressMapper?

    public init(pagemap: PagemapReading, migrationHold: MigrationHold, arena: DeviceMemoryArena, deviceMapper: DeviceAddressMapper? = nil) {
        self.deviceMapper = deviceMapper
        self.pagemap = pagemap
        self.pageSize = pagemap.pageSize
        self.hold = migrationHold
        self.arena = arena
    }

    private func mapPage() throws(SystemCallError) -> (base: UnsafeMutableRawPointer, unmap: () -> Void) {
        let mapping = try OwnedAnonymousMapping(length: pageSize, kind: .small, arena: arena)
        return unsafe (mapping.unsafeBase, { mapping.unmapAll() })
    }

    /// One page: nothing larger is physically contiguous here.
    public var largestAllocation: Int { pageSize }

    /// Pages handed out and not yet released.
    public var livePages: Int { live.pages.count }
    /// The live pages' virtual addresses and the PFNs the device was given (sorted by address).
    public var livePageAddresses: [(virtual: UInt, pfn: UInt64)] {
        live.pages.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
    }

    public func allocate(byteCount: Int, alignment: Int) throws(DMAError) -> DMARegion {
        guard byteCount > 0 else { throw .platform(DMAMemoryError.emptyAllocation) }
        guard byteCount <= pageSize else { throw .platform(DMAMemoryError.largerThanAPage(byteCount: byteCount, pageSize: pageSize)) }
        guard alignment > 0, alignment <= pageSize, alignment & (alignment - 1) == 0 else {
            throw .platform(DMAMemoryError.badAlignment(alignment, pageSize: pageSize))
        }
        do { try hold.acquire() } catch { throw .platform(DMAMemoryError.noMigrationHold(error)) }
        let base: UnsafeMutableRawPointer
        let unmap: () -> Void
        do { unsafe (base, unmap) = try mapPage() } catch {
            hold.release()
            throw .platform(DMAMemoryError.pageMapFailed(error))
        }
        let address = unsafe MappedMemory.address(of: base)
        let physical: PhysicalAddress
        do throws(DMAMemoryError) {
            do { try unsafe MappedMemory.lock(base, length: pageSize) } catch {
                if error.errno == .resourceTemporarilyUnavailable || error.errno == .noMemory { throw .pageLockFailed(error) }
                throw .pageSetupFailed(.system(error))
            }
            _ = unsafe madvise(base, pageSize, MADV_DONTFORK)
            unsafe MappedMemory.touch(base, length: pageSize, stride: pageSize)
            do throws(PlatformError) {
                guard let entry = try pagemap.entries(forVirtual: address, count: 1).first else {
                    throw .pagemap(.noEntry(virtualAddress: address))
                }
                physical = try physicalAddress(from: entry, virtualAddress: address, pageSize: pageSize)
            } catch { throw .pageSetupFailed(error) }
            if let deviceMapper {
                do { try deviceMapper.map(virtualAddress: address, length: pageSize, at: physical.value) } catch { throw .iommuMapFailed(error) }
                // Pinned now; if pinning moved it first, its IOVA is not its address any more.
                let entry = try? pagemap.entries(forVirtual: address, count: 1).first
                guard let entry, entry.present, entry.pfn == physical.value / UInt64(pageSize) else {
                    try? deviceMapper.unmap(deviceAddress: physical.value, length: pageSize)
                    throw .pageMoved(fromPFN: physical.value / UInt64(pageSize), to: entry ?? nil)
                }
            }
        } catch {
            unmap()
            hold.release()
            throw .platform(error)
        }
        pagesAllocated += 1
        let live = self.live
        let hold = self.hold
        live.pages[address] = physical.value / UInt64(pageSize)
        let deviceMapper = self.deviceMapper
        let pageSize = self.pageSize
        let region = unsafe DMARegion(unsafeBase: base, physicalAddress: physical, size: byteCount, release: {
            if let deviceMapper {
                // Keep the page (mapped and locked) if the device could still reach it.
                guard (try? deviceMapper.unmap(deviceAddress: physical.value, length: pageSize)) != nil else { return }
            }
            unmap()
            live.pages[address] = nil
            hold.release()
        })
        region.zero()
        return region
    }

    public func verifyPlacement() throws(DMAError) {
        for (address, pfn) in live.pages.sorted(by: { $0.key < $1.key }) {
            let entry: PagemapEntry?
            do { entry = try pagemap.entries(forVirtual: address, count: 1).first } catch {
                throw .platform(DMAMemoryError.pagePlacementUnreadable(error))
            }
            guard let entry, entry.present, !entry.swapped, entry.pfn == pfn else {
                throw .platform(DMAMemoryError.pageMoved(fromPFN: pfn, to: entry))
            }
        }
    }
}

/// Picks balloond's DMA memory: one 2 MiB hugepage if one can be had, else single locked
/// pages (logged as a warning, with the reason). Opens /proc/self/pagemap once for it.
///
/// - Parameter migrationHold: held while 4 KiB pages are (see `PageDMAAllocator`).
/// - Returns: the allocator and a one-line description for logs and `balloond status`. Call
///   `verifyPlacement()` before every bring-up: a reused ring page must still be where the
///   device will be told it is.
public func makeDMAAllocator(root: SysRoot = .host, arena: DeviceMemoryArena, migrationHold: MigrationHold, deviceMapper: DeviceAddressMapper? = nil,
                             logger: Logger) throws(DMAError)
    -> (allocator: DMAAllocator & DMAPlacementCheck, description: String) {
    let pagemap: PagemapResolver
    do { pagemap = try PagemapResolver(root: root) } catch { throw .platform(error) }
    do {
        let huge = try HugePageDMAAllocator(root: root, pagemap: pagemap, arena: arena, deviceMapper: deviceMapper, logger: logger)
        return (huge, "one 2 MiB hugepage at \(huge.region.physicalAddress)\(huge.grewPool ? " (nr_hugepages raised by one)" : "")")
    } catch {
        logger.warning("no hugepage for DMA memory (\(error)); falling back to locked 4 KiB pages: queues are limited to 256 entries, PFN buffers to 1024 PFNs, and vm.compact_unevictable_allowed is held at 0 while they are in use")
        return (PageDMAAllocator(pagemap: pagemap, migrationHold: migrationHold, arena: arena, deviceMapper: deviceMapper), "locked 4 KiB pages (no hugepage: \(error))")
    }
}
