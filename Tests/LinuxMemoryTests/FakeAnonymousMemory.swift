import TestSupport
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux

/// Fake anonymous memory: chunks get 2 MiB blocks of fake physical memory from a list, and
/// /proc/meminfo in the tree loses (and regains) what they hold.
final class FakeAnonymousMemory: AnonymousMemoryBackend {
    let tree: FakeTree
    var memTotal: UInt64
    var memFree: UInt64
    var memAvailable: UInt64
    /// 2 MiB physical blocks still to hand out, in order.
    var blocks: [UInt64]
    private var nextVA: UInt = 0x7f00_0000_0000
    /// Live chunks: base VA → PFN of each 4 KiB page.
    private(set) var mapped: [UInt: [UInt64]] = [:]
    private(set) var unmapCount = 0
    /// Pages moved by "the kernel": (chunk base, page index) → new PFN.
    var moves: [UInt: [Int: UInt64]] = [:]
    var failNextMap: GuestMemoryError?
    /// Page indices reported not present in the next chunk.
    var notPresent: Set<Int> = []
    /// Pages "the kernel" moves right after a chunk's first pagemap read: page index → new PFN
    /// (applies to the next chunk mapped).
    var moveAfterFirstRead: [Int: UInt64] = [:]
    private var pendingMoves: [UInt: [Int: UInt64]] = [:]
    /// compact_unevictable_allowed at each mmap (nil: no such file).
    private(set) var compactAtMap: [String?] = []

    init(tree: FakeTree, totalMiB: UInt64, freeMiB: UInt64, availableMiB: UInt64, blocks: [UInt64]) {
        self.tree = tree
        memTotal = totalMiB << 20
        memFree = freeMiB << 20
        memAvailable = availableMiB << 20
        self.blocks = blocks
        writeMeminfo()
    }

    func writeMeminfo() { tree.meminfo(total: memTotal, free: memFree, available: memAvailable) }

    func mapPopulated(bytes: Int) throws(GuestMemoryError) -> AnonymousChunk {
        compactAtMap.append(tree.read("/proc/sys/vm/compact_unevictable_allowed"))
        if let e = failNextMap { failNextMap = nil; throw e }
        let n = bytes / (2 << 20)
        precondition(blocks.count >= n, "fake ran out of blocks")
        let taken = blocks.prefix(n)
        blocks.removeFirst(n)
        let pfns = taken.flatMap { b in (0..<512).map { b * 512 + UInt64($0) } }
        let va = nextVA
        nextVA += UInt(bytes) + (2 << 20)
        mapped[va] = pfns
        if !moveAfterFirstRead.isEmpty { pendingMoves[va] = moveAfterFirstRead; moveAfterFirstRead = [:] }
        memFree -= UInt64(bytes)
        memAvailable -= UInt64(bytes)
        writeMeminfo()
        return AnonymousChunk(base: va, bytes: bytes, usedPopulateWrite: true) { [weak self] in
            guard let self else { return }
            self.mapped[va] = nil
            self.unmapCount += 1
            self.memFree += UInt64(bytes)
            self.memAvailable += UInt64(bytes)
            self.writeMeminfo()
        }
    }

    func pagemap(of chunk: AnonymousChunk) throws(GuestMemoryError) -> [PagemapEntry] {
        guard let pfns = mapped[chunk.base] else {
            throw .cannotRead(path: "/proc/self/pagemap", SystemCallError(call: "pread", path: "/proc/self/pagemap", errno: .badAddress))
        }
        let moved = moves[chunk.base] ?? [:]
        let present: UInt64 = 1 << 63
        let missing = notPresent
        notPresent = []
        defer { if let m = pendingMoves.removeValue(forKey: chunk.base) { moves[chunk.base, default: [:]].merge(m) { $1 } } }
        return pfns.enumerated().map { i, pfn in
            missing.contains(i) ? PagemapEntry(rawValue: 0) : PagemapEntry(rawValue: present | (moved[i] ?? pfn))
        }
    }

    var heldPFNs: Set<UInt64> { Set(mapped.values.joined()) }
}
