import TestSupport
import FreePages
import PlatformLinux
import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import VirtioCore

@Suite struct KPageFlagsSourceTests {
    static let buddy = KPageFlags.buddy.rawValue
    static let used = KPageFlags([.lru, .mmap, .anon]).rawValue

    /// 4096 frames: free runs [10,20), [100,1100) (crossing several 256-entry chunks),
    /// [2000], [2047,2049) (across a chunk boundary exactly), [4000,4096) (to the end), and
    /// a buddy page with KPF_NOPAGE (never hinted).
    static func pattern() -> [UInt64] {
        var v = [UInt64](repeating: used, count: 4096)
        for r in [10..<20, 100..<1100, 2000..<2001, 2047..<2049, 4000..<4096] { for i in r { v[i] = buddy } }
        v[3000] = buddy | KPageFlags.noPage.rawValue
        return v
    }

    /// Reference: runs of free pages, highest address first (RAM ranges from the top, each
    /// read in chunks of `chunk` frames from its top down, each chunk from its last frame
    /// down), cut at chunk ends and every `maxPages` from a run's top.
    static func expected(_ v: [UInt64], ram: [Range<UInt64>], chunk: UInt64, maxPages: UInt64 = 1 << 40) -> [GuestPhysicalRange] {
        var out: [GuestPhysicalRange] = []
        for r in ram.reversed() {
            var hi = r.upperBound
            while hi > r.lowerBound {
                let lo = max(r.lowerBound, hi >= chunk ? hi - chunk : 0)
                var top: UInt64?
                var n: UInt64 = 0
                func close() {
                    if let t = top { out.append(GuestPhysicalRange(start: (t - n) * 4096, length: n * 4096)) }
                    top = nil
                    n = 0
                }
                for pfn in (lo..<hi).reversed() where pfn < UInt64(v.count) {
                    if KPageFlags(rawValue: v[Int(pfn)]).isFreeBuddy {
                        if top == nil { top = pfn + 1 }
                        n += 1
                        if n == maxPages { close() }
                    } else { close() }
                }
                close()
                hi = lo
            }
        }
        return out
    }

    func drain(_ s: KPageFlagsSource, maxRanges: Int, maxRangeBytes: UInt64) throws -> (ranges: [GuestPhysicalRange], batches: Int) {
        var all: [GuestPhysicalRange] = []
        var batches = 0
        while true {
            let b = try s.nextBatch(maxRanges: maxRanges, maxRangeBytes: maxRangeBytes)
            if b.isEmpty { return (all, batches) }
            #expect(b.count <= maxRanges)
            batches += 1
            all += b
        }
    }

    func makeTree(_ v: [UInt64]) -> FakeTree {
        let t = FakeTree()
        t.u64File("/proc/kpageflags", v)
        return t
    }

    @Test func findsBuddyRunsAndCutsThemAtChunkEnds() throws {
        let v = Self.pattern()
        let t = makeTree(v)
        let s = try KPageFlagsSource(root: t.root, chunkEntries: 256, memoryMap: PhysicalMemoryMap(ramFrames: [0..<4096]))
        #expect(s.ownership == .observed)
        #expect(s.name == "kpageflags")
        #expect(s.preferredMaxRangeBytes == 256 * 4096, "a descriptor as long as a chunk")
        try s.beginRound(id: 0x8000_0001)
        let (ranges, batches) = try drain(s, maxRanges: 64, maxRangeBytes: 1 << 30)
        #expect(ranges == [
            GuestPhysicalRange(start: 4000 * 4096, length: 96 * 4096),
            GuestPhysicalRange(start: 2048 * 4096, length: 4096),      // chunk [2048, 2304)
            GuestPhysicalRange(start: 2047 * 4096, length: 4096),      // chunk [1792, 2048)
            GuestPhysicalRange(start: 2000 * 4096, length: 4096),
            GuestPhysicalRange(start: 1024 * 4096, length: 76 * 4096),
            GuestPhysicalRange(start: 768 * 4096, length: 256 * 4096),
            GuestPhysicalRange(start: 512 * 4096, length: 256 * 4096),
            GuestPhysicalRange(start: 256 * 4096, length: 256 * 4096),
            GuestPhysicalRange(start: 100 * 4096, length: 156 * 4096),
            GuestPhysicalRange(start: 10 * 4096, length: 10 * 4096),
        ])
        #expect(batches > 1, "streams chunk by chunk")
        #expect(s.lastScan.framesScanned == 4096)
        #expect(s.lastScan.freeFrames == 10 + 1000 + 1 + 2 + 96)
        #expect(s.heldBytes == 0)
    }

    /// A free run longer than a chunk is not held back until the read below ends it: each
    /// read's part leaves at once, so at most one chunk of scanned memory waits unhinted.
    @Test func aLongRunLeavesChunkByChunk() throws {
        var v = Self.pattern()
        for i in 3500..<4096 { v[i] = Self.buddy }
        let t = makeTree(v)
        let s = try KPageFlagsSource(root: t.root, chunkEntries: 256, memoryMap: PhysicalMemoryMap(ramFrames: [0..<4096]))
        try s.beginRound(id: 7)
        #expect(try s.nextBatch(maxRanges: 64, maxRangeBytes: 1 << 30) == [GuestPhysicalRange(start: 3840 * 4096, length: 256 * 4096)])
        #expect(s.lastScan.reads == 1)
        #expect(try s.nextBatch(maxRanges: 64, maxRangeBytes: 1 << 30) == [GuestPhysicalRange(start: 3584 * 4096, length: 256 * 4096)])
        #expect(s.lastScan.reads == 2)
    }

    @Test(arguments: [(1, 64 << 10), (3, 4 << 20), (64, 4096), (2, 40 << 10)] as [(Int, UInt64)])
    func batchesContinueAndSplitLongRuns(maxRanges: Int, maxRangeBytes: UInt64) throws {
        let v = Self.pattern()
        let t = makeTree(v)
        let s = try KPageFlagsSource(root: t.root, chunkEntries: 100, memoryMap: PhysicalMemoryMap(ramFrames: [0..<4096]))
        try s.beginRound(id: 7)
        let (ranges, _) = try drain(s, maxRanges: maxRanges, maxRangeBytes: maxRangeBytes)
        #expect(ranges == Self.expected(v, ram: [0..<4096], chunk: 100, maxPages: maxRangeBytes / 4096))
        #expect(ranges.allSatisfy { $0.start.value % 4096 == 0 && $0.length % 4096 == 0 && $0.length <= maxRangeBytes })
    }

    @Test func runsNeverCrossRAMHoles() throws {
        let v = Self.pattern()
        let t = makeTree(v)
        let ram: [Range<UInt64>] = [0..<1000, 1050..<3500]
        let s = try KPageFlagsSource(root: t.root, chunkEntries: 64, memoryMap: PhysicalMemoryMap(ramFrames: ram))
        try s.beginRound(id: 7)
        let (ranges, _) = try drain(s, maxRanges: 8, maxRangeBytes: 4 << 20)
        #expect(ranges == Self.expected(v, ram: ram, chunk: 64, maxPages: 1024))
        #expect(ranges.allSatisfy { r in ram.contains { $0.lowerBound * 4096 <= r.start.value && r.start.value + r.length <= $0.upperBound * 4096 } })
        #expect(ranges.contains { $0.start.value == 1050 * 4096 }, "the run [100, 1100) restarts above the hole")
        #expect(ranges.contains { $0.start.value + $0.length == 1000 * 4096 }, "and ends below it")
        #expect(!ranges.contains { $0.start.value >= 3500 * 4096 })
    }

    @Test func withoutAMapScansToTheEndOfTheFile() throws {
        let v = Self.pattern()
        let t = makeTree(v)  // no /proc/iomem in the tree
        let s = try KPageFlagsSource(root: t.root, chunkEntries: 1000)
        try s.beginRound(id: 7)
        let (ranges, _) = try drain(s, maxRanges: 64, maxRangeBytes: 4 << 20)
        #expect(ranges == Self.expected(v, ram: [0..<4096], chunk: 1000, maxPages: 1024))
    }

    @Test func readsIomemFromTheTree() throws {
        let v = Self.pattern()
        let t = makeTree(v)
        t.file("/proc/iomem", "00000000-00000fff : Reserved\n00001000-003e7fff : System RAM\n")  // PFNs 1..<1000
        let s = try KPageFlagsSource(root: t.root, chunkEntries: 128)
        try s.beginRound(id: 7)
        let (ranges, _) = try drain(s, maxRanges: 64, maxRangeBytes: 4 << 20)
        #expect(ranges == Self.expected(v, ram: [1..<1000], chunk: 128, maxPages: 1024))
    }

    @Test func onlyScansInsideARound() throws {
        let t = makeTree(Self.pattern())
        let s = try KPageFlagsSource(root: t.root, chunkEntries: 256)
        #expect(try s.nextBatch(maxRanges: 8, maxRangeBytes: 4 << 20).isEmpty)
        try s.beginRound(id: 7)
        #expect(!(try s.nextBatch(maxRanges: 1, maxRangeBytes: 4 << 20)).isEmpty)
        s.endRound()
        #expect(try s.nextBatch(maxRanges: 8, maxRangeBytes: 4 << 20).isEmpty)
        // A new round rescans from the top (free memory is read after each new id).
        try s.beginRound(id: 8)
        let (ranges, _) = try drain(s, maxRanges: 64, maxRangeBytes: 4 << 20)
        #expect(ranges.first == GuestPhysicalRange(start: 4000 * 4096, length: 96 * 4096))
        #expect(ranges.last == GuestPhysicalRange(start: 10 * 4096, length: 10 * 4096))
    }

    /// QEMU's migration thread sends from the bottom up, so the scan hints the top first:
    /// every batch lies below the one before, and the first read is the top chunk of the
    /// highest RAM range (4 GiB q35: GPA 6 GiB down to 4 GiB, then 2 GiB down to 0).
    @Test func hintsTheHighestAddressesFirst() throws {
        let v = Self.pattern()
        let t = makeTree(v)
        let s = try KPageFlagsSource(root: t.root, chunkEntries: 256, memoryMap: PhysicalMemoryMap(ramFrames: [0..<1000, 1050..<4096]))
        try s.beginRound(id: 7)
        let first = try s.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20)
        #expect(first == [GuestPhysicalRange(start: 4000 * 4096, length: 96 * 4096)])
        #expect(s.lastScan.reads == 1 && s.lastScan.framesScanned == 256, "streams after the top chunk")
        var previousStart = first[0].start.value
        while true {
            let b = try s.nextBatch(maxRanges: 2, maxRangeBytes: 64 << 10)
            if b.isEmpty { break }
            for r in b {
                #expect(r.start.value + r.length <= previousStart, "\(r) lies below the range hinted before it")
                previousStart = r.start.value
            }
        }
        #expect(s.lastScan.finished && s.lastScan.framesScanned == 1000 + 3046)
    }

    /// Without /proc/iomem the file's end is found by probing reads (the file reports no
    /// size), and a map that runs past the file's end stops at it.
    @Test(arguments: [0, 1, 4095, 4096, 4097])
    func findsTheEndOfTheFileWithoutAMap(entries: Int) throws {
        let v = Array(Self.pattern().prefix(entries)) + [UInt64](repeating: Self.buddy, count: max(0, entries - 4096))
        let t = makeTree(v)
        let s = try KPageFlagsSource(root: t.root, chunkEntries: 300)
        try s.beginRound(id: 7)
        let (ranges, _) = try drain(s, maxRanges: 64, maxRangeBytes: 4 << 20)
        #expect(ranges == Self.expected(v, ram: [0..<UInt64(entries)], chunk: 300, maxPages: 1024))
        #expect(s.lastScan.framesScanned == UInt64(entries))

        let ram = [0..<UInt64(entries) + 1000]
        let beyond = try KPageFlagsSource(root: t.root, chunkEntries: 300, memoryMap: PhysicalMemoryMap(ramFrames: ram))
        try beyond.beginRound(id: 8)
        #expect(try drain(beyond, maxRanges: 64, maxRangeBytes: 4 << 20).ranges == Self.expected(v, ram: ram, chunk: 300, maxPages: 1024))
        #expect(beyond.lastScan.framesScanned == UInt64(entries))
    }

    @Test func missingFileIsAnActionableError() {
        let t = FakeTree()
        #expect {
            _ = try KPageFlagsSource(root: t.root)
        } throws: { e in
            guard case .cannotOpenPageFile(let path, let failure)? = reason(e, as: GuestMemoryError.self) else { return false }
            return path == t.at("/proc/kpageflags") && failure.errno == .noSuchFileOrDirectory && "\(e)".contains("CAP_SYS_ADMIN")
        }
    }
}
