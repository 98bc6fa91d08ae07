#if canImport(Glibc)
import Glibc
#endif
import TestSupport
import FreePages
import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux
import VirtioCore

/// Issue 9 H3: the anonymous hint source must not hint a frame the kernel can move between
/// the pagemap read and QEMU applying the hint.
@Suite("Anonymous hint source: frames that cannot move (issue 9 H3)")
struct AnonymousSourceFaultInjectionTests {
    static func setup(compact: String? = "1\n", hold: CompactionHold? = nil) -> (FakeTree, FakeAnonymousMemory, AnonymousSource) {
        let tree = FakeTree()
        tree.file("/proc/self/oom_score_adj", "0\n")
        if let compact { tree.file("/proc/sys/vm/compact_unevictable_allowed", compact) }
        let memory = FakeAnonymousMemory(tree: tree, totalMiB: 1024, freeMiB: 200, availableMiB: 300, blocks: Array(100..<200))
        let limits = OwnedMemoryLimits(marginBytes: 64 << 20, marginFractionOfTotal: 0)
        let source = AnonymousSource(root: tree.root, backend: memory, options: .init(limits: limits, firstChunkBytes: 32 << 20, chunkBytes: 64 << 20),
                                     compactionHold: hold ?? CompactionHold(root: tree.root))
        return (tree, memory, source)
    }

    @Test("compact_unevictable_allowed is 0 before the first chunk is mapped and until the last chunk is released")
    func holdsCompactionForTheRound() throws {
        let (tree, memory, source) = Self.setup()
        try source.beginRound(id: 0x8000_0001)
        let ranges = try drainHints(source)
        #expect(!ranges.isEmpty)
        #expect(!memory.compactAtMap.isEmpty && memory.compactAtMap.allSatisfy { $0 == "0\n" })
        #expect(tree.read("/proc/sys/vm/compact_unevictable_allowed") == "0\n")
        #expect(tree.read(SysctlStateFile.compactUnevictablePath)?.contains("original=1\n") == true, "a killed balloond's restart puts it back")
        source.endRound()
        #expect(tree.read("/proc/sys/vm/compact_unevictable_allowed") == "0\n", "hints still outstanding: memory held")
        source.hintsApplied(ranges)
        #expect(source.heldBytes == 0)
        #expect(tree.read("/proc/sys/vm/compact_unevictable_allowed") == "1\n")
        #expect(tree.read(SysctlStateFile.compactUnevictablePath) == nil)
    }

    @Test("no anonymous memory is taken when compact_unevictable_allowed cannot be set to 0")
    func refusesWithoutTheHold() throws {
        let (tree, memory, source) = Self.setup(compact: nil)
        try Sys.makeDirectories(tree.at("/proc/sys/vm/compact_unevictable_allowed"))  // exists, unreadable as a number
        try source.beginRound(id: 0x8000_0001)
        #expect(throws: FreePageSourceError.self) { _ = try source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20) }
        #expect(memory.compactAtMap.isEmpty, "nothing mapped")
        #expect(source.heldBytes == 0)
    }

    @Test("a chunk whose page moved after its PFNs were read is not hinted")
    func movedChunkIsNotHinted() throws {
        let (_, memory, source) = Self.setup()
        memory.moveAfterFirstRead = [7: 999_999]
        try source.beginRound(id: 0x8000_0001)
        let ranges = try drainHints(source)
        let hinted = Set(AnonymousSourceTests.pfns(ranges))
        #expect(source.lastRound.chunksDroppedMoved == 1)
        #expect(source.movedPages >= 1)
        // The first chunk (32 MiB from blocks 100..<116) is not hinted at all.
        let firstChunk = Set((100..<116).flatMap { b in (0..<512).map { UInt64(b) * 512 + UInt64($0) } })
        #expect(hinted.isDisjoint(with: firstChunk))
        #expect(!hinted.contains(999_999))
        #expect(!hinted.isEmpty, "later chunks are hinted")
    }

    @Test("a shared hold stays at 0 while another user (4 KiB DMA pages) still holds it")
    func sharedHoldOutlivesTheSource() throws {
        let tree = FakeTree()
        tree.file("/proc/sys/vm/compact_unevictable_allowed", "1\n")
        let hold = CompactionHold(root: tree.root)
        try hold.acquire()  // the DMA allocator's pages
        let memory = FakeAnonymousMemory(tree: tree, totalMiB: 1024, freeMiB: 200, availableMiB: 300, blocks: Array(100..<200))
        tree.file("/proc/self/oom_score_adj", "0\n")
        let shared = AnonymousSource(root: tree.root, backend: memory,
                                     options: .init(limits: OwnedMemoryLimits(marginBytes: 64 << 20, marginFractionOfTotal: 0)), compactionHold: hold)
        try shared.beginRound(id: 1)
        let r = try drainHints(shared)
        shared.endRound()
        shared.hintsApplied(r)
        #expect(shared.heldBytes == 0)
        #expect(tree.read("/proc/sys/vm/compact_unevictable_allowed") == "0\n", "the DMA pages still need it")
        hold.release()
        #expect(tree.read("/proc/sys/vm/compact_unevictable_allowed") == "1\n")
    }

    @Test("real chunks are 4 KiB pages without THP, locked, unmergeable",
          .enabled(if: geteuid() == 0, "mlock of 32 MiB needs CAP_IPC_LOCK"))
    func realChunksAreSmallLockedPages() throws {
        let memory = LinuxAnonymousMemory(pagemap: try PagemapResolver(), arena: try DeviceMemoryArena())
        let chunk = try memory.mapPopulated(bytes: 32 << 20)
        defer { chunk.release() }
        let smaps = try Sys.readTextFile("/proc/self/smaps")
        let start = String(chunk.base, radix: 16)
        var flags: [Substring] = []
        var anonHuge: String?
        var inRange = false
        for line in smaps.split(separator: "\n") {
            if let dash = line.firstIndex(of: "-"), line[..<dash].allSatisfy(\.isHexDigit) {
                inRange = line[..<dash].drop(while: { $0 == "0" }) == Substring(start)
                continue
            }
            guard inRange else { continue }
            if line.hasPrefix("VmFlags:") { flags = line.dropFirst(8).split(separator: " ") }
            if line.hasPrefix("AnonHugePages:") { anonHuge = line.split(separator: " ").dropFirst().first.map(String.init) }
        }
        #expect(flags.contains("nh"), "MADV_NOHUGEPAGE")
        #expect(!flags.contains("hg"), "no MADV_HUGEPAGE")
        #expect(flags.contains("lo"), "mlocked")
        #expect(anonHuge == "0")
        let entries = try memory.pagemap(of: chunk)
        #expect(entries.count == (32 << 20) / 4096 && entries.allSatisfy { $0.present && $0.pfn != 0 })
    }
}
