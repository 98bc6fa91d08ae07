import PlatformLinux

/// The kernel operations the hugetlb source needs, behind a protocol so its logic can be
/// tested against a fake pool (and fake /proc/kpageflags) without root.
public protocol HugeTLBPoolControl: AnyObject {
    /// The 2 MiB pool's counters.
    func counters() throws(GuestMemoryError) -> HugePageCounters
    /// Writes `nr_hugepages` (the kernel may allocate fewer pages than asked).
    func setPoolSize(_ pages: UInt64) throws(GuestMemoryError)
    /// Reserves `pages` free pool pages with one mapping that is never faulted.
    func reserve(pages: Int) throws(GuestMemoryError) -> HugeTLBReservation
    /// Why the reservations released last are still held (nil: they were given back).
    var reservationReleaseError: String? { get }
}

extension HugeTLBPoolControl {
    public var reservationReleaseError: String? { nil }
}

/// A reservation of free pool pages; `release()` (or deinit) unmaps it, which returns the
/// reservation (`HugePages_Rsvd` drops) without the pages ever having been allocated.
public final class HugeTLBReservation {
    public let pages: Int
    private var unmap: (() -> Void)?

    public init(pages: Int, unmap: @escaping () -> Void) {
        self.pages = pages
        self.unmap = unmap
    }

    public func release() {
        unmap?()
        unmap = nil
    }

    deinit { release() }
}

/// The real pool: `HugePagePool` for the counters and `nr_hugepages`, and an unfaulted
/// `MAP_SHARED` mapping of the arena's hugetlbfs memfd (`OwnedAnonymousMapping`) for
/// reservations.
///
/// A shared hugetlb mapping reserves its whole length at mmap time (`hugetlb_reserve_pages`,
/// no MAP_NORESERVE) and allocates a page only when one is faulted. The reservation belongs
/// to the file, so while the guardian holds the memfd it outlives a killed balloond (the
/// pages stay reserved until the device is stopped); release is munmap, and once the last
/// reservation is unmapped the arena truncates its reservation half, which drops them all (a
/// punch hole would not: hugetlbfs unreserves a page never faulted only on truncation). The mapping is PROT_NONE, so nothing in balloond
/// can fault it by mistake: a fault would dequeue *some* free pool page, possibly one already
/// hinted, and zero it (a write before the hint is applied). A stray access crashes instead.
public final class LinuxHugeTLBPoolControl: HugeTLBPoolControl {
    public let pool: HugePagePool
    /// nil: counters and pool size only (crash recovery); `reserve` refuses.
    public let arena: DeviceMemoryArena?

    public init(root: SysRoot = .host, arena: DeviceMemoryArena? = nil) {
        pool = HugePagePool(root: root)
        self.arena = arena
    }

    public func counters() throws(GuestMemoryError) -> HugePageCounters {
        do { return try pool.counters() } catch { throw .platform(error) }
    }

    public func setPoolSize(_ pages: UInt64) throws(GuestMemoryError) {
        do { try pool.setCount(pages) } catch { throw .cannotSetPoolSize(path: pool.countPath, pages: pages, error) }
    }

    public func reserve(pages: Int) throws(GuestMemoryError) -> HugeTLBReservation {
        guard let arena else { throw .noArena }
        let mapping: OwnedAnonymousMapping
        do {
            mapping = try OwnedAnonymousMapping(length: pages * HugePagePool.pageSize, kind: .hugeTLBReservation, arena: arena,
                                                protection: Sys.protectionNone, populate: false)
        } catch {
            throw .cannotReserve(pages: pages, error)
        }
        return HugeTLBReservation(pages: pages) { mapping.unmapAll() }
    }

    /// The arena's failure to truncate its reservation half after the last reservation was
    /// unmapped: those pages stay reserved (and the pool grown) until balloond exits.
    public var reservationReleaseError: String? { arena?.lastReservationReleaseError.map { "\($0)" } }
}
