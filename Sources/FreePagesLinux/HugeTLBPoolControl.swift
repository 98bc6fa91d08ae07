#if canImport(Glibc)
import Glibc
#endif
import PlatformLinux

/// The kernel operations the hugetlb source needs, behind a protocol so its logic can be
/// tested against a fake pool (and fake /proc/kpageflags) without root.
public protocol HugeTLBPoolControl: AnyObject {
    /// The 2 MiB pool's counters.
    func counters() throws(FreePagesLinuxError) -> HugePageCounters
    /// Writes `nr_hugepages` (the kernel may allocate fewer pages than asked).
    func setPoolSize(_ pages: UInt64) throws(FreePagesLinuxError)
    /// Reserves `pages` free pool pages with one mapping that is never faulted.
    func reserve(pages: Int) throws(FreePagesLinuxError) -> HugeTLBReservation
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

/// MAP_HUGE_2MB: log2(2 MiB) << MAP_HUGE_SHIFT (26), from uapi `linux/mman.h`.
private let mapHuge2MB: Int32 = 21 << 26

/// The real pool: `HugePagePool` for the counters and `nr_hugepages`, and
/// `mmap(MAP_SHARED|MAP_ANONYMOUS|MAP_HUGETLB|MAP_HUGE_2MB)` for reservations.
///
/// A shared hugetlb mapping reserves its whole length at mmap time (`hugetlb_reserve_pages`,
/// no MAP_NORESERVE) and allocates a page only when one is faulted. The mapping is
/// PROT_NONE, so nothing in balloond can fault it by mistake: a fault would dequeue *some*
/// free pool page, possibly one already hinted, and zero it (a write before the hint is
/// applied). A stray access crashes instead.
public final class LinuxHugeTLBPoolControl: HugeTLBPoolControl {
    public let pool: HugePagePool

    public init(root: SysRoot = .host) { pool = HugePagePool(root: root) }

    public func counters() throws(FreePagesLinuxError) -> HugePageCounters {
        do { return try pool.counters() } catch { throw .system("\(error)") }
    }

    public func setPoolSize(_ pages: UInt64) throws(FreePagesLinuxError) {
        do { try pool.setCount(pages) } catch { throw .system("setting \(pool.countPath) to \(pages) failed: \(error)") }
    }

    public func reserve(pages: Int) throws(FreePagesLinuxError) -> HugeTLBReservation {
        let length = pages * HugePagePool.pageSize
        let p = unsafe mmap(nil, length, PROT_NONE, MAP_SHARED | MAP_ANONYMOUS | Int32(MAP_HUGETLB) | mapHuge2MB, -1, 0)
        guard let p = unsafe p, unsafe p != MAP_FAILED else {
            throw .system("reserving \(pages) hugetlb pages with an unfaulted MAP_HUGETLB mapping failed: \(errnoDescription(Glibc.errno)) (ENOMEM: fewer free unreserved pool pages than that)")
        }
        let address = UInt(bitPattern: p)
        return HugeTLBReservation(pages: pages) {
            _ = unsafe munmap(UnsafeMutableRawPointer(bitPattern: address), length)
        }
    }
}
