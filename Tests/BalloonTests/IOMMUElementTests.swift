import Testing
import BalloonSimulator
import FreePages
import VirtioCore
import VirtioPCI
@testable import Balloon

/// QEMU maps at most 1024 I/O vectors for one element and breaks the device on more; through a
/// vIOMMU (ACCESS_PLATFORM) it needs one per IOMMU page of a descriptor. The simulated device
/// (`iommuPlatform`) counts them as QEMU does behind an IOMMU that maps 4 KiB pages.
@Suite("Elements through an IOMMU never need more than QEMU's 1024 I/O vectors")
struct IOMMUElementTests {
    func rig(hint: Bool = false, report: Bool = false) throws -> Rig {
        var props = BalloonDeviceProperties(freePageHint: hint, freePageReporting: report, ramSize: 256 << 20)
        props.iommuPlatform = true
        var options = BalloonDriverOptions()
        options.deviceAddressing = .iommu(hintsMapped: true, reportsMapped: true)
        let rig = try Rig(props, options: options, hints: SimulatedBuddyAllocator(bytes: 256 << 20, usedFraction: 0.3, seed: 7),
                          realClock: !report)
        try rig.driver.bringUp()
        #expect(rig.driver.negotiated.contains(.accessPlatform))
        return rig
    }

    @Test("a hint round gathering 4 MiB ranges behind a 4 KiB-page IOMMU: every element needs at most 1024 vectors, the device stays sound, every free page is hinted once")
    func hintElementsFit() throws {
        let rig = try rig(hint: true)
        rig.device.processHintsOnNotify = false  // elements gather while the first is out
        var elementPages: [UInt64] = []
        var seen = 0
        rig.device.onHintElement = { dev in
            let all = dev.hintedRanges[0x8000_0001] ?? []
            if all.count > seen {
                elementPages.append(all[seen...].reduce(0) { $0 + $1.length } / 4096)
                seen = all.count
            }
        }
        let free = rig.source.inner.freePages
        rig.device.startHintRound()
        try rig.serviceAll()
        rig.device.drainHintQueue()
        try rig.driver.serviceInterrupt(line: rig.line)
        #expect(!rig.device.broken, "device error: \(rig.device.lastError?.description ?? "")")
        #expect(elementPages.count > 2)
        #expect(elementPages.allSatisfy { $0 <= 1024 }, "pages per element: \(elementPages)")
        #expect(elementPages.contains(1024), "elements still fill up to the limit: \(elementPages)")
        let bytes = (rig.device.hintedRanges[0x8000_0001] ?? []).reduce(UInt64(0)) { $0 + $1.length }
        #expect(bytes == UInt64(free) * 4096, "every free page hinted once")
    }

    @Test("reports behind a 4 KiB-page IOMMU: a huge block is contiguous memory, one vector, so a report still carries up to 32 blocks and the device stays sound")
    func reportElementsFit() throws {
        let rig = try rig(report: true)
        // The balloon's blocks are huge pages: contiguous behind the IOMMU.
        rig.device.iommuContiguous = [GuestPhysicalRange(start: (256 - 64) << 20, length: 64 << 20)]
        rig.memoryStatus.free = (256 + 40) << 20  // 40 MiB above the keep-free watermark
        try rig.driver.tick()
        try rig.serviceAll()
        #expect(!rig.device.broken, "device error: \(rig.device.lastError?.description ?? "")")
        #expect(rig.device.reportedRanges.count == 20)
        #expect(rig.driver.counters.reportsSent == 1, "all 20 blocks in one report")
        #expect(rig.memory.heldBytes == 40 << 20)
    }

    @Test("the simulated device counts as QEMU does: the same report over scattered pages (no contiguous range declared) needs 512 vectors a block and breaks it")
    func simulatorCountsScatteredPages() throws {
        let rig = try rig(report: true)
        rig.memoryStatus.free = (256 + 40) << 20
        try rig.driver.tick()
        #expect(throws: BalloonError.self) { try rig.serviceAll() }
        #expect(rig.device.broken, "20 scattered 2 MiB blocks are 10,240 vectors")
        #expect(rig.device.lastError == .tooManyWriteDescriptors)
    }

    @Test("the vector count: one per descriptor for guest-physical addresses, one per IOMMU page touched through an IOMMU")
    func vectorCount() {
        let physical = ElementVectorBudget(iommuPageBytes: nil)
        let iommu = ElementVectorBudget(iommuPageBytes: 4096)
        let mib = GuestPhysicalRange(start: 1 << 20, length: 1 << 20)
        #expect(physical.vectors(mib) == 1)
        #expect(iommu.vectors(mib) == 256)
        #expect(iommu.vectors(GuestPhysicalRange(start: 0x1800, length: 0x1000)) == 2, "straddles two pages")
        #expect(iommu.longestRange(64 << 20) == 4 << 20)
        #expect(physical.longestRange(64 << 20) == 64 << 20)
        #expect(ElementVectorBudget(iommuPageBytes: 16384).longestRange(64 << 20) == 8 << 20, "a range may start inside a larger IOMMU page")
        let ranges = Array(repeating: mib, count: 10)
        #expect(iommu.prefixFitting(ranges, maxRanges: 256) == 4)
        #expect(physical.prefixFitting(ranges, maxRanges: 256) == 10)
        #expect(physical.prefixFitting(ranges, maxRanges: 3) == 3)
        #expect(iommu.longestRange(1024) == 4096, "never below a balloon page")
    }
}
