import TestSupport
import FreePages
import VirtioCore
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux

/// The guest's /proc/meminfo, shared by the fake page providers: what they hold leaves
/// MemFree and MemAvailable, and comes back when unmapped.
final class FakeGuestMemory {
    let tree: FakeTree
    var total: UInt64
    var free: UInt64
    var available: UInt64

    init(tree: FakeTree, totalMiB: UInt64 = 1024, availableMiB: UInt64) {
        self.tree = tree
        total = totalMiB << 20
        available = availableMiB << 20
        free = available
        write()
    }

    func take(_ bytes: UInt64) {
        free -= min(free, bytes)  // the kernel reclaims page cache for the rest
        available -= bytes
        write()
    }

    func give(_ bytes: UInt64) {
        free += bytes
        available += bytes
        write()
    }

    func write() { tree.meminfo(total: total, free: free, available: available) }
}

private let present: UInt64 = 1 << 63
private let slotBytes = 2 << 20

/// A fake kernel for `HugeTLBBalloonMemory`: surplus 2 MiB pages from a list of free 2 MiB
/// blocks, limited by the `nr_overcommit_hugepages` value in the tree (ENOMEM beyond it,
/// like `gather_surplus_pages`), and a pagemap that reports each 4 KiB subpage.
final class FakeHugeTLBPages: HugeTLBBalloonPages {
    let tree: FakeTree
    let memory: FakeGuestMemory
    /// The overcommit file, relative to the tree.
    let overcommitFile: String
    /// Head PFNs of free 2 MiB blocks, handed out from the front.
    var freeHeads: [UInt64]
    private(set) var surplus = 0
    private(set) var mapCalls: [Int] = []
    /// `nr_overcommit_hugepages` as the kernel saw it at each mmap.
    private(set) var overcommitAtMap: [UInt64] = []
    private(set) var unmapCount = 0
    var failNext: BalloonMapFailure?
    /// Report PFN 0 for present pages (a process without CAP_SYS_ADMIN).
    var hidePFNs = false
    /// 4 KiB page VA → PFN reported instead (the kernel "moved" it).
    var moves: [UInt: UInt64] = [:]
    /// Mapped 2 MiB pages: VA → head PFN.
    private(set) var mapped: [UInt: UInt64] = [:]
    private var nextVA: UInt = 0x7e00_0000_0000

    init(tree: FakeTree, memory: FakeGuestMemory, overcommitFile: String = "/proc/sys/vm/nr_overcommit_hugepages", freeHeads: [UInt64]) {
        self.tree = tree
        self.memory = memory
        self.overcommitFile = overcommitFile
        self.freeHeads = freeHeads
    }

    /// Free 2 MiB blocks at frames `frames` (PFN = frame × 512).
    convenience init(tree: FakeTree, memory: FakeGuestMemory, frames: Range<UInt64>) {
        self.init(tree: tree, memory: memory, freeHeads: frames.map { $0 * 512 })
    }

    func mapHugePages(count: Int) throws(BalloonMapFailure) -> BalloonMapping {
        mapCalls.append(count)
        if let f = failNext { failNext = nil; throw f }
        let overcommit = UInt64(tree.read(overcommitFile)!.split(separator: "\n")[0])!
        overcommitAtMap.append(overcommit)
        if UInt64(surplus + count) > overcommit {
            throw BalloonMapFailure(.hugeTLB, count: count, step: .mmap, SystemCallError(call: "mmap", path: nil, errno: .noMemory))
        }
        if freeHeads.count < count { throw BalloonMapFailure(.hugeTLB, count: count, step: .mmap, SystemCallError(call: "mmap", path: nil, errno: .noMemory)) }
        let heads = Array(freeHeads.prefix(count))
        freeHeads.removeFirst(count)
        surplus += count
        memory.take(UInt64(count * slotBytes))
        let va = nextVA
        nextVA += UInt((count + 1) * slotBytes)
        for (i, h) in heads.enumerated() { mapped[va + UInt(i * slotBytes)] = h }
        return BalloonMapping(base: va, bytes: count * slotBytes) { [weak self] slot in
            guard let self else { return }
            let a = va + UInt(slot * slotBytes)
            guard let h = self.mapped.removeValue(forKey: a) else { return }
            self.freeHeads.append(h)
            self.surplus -= 1
            self.unmapCount += 1
            self.memory.give(UInt64(slotBytes))
        }
    }

    func pagemap(at address: UInt, pages: Int) throws(GuestMemoryError) -> [PagemapEntry] {
        (0..<pages).map { i in
            let va = address + UInt(i * 4096)
            let slot = va & ~UInt(slotBytes - 1)
            guard let head = mapped[slot] else { return PagemapEntry(rawValue: 0) }
            let pfn = moves[va] ?? head + UInt64((va - slot) / 4096)
            return PagemapEntry(rawValue: present | (hidePFNs ? 0 : pfn))
        }
    }
}

/// A fake kernel for `LockedAnonymousBalloonMemory`: 4 KiB frames from a list, the
/// `compact_unevictable_allowed` value seen at each mmap, failures on demand.
final class FakeLockedPages: LockedAnonymousPages {
    let tree: FakeTree
    let memory: FakeGuestMemory
    /// Free 4 KiB frames, handed out from the front.
    var freeFrames: [UInt64]
    private(set) var mapCalls: [Int] = []
    /// compact_unevictable_allowed at each mmap (nil: no such file).
    private(set) var compactAtMap: [String?] = []
    private(set) var unmappedSlots = 0
    var failNext: BalloonMapFailure?
    /// ENOMEM for mappings larger than this many pages.
    var maxPagesPerMap: Int?
    var hidePFNs = false
    var moves: [UInt: UInt64] = [:]
    /// Mapped 4 KiB pages: VA → PFN.
    private(set) var mapped: [UInt: UInt64] = [:]
    private var nextVA: UInt = 0x7f00_0000_0000

    init(tree: FakeTree, memory: FakeGuestMemory, freeFrames: [UInt64]) {
        self.tree = tree
        self.memory = memory
        self.freeFrames = freeFrames
    }

    func mapLocked(pages: Int) throws(BalloonMapFailure) -> BalloonMapping {
        mapCalls.append(pages)
        compactAtMap.append(tree.read("/proc/sys/vm/compact_unevictable_allowed"))
        if let f = failNext { failNext = nil; throw f }
        if let m = maxPagesPerMap, pages > m { throw BalloonMapFailure(.lockedAnonymous, count: pages, step: .populate, SystemCallError(call: "madvise", path: nil, errno: .noMemory)) }
        guard freeFrames.count >= pages else { throw BalloonMapFailure(.lockedAnonymous, count: pages, step: .populate, SystemCallError(call: "madvise", path: nil, errno: .noMemory)) }
        let frames = Array(freeFrames.prefix(pages))
        freeFrames.removeFirst(pages)
        memory.take(UInt64(pages) * 4096)
        let va = nextVA
        nextVA += UInt(pages * 4096 + slotBytes)
        for (i, f) in frames.enumerated() { mapped[va + UInt(i * 4096)] = f }
        let bytes = pages * 4096
        return BalloonMapping(base: va, bytes: bytes) { [weak self] slot in
            guard let self else { return }
            let start = slot * slotBytes
            for off in stride(from: start, to: min(bytes, start + slotBytes), by: 4096) {
                if let f = self.mapped.removeValue(forKey: va + UInt(off)) {
                    self.freeFrames.append(f)
                    self.memory.give(4096)
                }
            }
            self.unmappedSlots += 1
        }
    }

    func pagemap(at address: UInt, pages: Int) throws(GuestMemoryError) -> [PagemapEntry] {
        (0..<pages).map { i in
            let va = address + UInt(i * 4096)
            guard let pfn = mapped[va] else { return PagemapEntry(rawValue: 0) }
            return PagemapEntry(rawValue: present | (hidePFNs ? 0 : (moves[va] ?? pfn)))
        }
    }

    var heldFrames: Set<UInt64> { Set(mapped.values) }
}

/// A guest tree for the balloon backends: 2 MiB hugetlb via /proc/sys/vm (default size
/// 2 MiB), overcommit 0, compaction of unevictable pages allowed (the default), OOM score 0.
struct BalloonFixture {
    let tree: FakeTree
    let memory: FakeGuestMemory
    let huge: FakeHugeTLBPages
    let small: FakeLockedPages
    let budget: BalloonMemoryBudget
    /// What balloond holds, as the hint sources would share it.
    let holdings: GuestMemoryHoldings

    /// - Parameters:
    ///   - availableMiB: MemAvailable (= MemFree) of a 1 GiB guest; the margin is 64 MiB.
    ///   - hugeFrames: free 2 MiB blocks for surplus pages.
    ///   - smallFrames: free 4 KiB frames, deliberately not in order.
    init(availableMiB: UInt64 = 512, overcommit: UInt64 = 0, hugeFrames: Range<UInt64> = 100..<200, capMiB: UInt64? = nil) {
        tree = FakeTree()
        tree.file("/proc/self/oom_score_adj", "0\n")
        tree.file("/proc/sys/vm/nr_hugepages", "0\n")
        tree.file("/proc/sys/vm/nr_overcommit_hugepages", "\(overcommit)\n")
        tree.file("/proc/sys/vm/compact_unevictable_allowed", "1\n")
        memory = FakeGuestMemory(tree: tree, availableMiB: availableMiB)
        huge = FakeHugeTLBPages(tree: tree, memory: memory, frames: hugeFrames)
        // Runs of frames with gaps, interleaved, so blocks have several ranges.
        let frames: [UInt64] = (0..<40_000).map { i in
            let run = UInt64(i / 7), within = UInt64(i % 7)
            return 300_000 + (run % 2 == 0 ? run * 16 : 1_000_000 - run * 16) + within
        }
        small = FakeLockedPages(tree: tree, memory: memory, freeFrames: frames)
        let limits = OwnedMemoryLimits(marginBytes: 64 << 20, marginFractionOfTotal: 0, maxHeldBytes: capMiB.map { $0 << 20 })
        holdings = GuestMemoryHoldings(root: tree.root)
        budget = BalloonMemoryBudget(root: tree.root, limits: limits, holdings: holdings)
    }

    func hugeBackend(stepMiB: UInt64 = 64) throws -> HugeTLBBalloonMemory {
        try HugeTLBBalloonMemory(root: tree.root, pages: huge, budget: budget, options: .init(stepBytes: stepMiB << 20))
    }

    func smallBackend(stepMiB: UInt64 = 64) -> LockedAnonymousBalloonMemory {
        LockedAnonymousBalloonMemory(root: tree.root, pages: small, budget: budget, options: .init(stepBytes: stepMiB << 20))
    }

    var overcommit: String? { tree.read("/proc/sys/vm/nr_overcommit_hugepages") }
    var compact: String? { tree.read("/proc/sys/vm/compact_unevictable_allowed") }
    var oomScore: String? { tree.read("/proc/self/oom_score_adj") }
    var hugeState: String? { tree.read(SysctlStateFile.hugeTLBOvercommitPath) }
    var compactState: String? { tree.read(SysctlStateFile.compactUnevictablePath) }
}

extension BalloonBlock {
    /// The 4 KiB frames, in range order.
    var frames: [UInt64] { pfns.map(UInt64.init) }
}

/// Every range a source hands out until it runs dry, in batches of `maxRanges`.
func drainHints(_ s: FreePageSource, maxRanges: Int = 64, maxRangeBytes: UInt64 = 4 << 20) throws -> [GuestPhysicalRange] {
    var all: [GuestPhysicalRange] = []
    while true {
        let b = try s.nextBatch(maxRanges: maxRanges, maxRangeBytes: maxRangeBytes)
        if b.isEmpty { return all }
        all += b
    }
}
