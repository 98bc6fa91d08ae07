import TestSupport
import FreePages
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux

/// A fake 2 MiB hugetlb pool over fake RAM, implementing `HugeTLBPoolControl` like the
/// kernel: growing takes 2 MiB frames from a buddy list (most recently freed first), shrinking
/// frees free pool pages the kernel picks (most recently added first), reservations are
/// counts. It keeps /proc/kpageflags, /proc/kpagecount, /proc/buddyinfo, /proc/meminfo and
/// /proc/iomem in the tree in step.
final class FakeHugeTLBKernel: HugeTLBPoolControl {
    let tree: FakeTree
    let frames: Int
    static let framePages = 512
    /// Free 2 MiB frames in the buddy allocator.
    var buddyFrames: [Int]
    /// Free pool pages.
    var freePool: [Int] = []
    /// In-use pool pages and their mapcount.
    var inUse: [Int: UInt64] = [:]
    var reserved: UInt64 = 0
    var surplus: UInt64 = 0
    var overcommit: UInt64 = 0
    var setPoolSizeCalls: [UInt64] = []
    /// Called at the start of every `counters()` call (tests inject races here).
    var onCounters: ((FakeHugeTLBKernel) -> Void)?
    /// Extra raw kpageflags values by PFN, written over the computed ones.
    var flagOverrides: [Int: UInt64] = [:]

    init(tree: FakeTree, ramMiB: Int, buddyFrames: [Int]) {
        self.tree = tree
        frames = ramMiB / 2
        self.buddyFrames = buddyFrames
        tree.file("/proc/iomem", "00000000-\(String(UInt64(ramMiB) << 20 - 1, radix: 16)) : System RAM\n")
        sync()
    }

    var total: UInt64 { UInt64(freePool.count + inUse.count) }

    func counters() throws(GuestMemoryError) -> HugePageCounters {
        onCounters?(self)
        return HugePageCounters(total: total, free: UInt64(freePool.count), reserved: reserved, surplus: surplus, overcommit: overcommit)
    }

    /// When set, `setPoolSize` fails with it (and changes nothing).
    var setPoolSizeFailure: GuestMemoryError?

    func setPoolSize(_ pages: UInt64) throws(GuestMemoryError) {
        setPoolSizeCalls.append(pages)
        if let setPoolSizeFailure { throw setPoolSizeFailure }
        while total < pages, let f = buddyFrames.popLast() { freePool.append(f) }
        while total > pages, UInt64(freePool.count) > reserved, let f = freePool.popLast() { buddyFrames.append(f) }
        sync()
    }

    func reserve(pages: Int) throws(GuestMemoryError) -> HugeTLBReservation {
        guard UInt64(freePool.count) - reserved >= UInt64(pages) else {
            throw .cannotReserve(pages: pages, SystemCallError(call: "mmap", path: nil, errno: .noMemory))
        }
        reserved += UInt64(pages)
        return HugeTLBReservation(pages: pages) { [weak self] in
            guard let self, self.reservationReleaseError == nil else { return }
            self.reserved -= UInt64(pages)
        }
    }

    /// When set, released reservations stay reserved (as when the arena's truncation fails),
    /// and this is what the control reports as the reason.
    var reservationReleaseError: String?

    /// Adds an in-use pool page (balloond's DMA page, or a foreign user's).
    func addInUse(frame: Int, mapcount: UInt64 = 1) {
        buddyFrames.removeAll { $0 == frame }
        inUse[frame] = mapcount
        sync()
    }

    func pfn(frame: Int) -> UInt64 { UInt64(frame * Self.framePages) }

    func sync() {
        let pages = frames * Self.framePages
        var flags = [UInt64](repeating: KPageFlags([.lru, .uptodate]).rawValue, count: pages)
        var counts = [UInt64](repeating: 1, count: pages)
        func mark(_ frame: Int, huge: Bool, count: UInt64) {
            for i in 0..<Self.framePages {
                let pfn = frame * Self.framePages + i
                if huge {
                    flags[pfn] = (i == 0 ? KPageFlags([.huge, .compoundHead]) : KPageFlags([.huge, .compoundTail])).rawValue
                    counts[pfn] = i == 0 ? count : 0
                } else {
                    flags[pfn] = KPageFlags.buddy.rawValue
                    counts[pfn] = 0
                }
            }
        }
        for f in buddyFrames { mark(f, huge: false, count: 0) }
        for f in freePool { mark(f, huge: true, count: 0) }
        for (f, c) in inUse { mark(f, huge: true, count: c) }
        for (pfn, v) in flagOverrides { flags[pfn] = v }
        tree.u64File("/proc/kpageflags", flags)
        tree.u64File("/proc/kpagecount", counts)
        // All free memory as order-9 blocks in zone Normal.
        var counts11 = [UInt64](repeating: 0, count: 11)
        counts11[9] = UInt64(buddyFrames.count)
        tree.file("/proc/buddyinfo", "Node 0, zone      DMA      0 0 0 0 0 0 0 0 0 0 0\nNode 0, zone   Normal " + counts11.map(String.init).joined(separator: " ") + "\n")
        let free = UInt64(buddyFrames.count) << 21
        tree.meminfo(total: UInt64(frames) << 21, free: free, available: free)
    }
}
