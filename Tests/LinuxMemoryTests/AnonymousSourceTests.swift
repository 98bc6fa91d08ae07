import TestSupport
import FreePages
import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux
import VirtioCore

@Suite struct AnonymousSourceTests {
    struct Setup {
        let tree: FakeTree
        let memory: FakeAnonymousMemory
        let source: AnonymousSource
    }

    /// 1 GiB guest, 200 MiB free, 300 MiB available, 64 MiB margin. Physical blocks: runs of
    /// adjacent 2 MiB blocks with gaps, so coalescing has something to do.
    static func setup(freeMiB: UInt64 = 200, capMiB: UInt64? = nil) -> Setup {
        let tree = FakeTree()
        tree.file("/proc/self/oom_score_adj", "0\n")
        let blocks: [UInt64] = Array(100..<140) + Array(300..<340) + Array(500..<600)
        let memory = FakeAnonymousMemory(tree: tree, totalMiB: 1024, freeMiB: freeMiB, availableMiB: freeMiB + 100, blocks: blocks)
        let limits = OwnedMemoryLimits(marginBytes: 64 << 20, marginFractionOfTotal: 0, maxHeldBytes: capMiB.map { $0 << 20 })
        let source = AnonymousSource(root: tree.root, backend: memory,
                                     options: .init(limits: limits, firstChunkBytes: 32 << 20, chunkBytes: 64 << 20))
        return Setup(tree: tree, memory: memory, source: source)
    }

    static func pfns(_ ranges: [GuestPhysicalRange]) -> [UInt64] {
        ranges.flatMap { r in stride(from: r.start.value / 4096, to: r.end / 4096, by: 1).map { $0 } }
    }

    @Test func takesChunksWithinTheAllowanceAndHintsTheirFrames() throws {
        let s = Self.setup()
        #expect(s.source.name == "anonymous" && s.source.ownership == .owned)
        try s.source.beginRound(id: 0x8000_0001)
        let first = try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20)
        #expect(first.reduce(0) { $0 + $1.length } == 32 << 20, "a small first chunk, hinted at once")
        let ranges = first + (try drainHints(s.source))
        // 200 MiB free − 64 MiB margin, re-read before each chunk: 32 + 64 + 40.
        #expect(s.source.lastRound.chunks == 3)
        #expect(s.source.heldBytes == 136 << 20)
        #expect(s.source.lastRound.stoppedBecause?.contains("margin") == true)
        let hinted = Self.pfns(ranges)
        #expect(hinted.count == Set(hinted).count, "no page hinted twice")
        #expect(Set(hinted) == s.memory.heldPFNs, "exactly the pages held")
        #expect(ranges.allSatisfy { $0.length <= 4 << 20 && $0.start.value % 4096 == 0 })
        // Adjacent blocks are coalesced to 4 MiB descriptors; the gap at block 140 splits.
        #expect(ranges.first == GuestPhysicalRange(start: 100 * (2 << 20), length: 4 << 20))
        #expect(ranges.count < hinted.count / 512)
    }

    @Test func raisesTheOOMScoreWhileHolding() throws {
        let s = Self.setup()
        try s.source.beginRound(id: 1)
        #expect(s.tree.read("/proc/self/oom_score_adj") == "0\n", "nothing held yet")
        let r = try drainHints(s.source)
        #expect(s.tree.read("/proc/self/oom_score_adj") == "1000\n")
        s.source.endRound()
        s.source.hintsApplied(r)
        #expect(s.source.heldBytes == 0)
        #expect(s.tree.read("/proc/self/oom_score_adj") == "0\n")
    }

    @Test func stopsUnderMemoryPressure() throws {
        let s = Self.setup()
        s.tree.file("/proc/pressure/memory", "some avg10=12.00 avg60=3.00 avg300=1.00 total=99999\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=100\n")
        try s.source.beginRound(id: 1)
        #expect(try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20).isEmpty)
        #expect(s.source.lastRound.stoppedBecause?.contains("PSI") == true)
        #expect(s.memory.mapped.isEmpty)
        #expect(s.tree.read("/proc/self/oom_score_adj") == "0\n")
    }

    @Test func stopsWhenStallsGrowDuringTheRound() throws {
        let s = Self.setup()
        s.tree.file("/proc/pressure/memory", "some avg10=0.00 avg60=0.00 avg300=0.00 total=1000000\n")
        try s.source.beginRound(id: 1)
        #expect(!(try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20)).isEmpty)
        s.tree.file("/proc/pressure/memory", "some avg10=0.50 avg60=0.00 avg300=0.00 total=1200000\n")
        _ = try drainHints(s.source)
        #expect(s.source.lastRound.chunks == 1)
        #expect(s.source.lastRound.stoppedBecause?.contains("stalled 200 ms") == true)
    }

    @Test func keepsChunksUntilTheirDescriptorsAreBack() throws {
        let s = Self.setup()
        try s.source.beginRound(id: 1)
        let r = try drainHints(s.source)
        s.source.endRound()
        #expect(s.memory.mapped.count == 3, "STOP was posted but hints are still queued")
        s.source.hintsApplied(Array(r.prefix(r.count - 1)))
        #expect(s.memory.mapped.count == 1, "chunks whose hints are all used are released")
        s.source.hintsApplied([r.last!])
        #expect(s.memory.mapped.isEmpty)
        #expect(s.source.movedPages == 0)
    }

    @Test func doesNotReleaseDuringTheRound() throws {
        let s = Self.setup()
        try s.source.beginRound(id: 1)
        let r = try drainHints(s.source)
        s.source.hintsApplied(r)
        #expect(s.memory.mapped.count == 3, "kept until the round ends, so the round does not re-take freed memory")
        s.source.endRound()
        #expect(s.memory.mapped.isEmpty)
    }

    @Test func previousRoundsChunksGoOnceTheirDescriptorsReturn() throws {
        let s = Self.setup(capMiB: 32)
        try s.source.beginRound(id: 1)
        let r1 = try drainHints(s.source)
        s.source.endRound()
        try s.source.beginRound(id: 2)
        #expect(try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20).isEmpty, "the cap is still used by round 1")
        s.source.hintsApplied(r1)
        #expect(s.memory.mapped.isEmpty, "round 1's chunk goes during round 2")
        s.source.endRound()
    }

    @Test func detectsMovedPages() throws {
        let s = Self.setup(capMiB: 32)
        try s.source.beginRound(id: 1)
        let r = try drainHints(s.source)
        let base = try #require(s.memory.mapped.keys.first)
        s.memory.moves[base] = [7: 999_999]
        s.source.endRound()
        s.source.hintsApplied(r)
        #expect(s.source.movedPages == 1, "reported once, although checked after the hints and before release")
        #expect(s.memory.mapped.isEmpty)
    }

    @Test func releaseAllReturnsEverythingAtOnce() throws {
        let s = Self.setup()
        try s.source.beginRound(id: 1)
        let old = try drainHints(s.source)
        s.source.releaseAll()
        #expect(s.memory.mapped.isEmpty)
        #expect(s.tree.read("/proc/self/oom_score_adj") == "0\n")
        // Late descriptors of the released memory are ignored; a new round starts clean.
        s.source.hintsApplied(old)
        try s.source.beginRound(id: 2)
        #expect(!(try drainHints(s.source)).isEmpty)
        s.source.endRound()
        #expect(s.memory.mapped.count == 3, "the new round's descriptors are out")
    }

    @Test func backendFailureEndsTakingForTheRound() throws {
        let s = Self.setup()
        try s.source.beginRound(id: 1)
        let failure = GuestMemoryError.cannotMap(bytes: 32 << 20, step: .populate, SystemCallError(call: "madvise", path: nil, errno: .noMemory))
        s.memory.failNextMap = failure
        #expect { _ = try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20) } throws: { reason($0, as: GuestMemoryError.self) == failure }
        #expect(try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20).isEmpty)
        s.source.endRound()
        try s.source.beginRound(id: 2)
        #expect(!(try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20)).isEmpty, "the next round tries again")
        s.source.releaseAll()
    }

    @Test func aPageWithoutPFNIsRefused() throws {
        let s = Self.setup()
        try s.source.beginRound(id: 1)
        s.memory.notPresent = [3]
        #expect {
            _ = try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20)
        } throws: { e in
            guard case .noPFN(let page, let entry)? = reason(e, as: GuestMemoryError.self) else { return false }
            return page == 3 && !entry.present
        }
        #expect(s.memory.mapped.isEmpty, "the chunk is unmapped again")
    }

    @Test func respectsMaxRangesAcrossBatches() throws {
        let s = Self.setup(capMiB: 32)
        try s.source.beginRound(id: 1)
        var all: [GuestPhysicalRange] = []
        while true {
            let b = try s.source.nextBatch(maxRanges: 3, maxRangeBytes: 1 << 20)
            if b.isEmpty { break }
            #expect(b.count <= 3)
            all += b
        }
        #expect(all.count == 32)
        #expect(all.allSatisfy { $0.length == 1 << 20 })
        s.source.releaseAll()
    }
}
