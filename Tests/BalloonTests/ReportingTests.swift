import Testing
import BalloonSimulator
import VirtioCore
import VirtioPCI
import VirtioQueue
import FreePages
@testable import Balloon

@Suite("Free page reporting, report-then-hold (docs/virtio-balloon.md §8)")
struct ReportingTests {
    func reportingRig(pagePoison: PagePoisonPolicy = .none, balloonBytes: UInt64 = 64 << 20) throws -> Rig {
        var props = BalloonDeviceProperties()
        props.freePageReporting = true
        let rig = try Rig(props, options: BalloonDriverOptions(poisonPolicy: pagePoison), balloonBytes: balloonBytes)
        rig.memoryStatus.free = (256 + 40) << 20  // 40 MiB above the keep-free watermark
        try rig.driver.bringUp()
        return rig
    }

    @Test("free memory above the watermark is reported in 2 MiB-aligned blocks, at most 32 per buffer, and held")
    func reportsHugeBlocks() throws {
        let rig = try reportingRig()
        try rig.driver.tick()
        try rig.serviceAll()
        #expect(rig.device.reportedRanges.count == 20)
        #expect(rig.device.reportedRanges.allSatisfy { $0.length == 2 << 20 && $0.start.value % (2 << 20) == 0 })
        #expect(rig.memory.heldBytes == 40 << 20)
        #expect(rig.driver.statusSnapshot().reportedBytes == 40 << 20)
        #expect(rig.driver.counters.reportsSent == 1)
    }

    @Test("low MemFree gives reported blocks back, then a cooldown passes before reporting again")
    func releaseAndCooldown() throws {
        let rig = try reportingRig()
        try rig.driver.tick()
        try rig.serviceAll()
        rig.memoryStatus.free = 100 << 20
        rig.clock.advance(milliseconds: 300)
        try rig.driver.tick()
        #expect(rig.memory.heldBytes == 0)  // the 64 MiB step covers all 40 MiB
        rig.memoryStatus.free = 400 << 20
        rig.clock.advance(milliseconds: 5000)
        try rig.driver.tick()
        #expect(rig.driver.counters.reportsSent == 1, "reported again inside the cooldown")
        rig.clock.advance(milliseconds: 6000)
        try rig.driver.tick()
        try rig.serviceAll()
        #expect(rig.driver.counters.reportsSent == 2)
    }

    @Test("with a non-zero poison_val nothing is reported (QEMU would ignore it)")
    func poisonDisablesReporting() throws {
        let rig = try reportingRig(pagePoison: .poison)
        try rig.driver.tick()
        try rig.serviceAll()
        #expect(rig.device.poisonVal == 0xAAAA_AAAA)
        #expect(rig.device.reportedRanges.isEmpty)
        #expect(rig.memory.heldBytes == 0)
    }

    @Test("inflating takes reported blocks first: they are already discarded on the host")
    func inflateRecyclesReported() throws {
        let rig = try reportingRig()
        try rig.driver.tick()
        try rig.serviceAll()
        let reported = Set(rig.device.reportedRanges.flatMap { r in (r.start.value >> 12)..<((r.start.value + r.length) >> 12) }.map(UInt32.init))
        let takesBefore = rig.memory.events.count
        rig.setTarget(pages: 2048)
        try rig.serviceAll()
        #expect(rig.device.actual == 2048)
        #expect(rig.device.inflatedPFNs.isSubset(of: reported))
        #expect(rig.memory.events.count == takesBefore, "took new memory although reported blocks were held")
    }

    @Test("a report is not sent while the balloon is still moving towards its target")
    func targetFirst() throws {
        let rig = try reportingRig()
        rig.device.processPFNsOnNotify = false
        rig.setTarget(pages: 1024)
        try rig.serviceAll()
        try rig.driver.tick()
        #expect(rig.driver.counters.reportsSent == 0)
    }
}
