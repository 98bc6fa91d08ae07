#if canImport(Glibc)
import Glibc
#endif

/// First-fit allocator of offsets in a sparse file, in whole granules (4 KiB or 2 MiB).
/// Pure: no syscalls.
public struct OffsetAllocator: Hashable, Sendable {
    public let capacity: Int
    public let granule: Int
    /// Free extents, sorted by offset, never adjacent (merged on free).
    public private(set) var free: [Range<Int>]

    public init(capacity: Int, granule: Int) {
        precondition(granule > 0 && granule & (granule - 1) == 0 && capacity >= 0)
        self.capacity = capacity / granule * granule
        self.granule = granule
        free = self.capacity > 0 ? [0..<self.capacity] : []
    }

    /// `length` rounded up to whole granules.
    public func rounded(_ length: Int) -> Int { (length + granule - 1) / granule * granule }

    /// The offset of `length` bytes (rounded up to granules), or nil when no extent is big enough.
    public mutating func allocate(_ length: Int) -> Int? {
        guard length > 0 else { return nil }
        let n = rounded(length)
        guard let i = free.firstIndex(where: { $0.count >= n }) else { return nil }
        let start = free[i].lowerBound
        if free[i].count == n { free.remove(at: i) } else { free[i] = (start + n)..<free[i].upperBound }
        return start
    }

    /// Gives `[offset, offset + length)` back (granule-aligned; must have been allocated).
    public mutating func release(offset: Int, length: Int) {
        let n = rounded(length)
        guard n > 0 else { return }
        var r = offset..<(offset + n)
        precondition(offset % granule == 0 && r.upperBound <= capacity, "release outside the allocator")
        let i = free.firstIndex { $0.lowerBound >= r.upperBound } ?? free.count
        precondition(i == 0 || free[i - 1].upperBound <= r.lowerBound, "double release")
        var at = i
        if i > 0, free[i - 1].upperBound == r.lowerBound {
            r = free[i - 1].lowerBound..<r.upperBound
            free.remove(at: i - 1)
            at -= 1
        }
        if at < free.count, free[at].lowerBound == r.upperBound {
            r = r.lowerBound..<free[at].upperBound
            free.remove(at: at)
        }
        free.insert(r, at: at)
    }

    public var bytesFree: Int { free.reduce(0) { $0 + $1.count } }
}

/// Where every byte of memory the device may read or write comes from (issue 9 H2): two
/// memfds created once per run, a shmem one (4 KiB pages) and a hugetlbfs one (2 MiB pages),
/// each a large sparse file with an `OffsetAllocator`. Memory is mapped `MAP_SHARED` from
/// them (`OwnedAnonymousMapping`, the one mapping funnel), and released with munmap plus
/// `fallocate(PUNCH_HOLE)` of its range, which frees the pages for everyone (a surplus
/// hugetlb page goes back to the buddy allocator as before).
///
/// Why: when a process is killed, the kernel frees its memory (exit_mm) before its files
/// (exit_files), so before uio_pci_generic's release() clears Bus Master: for that moment the
/// device could still write or discard memory the kernel has already handed to someone else.
/// Pages of a memfd belong to the file, not the process. A guardian process holds duplicates
/// of both descriptors (`GuardianProcess`) and drops them only after it stopped the device.
/// A shared hugetlbfs mapping's reservation also belongs to the file, so the hugetlb pool
/// hint source's reservation outlives a killed worker too.
///
/// Residual window: between the worker's death and the guardian's device stop (milliseconds),
/// the shmem pages are no longer mlocked (no mapping is left), so reclaim or compaction could
/// in principle move one. Hugetlb pages do not move; that is why hugepages stay the first choice.
public final class DeviceMemoryArena {
    /// Which memfd backs a mapping (`OwnedAnonymousMapping.PageKind` is this type).
    public enum Backing: Hashable, Sendable {
        /// shmem, 4 KiB pages, populated by the caller.
        case small
        /// hugetlbfs, 2 MiB pages: reserved at mmap time (the reservation belongs to the file)
        /// and, with `populate`, faulted in by the mmap.
        case hugeTLB2MiB
        /// hugetlbfs reservations that are never faulted (PROT_NONE, no populate: the hugetlb
        /// pool hint source's hold on free pool pages), in the
        /// upper half of the same file. A punch hole frees faulted pages and their reservations
        /// but leaves the reservation of a page that was never faulted (hugetlbfs unreserves a
        /// range only on truncation: `remove_inode_hugepages`), so these are given back by
        /// truncating the file at the half once none is mapped any more, then extending it again.
        case hugeTLBReservation
    }

    /// File offsets per memfd (sparse: costs nothing until pages are faulted).
    public static let defaultSparseBytes = 1 << 40
    public static let hugePageBytes = 2 << 20

    public let small: OpenFile
    /// nil when the kernel cannot create a hugetlbfs memfd (no CONFIG_HUGETLBFS, no 2 MiB size).
    public let huge: OpenFile?
    /// Why `huge` is nil.
    public let hugeUnavailableReason: String?
    private var smallSpace: OffsetAllocator
    private var hugeSpace: OffsetAllocator
    /// The hugetlbfs file's size, and where its reservation half starts (0: none).
    private let hugeFileBytes: Int
    private let reservationBase: Int
    /// The next reservation's offset, and the reservation bytes still mapped: when the last
    /// one goes, the half is truncated and `reservationNext` starts again at `reservationBase`.
    private var reservationNext: Int
    private var reservationLive = 0
    /// Why the last truncation of the reservation half failed (nil: it did not), for callers
    /// that check the pool afterwards.
    public private(set) var lastReservationReleaseError: SystemCallError?
    /// Called when the ring page grew or shrank `nr_hugepages` (the guardian's channel).
    public var poolChangeObserver: ((_ grown: Bool) -> Void)?

    public init(sparseBytes: Int = defaultSparseBytes) throws(SystemCallError) {
        small = try Sys.memfdCreate(name: "balloond-device-memory", flags: MemfdFlags.closeOnExec)
        try Sys.truncate(small, length: sparseBytes)
        smallSpace = OffsetAllocator(capacity: sparseBytes, granule: Sys.pageSize)
        var hugeFile: OpenFile?
        var why: String?
        do {
            let f = try Sys.memfdCreate(name: "balloond-device-hugepages", flags: MemfdFlags.closeOnExec | MemfdFlags.hugeTLB | MemfdFlags.huge2MB)
            try Sys.truncate(f, length: sparseBytes)
            hugeFile = f
        } catch {
            why = "no 2 MiB hugetlbfs memfd: \(error)"
        }
        huge = hugeFile
        hugeUnavailableReason = why
        let half = hugeFile == nil ? 0 : sparseBytes / 2 / Self.hugePageBytes * Self.hugePageBytes
        hugeSpace = OffsetAllocator(capacity: half, granule: Self.hugePageBytes)
        hugeFileBytes = hugeFile == nil ? 0 : sparseBytes
        reservationBase = half
        reservationNext = half
    }

    /// Adopts descriptors inherited from a parent (the guardian's side), for tests and `guardian`.
    public init(inheritedSmall: Int32, inheritedHuge: Int32?) {
        small = OpenFile(adopting: inheritedSmall, path: "memfd:balloond-device-memory")
        huge = inheritedHuge.map { OpenFile(adopting: $0, path: "memfd:balloond-device-hugepages") }
        hugeUnavailableReason = inheritedHuge == nil ? "not inherited" : nil
        smallSpace = OffsetAllocator(capacity: 0, granule: Sys.pageSize)
        hugeSpace = OffsetAllocator(capacity: 0, granule: Self.hugePageBytes)
        hugeFileBytes = 0
        reservationBase = 0
        reservationNext = 0
    }

    func file(_ backing: Backing) throws(SystemCallError) -> OpenFile {
        switch backing {
        case .small: return small
        case .hugeTLB2MiB, .hugeTLBReservation:
            guard let huge else { throw SystemCallError(call: "memfd_create(MFD_HUGETLB)", path: hugeUnavailableReason, errno: .invalidArgument) }
            return huge
        }
    }

    /// A fresh range of file offsets for `length` bytes (ENOSPC when the sparse file is full).
    func allocateOffset(length: Int, backing: Backing) throws(SystemCallError) -> Int {
        let got: Int?
        switch backing {
        case .small: got = smallSpace.allocate(length)
        case .hugeTLB2MiB: got = hugeSpace.allocate(length)
        case .hugeTLBReservation:
            let n = hugeSpace.rounded(length)
            if reservationBase > 0, n > 0, n <= hugeFileBytes - reservationNext {
                got = reservationNext
                reservationNext += n
                reservationLive += n
            } else {
                got = nil
            }
        }
        guard let got else { throw SystemCallError(call: "arena allocate", path: "\(length) bytes", errno: .noSpace) }
        return got
    }

    /// Frees the pages of `[offset, offset + length)` (punch hole) and makes the range
    /// reusable. The range must no longer be mapped by this process. If the punch fails the
    /// range is not reused (the pages stay with the file until it is closed).
    /// A `.hugeTLBReservation` range is not reused on its own: once no reservation is mapped
    /// any more, the file is truncated at the reservation half (dropping every reservation
    /// there) and extended again, and the half is reused from its start.
    func release(offset: Int, length: Int, backing: Backing) {
        guard let f = try? file(backing) else { return }
        if backing == .hugeTLBReservation {
            let n = hugeSpace.rounded(length)
            reservationLive = max(0, reservationLive - n)
            guard reservationLive == 0 else { return }
            do {
                try Sys.truncate(f, length: reservationBase)
                try Sys.truncate(f, length: hugeFileBytes)
                lastReservationReleaseError = nil
                reservationNext = reservationBase
            } catch {
                // The half stays as it is (not reused): the reservations go with the file.
                lastReservationReleaseError = error
            }
            return
        }
        do { try Sys.punchHole(f, offset: offset, length: length) } catch { return }
        switch backing {
        case .small: smallSpace.release(offset: offset, length: length)
        case .hugeTLB2MiB: hugeSpace.release(offset: offset, length: length)
        case .hugeTLBReservation: break
        }
    }

    /// Bytes of file offsets free (for tests and status).
    public func offsetsFree(_ backing: Backing) -> Int {
        switch backing {
        case .small: return smallSpace.bytesFree
        case .hugeTLB2MiB: return hugeSpace.bytesFree
        case .hugeTLBReservation: return reservationBase == 0 ? 0 : hugeFileBytes - reservationNext
        }
    }

    /// Bytes of hugetlb reservations still mapped (`.hugeTLBReservation`).
    public var reservationBytesLive: Int { reservationLive }

    /// Pages currently allocated to the file (`st_blocks` × 512): what the guardian would hold.
    public func allocatedBytes(_ backing: Backing) -> Int {
        guard let f = try? file(backing), let st = try? f.status() else { return 0 }
        return Int(st.st_blocks) * 512
    }
}
