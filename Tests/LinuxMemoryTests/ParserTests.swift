import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux

@Suite struct BuddyInfoTests {
    // This build host's file (kernel 6.18, 11 orders).
    let sample = """
    Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3
    Node 0, zone    DMA32      4      1      2      2      2      2      1      4      4      2    752
    Node 0, zone   Normal   5018   5134   3176   1968   1090    471    186     61     19     13    104

    """

    @Test func parsesZonesAndOrders() throws {
        let b = try BuddyInfo(parsing: sample)
        #expect(b.zones.map(\.name) == ["DMA", "DMA32", "Normal"])
        #expect(b.zones.allSatisfy { $0.node == 0 && $0.freeBlocks.count == 11 })
        #expect(b.zones[2].freeBlocks[0] == 5018)
        #expect(b.zones[1].freeBlocks[10] == 752)
    }

    @Test func countsOnlyLargeBlocksOutsideDMA() throws {
        let b = try BuddyInfo(parsing: sample)
        let mib: UInt64 = 1 << 20
        // Order 9 = 2 MiB, order 10 = 4 MiB. DMA32: 2×2 + 752×4 MiB; Normal: 13×2 + 104×4 MiB;
        // DMA excluded.
        #expect(b.freeBytes(inBlocksOfAtLeast: 2 << 20) == (2 * 2 + 752 * 4 + 13 * 2 + 104 * 4) * mib)
        // Order ≥ 10 only.
        #expect(b.freeBytes(inBlocksOfAtLeast: 4 << 20) == (752 * 4 + 104 * 4) * mib)
        // Including DMA.
        #expect(b.freeBytes(inBlocksOfAtLeast: 2 << 20, excludingZones: []) == (1 * 2 + 3 * 4 + 2 * 2 + 752 * 4 + 13 * 2 + 104 * 4) * mib)
        // Everything from order 0.
        let all = b.zones.filter { $0.name != "DMA" }.flatMap { z in z.freeBlocks.enumerated().map { $0.element << UInt64($0.offset) } }.reduce(0, +)
        #expect(b.freeBytes(inBlocksOfAtLeast: 4096) == all * 4096)
    }

    @Test(arguments: ["Node 0, zone Normal", "Node x, zone Normal 1 2 3", "Node 0, zone Normal 1 two 3", "garbage"])
    func rejectsMalformed(_ line: String) {
        #expect(throws: GuestMemoryError.self) { try BuddyInfo(parsing: line + "\n") }
    }
}

@Suite struct MemoryPressureTests {
    @Test func parsesSomeAndFull() throws {
        let p = try MemoryPressure(parsing: "some avg10=1.25 avg60=0.50 avg300=0.00 total=123456\nfull avg10=0.10 avg60=0.00 avg300=0.00 total=789\n")
        #expect(p.some.avg10 == 1.25)
        #expect(p.some.avg60 == 0.5)
        #expect(p.some.totalMicroseconds == 123_456)
        #expect(p.full?.avg10 == 0.1)
        #expect(p.full?.totalMicroseconds == 789)
    }

    @Test func fullIsOptional() throws {
        let p = try MemoryPressure(parsing: "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
        #expect(p.full == nil)
    }

    @Test(arguments: ["some avg10=x avg60=0 avg300=0 total=0", "full avg10=0 avg60=0 avg300=0 total=0", "some avg10=0 avg60=0 total=0"])
    func rejectsMalformed(_ text: String) {
        #expect(throws: GuestMemoryError.self) { try MemoryPressure(parsing: text + "\n") }
    }

    /// The running kernel's own file parses, with both lines and averages that are percentages.
    /// Where the kernel has no PSI the test is reported as skipped, not passed.
    @Test(.enabled(if: Sys.exists("/proc/pressure/memory"), "this kernel has no /proc/pressure/memory"))
    func parsesThisMachine() throws {
        let p = try MemoryPressure(parsing: try Sys.readTextFile("/proc/pressure/memory"))
        let full = try #require(p.full, "the memory file has a full line")
        for line in [p.some, full] {
            #expect((0...100).contains(line.avg10) && (0...100).contains(line.avg60) && (0...100).contains(line.avg300))
        }
    }
}

@Suite struct KPageFlagsTests {
    @Test func decodesDocumentedBits() {
        #expect(KPageFlags.buddy.rawValue == 1 << 10)
        #expect(KPageFlags.compoundHead.rawValue == 1 << 15)
        #expect(KPageFlags.compoundTail.rawValue == 1 << 16)
        #expect(KPageFlags.huge.rawValue == 1 << 17)
        #expect(KPageFlags.noPage.rawValue == 1 << 20)
        #expect(KPageFlags.thp.rawValue == 1 << 22)
    }

    @Test func classifiesPages() {
        #expect(KPageFlags(rawValue: 1 << 10).isFreeBuddy)
        #expect(!KPageFlags([.buddy, .noPage]).isFreeBuddy)
        #expect(!KPageFlags([.lru, .mmap, .anon]).isFreeBuddy)
        #expect(KPageFlags([.huge, .compoundHead]).isHugeTLBHead)
        #expect(!KPageFlags([.huge, .compoundTail]).isHugeTLBHead)
        #expect(KPageFlags([.huge, .compoundTail]).isHugeTLBTail)
        // A THP head is not a hugetlb page.
        #expect(!KPageFlags([.thp, .compoundHead, .anon]).isHugeTLBHead)
    }

    @Test func describesSetBits() {
        #expect(KPageFlags([.buddy, .huge]).description == "[buddy,huge]")
        #expect(KPageFlags([]).description == "[]")
    }
}

@Suite struct PhysicalMemoryMapTests {
    @Test func takesTopLevelSystemRAMOnly() throws {
        let text = """
        00000000-00000fff : Reserved
        00001000-0009fbff : System RAM
        0009fc00-000fffff : Reserved
          000f0000-000fffff : System ROM
        00100000-bfffffff : System RAM
          01000000-02276987 : Kernel code
        c0001000-eebfffff : PCI Bus 0000:00
        100000000-63fffffff : System RAM
          100000000-100000fff : System RAM

        """
        let m = try #require(PhysicalMemoryMap.parse(iomem: text))
        // 0x1000–0x9fbff: partial last page dropped → PFNs 1..<0x9f.
        #expect(m.ramFrames == [1..<0x9f, 0x100..<0xc0000, 0x100000..<0x640000])
        #expect(m.bytes == UInt64(0x9e + (0xc0000 - 0x100) + (0x640000 - 0x100000)) * 4096)
    }

    @Test func zeroAddressesAsNonRootGiveNil() {
        #expect(PhysicalMemoryMap.parse(iomem: "00000000-00000000 : System RAM\n00000000-00000000 : Reserved\n") == nil)
        #expect(PhysicalMemoryMap.parse(iomem: "") == nil)
    }
}

@Suite struct OwnedMemoryAllowanceTests {
    let mib: UInt64 = 1 << 20
    func snapshot(total: UInt64 = 1024, free: UInt64 = 700, available: UInt64 = 800, buddy2M: UInt64? = nil, avg10: Double? = nil, stall: UInt64 = 0) -> MemorySnapshot {
        var buddy: BuddyInfo?
        if let b = buddy2M {
            var counts = [UInt64](repeating: 0, count: 11)
            counts[9] = b / 2
            buddy = BuddyInfo(zones: [.init(node: 0, name: "Normal", freeBlocks: counts), .init(node: 0, name: "DMA", freeBlocks: [0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 5])])
        }
        let pressure = avg10.map { MemoryPressure(some: .init(avg10: $0, avg60: 0, avg300: 0, totalMicroseconds: stall), full: nil) }
        return MemorySnapshot(memTotal: total * mib, memFree: free * mib, memAvailable: available * mib, buddy: buddy, pressure: pressure)
    }

    @Test func marginIsTheLargerOfBytesAndShare() {
        let l = OwnedMemoryLimits(marginBytes: 64 << 20, marginFractionOfTotal: 0.02)
        #expect(l.margin(memTotal: 1 << 30) == 64 << 20)            // 2% of 1 GiB = 20 MiB < 64 MiB
        #expect(l.margin(memTotal: 24 << 30) == UInt64(Double(24 << 30) * 0.02))  // 491 MiB
    }

    @Test func takesTheLeastOfFreeAvailableBuddyAndCap() {
        let l = OwnedMemoryLimits(marginBytes: 64 << 20, marginFractionOfTotal: 0)
        var a = memoryAllowance(.freeMemory, limits: l, now: snapshot(), pressureAtStart: nil, heldBytes: 0)
        #expect(a.bytes == (700 - 64) * mib)
        #expect(a.limitedBy.contains("MemFree"))
        a = memoryAllowance(.freeMemory, limits: l, now: snapshot(free: 900, available: 500), pressureAtStart: nil, heldBytes: 0)
        #expect(a.bytes == (500 - 64) * mib)
        #expect(a.limitedBy.contains("MemAvailable"))
        a = memoryAllowance(.freeMemory, limits: l, now: snapshot(buddy2M: 300), pressureAtStart: nil, heldBytes: 0)
        #expect(a.bytes == (300 - 64) * mib)
        #expect(a.limitedBy.contains("≥2 MiB blocks"))
        let capped = OwnedMemoryLimits(marginBytes: 64 << 20, marginFractionOfTotal: 0, maxHeldBytes: 256 << 20)
        a = memoryAllowance(.freeMemory, limits: capped, now: snapshot(), pressureAtStart: nil, heldBytes: 200 * mib)
        #expect(a.bytes == 56 * mib)
        #expect(a.limitedBy.contains("cap"))
    }

    @Test("the balloon's basis is MemAvailable alone (it may make the kernel reclaim page cache): MemFree and the buddy blocks do not limit it, the cap and PSI do")
    func balloonBasisIsMemAvailable() {
        let l = OwnedMemoryLimits(marginBytes: 64 << 20, marginFractionOfTotal: 0, maxPressureSomeAvg10: 5, maxStallMicrosecondsPerRound: 100_000)
        var a = memoryAllowance(.availableMemory, limits: l, now: snapshot(free: 100, available: 800, buddy2M: 50), pressureAtStart: nil, heldBytes: 0)
        #expect(a.bytes == (800 - 64) * mib)
        #expect(a.limitedBy.contains("MemAvailable"))
        let capped = OwnedMemoryLimits(marginBytes: 64 << 20, marginFractionOfTotal: 0, maxHeldBytes: 256 << 20)
        a = memoryAllowance(.availableMemory, limits: capped, now: snapshot(), pressureAtStart: nil, heldBytes: 200 * mib)
        #expect(a.bytes == 56 * mib)
        let start = MemoryPressure(some: .init(avg10: 0, avg60: 0, avg300: 0, totalMicroseconds: 1_000_000), full: nil)
        a = memoryAllowance(.availableMemory, limits: l, now: snapshot(avg10: 0.5, stall: 1_150_000), pressureAtStart: start, heldBytes: 0)
        #expect(a.bytes == 0)
        #expect(a.limitedBy.contains("150 ms on memory while the balloon was taking memory"))
    }

    @Test func neverNegative() {
        let l = OwnedMemoryLimits(marginBytes: 64 << 20, marginFractionOfTotal: 0)
        let a = memoryAllowance(.freeMemory, limits: l, now: snapshot(free: 50, available: 60), pressureAtStart: nil, heldBytes: 0)
        #expect(a.bytes == 0)
    }

    @Test func pressureStopsTaking() {
        let l = OwnedMemoryLimits(marginBytes: 64 << 20, marginFractionOfTotal: 0, maxPressureSomeAvg10: 5, maxStallMicrosecondsPerRound: 100_000)
        var a = memoryAllowance(.freeMemory, limits: l, now: snapshot(avg10: 7.5), pressureAtStart: nil, heldBytes: 0)
        #expect(a.bytes == 0)
        #expect(a.limitedBy.contains("avg10=7.5"))
        // Low average, but 150 ms of stall since the round began.
        let start = MemoryPressure(some: .init(avg10: 0, avg60: 0, avg300: 0, totalMicroseconds: 1_000_000), full: nil)
        a = memoryAllowance(.freeMemory, limits: l, now: snapshot(avg10: 0.5, stall: 1_150_000), pressureAtStart: start, heldBytes: 0)
        #expect(a.bytes == 0)
        #expect(a.limitedBy.contains("150 ms"))
        a = memoryAllowance(.freeMemory, limits: l, now: snapshot(avg10: 0.5, stall: 1_050_000), pressureAtStart: start, heldBytes: 0)
        #expect(a.bytes == (700 - 64) * mib)
    }
}
