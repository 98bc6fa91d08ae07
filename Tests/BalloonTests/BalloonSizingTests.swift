import Testing
import BalloonSimulator
import VirtioCore
import VirtioPCI
import VirtioQueue
import BalloonBlocks
import FreePages
@testable import Balloon

@Suite("Inflate and deflate (docs/virtio-balloon.md §4)")
struct BalloonSizingTests {
    @Test("inflating to num_pages sends each 2 MiB block's 512 PFNs in one buffer, and the host discards whole 2 MiB pages")
    func inflateHugeBlocks() throws {
        let rig = try Rig()
        rig.device.hostPageSize = 2 << 20
        _ = try rig.running(target: 8192)  // 32 MiB
        #expect(rig.device.actual == 8192)
        #expect(rig.device.inflatedPFNs.count == 8192)
        #expect(Set(rig.memory.held.values.flatMap(\.pfns)) == rig.device.inflatedPFNs)
        #expect(rig.memory.held.values.allSatisfy { $0.isHuge })
        // Every block's PFNs are contiguous inside one buffer, so every 2 MiB host page went.
        #expect(rig.device.discardedHostPages.count == 16)
        for buffer in rig.device.inflateBuffers {
            #expect(buffer.count % 512 == 0 && buffer.count <= rig.driver.options.sizing.pagesPerBuffer)
        }
        #expect(rig.driver.statusSnapshot().actual == 8192)
    }

    @Test("actual is written as one 32-bit store after each acknowledged buffer, never before")
    func actualAfterAck() throws {
        var options = BalloonDriverOptions()
        options.sizing.pagesPerBuffer = 1024
        options.sizing.buffersInFlight = 2
        let rig = try Rig(options: options)
        rig.device.processPFNsOnNotify = false
        try rig.driver.bringUp()
        rig.setTarget(pages: 4096)
        try rig.serviceAll()
        // Two buffers in flight, nothing acknowledged: actual still 0.
        #expect(rig.device.actual == 0)
        #expect(rig.driver.statusSnapshot().actual == 0)
        rig.device.drainPFNQueues()
        try rig.serviceAll()
        #expect(rig.device.actual == 2048)
        rig.device.drainPFNQueues()
        try rig.serviceAll()
        rig.device.drainPFNQueues()
        try rig.serviceAll()
        #expect(rig.device.actual == 4096)
        // Each write is a whole 4-byte value: 0 at bring-up, then 1024 per acknowledged buffer.
        let values = rig.actualWrites.map { b -> UInt32 in
            #expect(b.count == 4)
            return UInt32(b[0]) | UInt32(b[1]) << 8 | UInt32(b[2]) << 16 | UInt32(b[3]) << 24
        }
        #expect(values == [0, 1024, 2048, 3072, 4096])
    }

    @Test("a target that is not a multiple of 512 pages gets 2 MiB blocks plus 4 KiB pages")
    func oddTarget() throws {
        let rig = try Rig().running(target: 1300)
        #expect(rig.device.actual == 1300)
        let blocks = Array(rig.memory.held.values)
        #expect(blocks.filter(\.isHuge).count == 2)
        #expect(blocks.filter { !$0.isHuge }.reduce(0) { $0 + $1.pageCount } == 276)
    }

    @Test("deflate gives the memory back as it posts the PFNs, before the ack (MUST_TELL_HOST is never negotiated); actual follows the ack, and inflating waits for it")
    func deflateReleasesAtPost() throws {
        let rig = try Rig().running(target: 4096)
        #expect(!rig.driver.negotiated.contains(.mustTellHost))
        rig.device.processPFNsOnNotify = false
        rig.setTarget(pages: 1024)
        try rig.serviceAll()
        let posted = rig.device.deflateBuffers.count
        // The device has not seen the deflate yet, and the memory is already the guest's.
        #expect(rig.memory.heldBytes == 4 << 20, "memory still held until the deflate ack")
        #expect(rig.device.actual == 4096, "actual changed before the device saw the deflate")
        // A target raised again meanwhile waits until the host has the deflate.
        rig.setTarget(pages: 2048)
        try rig.serviceAll()
        #expect(rig.memory.heldBytes == 4 << 20, "inflated again while a deflate was in flight")
        rig.device.drainPFNQueues()
        #expect(rig.device.deflateBuffers.count > posted)
        try rig.serviceAll()
        rig.device.drainPFNQueues()
        try rig.serviceAll()
        #expect(rig.memory.heldBytes == 8 << 20)
        #expect(rig.device.actual == 2048)
        #expect(rig.device.inflatedPFNs == Set(rig.memory.held.values.flatMap(\.pfns)))
    }

    @Test("a small deflate gives back 4 KiB pages rather than a 2 MiB block when it can")
    func smallDeflatePrefersSmallBlocks() throws {
        let rig = try Rig().running(target: 1300)
        rig.setTarget(pages: 1200)
        try rig.serviceAll()
        #expect(rig.device.actual == 1200)
        #expect(rig.memory.held.values.filter(\.isHuge).count == 2)
    }

    @Test("a deflate smaller than any block gives one back whole and re-inflates the difference")
    func deflateOvershootsThenReinflates() throws {
        let rig = try Rig().running(target: 1024)  // two huge blocks, no small pages
        rig.setTarget(pages: 1000)
        try rig.serviceAll()
        #expect(rig.device.actual == 1000)
        #expect(rig.memory.held.values.filter(\.isHuge).count == 1)
        #expect(rig.memory.heldBytes == 1000 * 4096)
    }

    @Test("an unreachable target: actual stays honest, the shortfall is counted and logged once, retries back off without busy looping")
    func shortfallBacksOff() throws {
        let rig = try Rig()
        rig.memory.availablePages = 2048
        _ = try rig.running(target: 8192)
        #expect(rig.device.actual == 2048)
        let takes = rig.memory.events.count
        #expect(rig.driver.counters.inflateShortfalls == 1)
        #expect(rig.driver.statusSnapshot().shortfall?.contains("spare") == true)
        // Ticks before the retry time do not try again.
        for _ in 0..<50 { try rig.driver.tick() }
        #expect(rig.memory.events.count == takes)
        rig.clock.advance(milliseconds: 1001)
        try rig.driver.tick()
        #expect(rig.memory.events.count == takes + 1)
        #expect(rig.driver.counters.inflateShortfalls == 2)
        // The second wait is twice as long.
        rig.clock.advance(milliseconds: 1500)
        try rig.driver.tick()
        #expect(rig.memory.events.count == takes + 1)
        // Memory becomes available: the next retry reaches the target.
        rig.memory.availablePages = nil
        rig.clock.advance(milliseconds: 600)
        try rig.driver.tick()
        try rig.serviceAll()
        #expect(rig.device.actual == 8192)
        #expect(rig.driver.statusSnapshot().shortfall == nil)
    }

    @Test("a block whose frames moved before sending is given back and never sent")
    func movedBlockNotSent() throws {
        let rig = try Rig()
        try rig.driver.bringUp()
        rig.memory.moved = [1]  // the first block taken
        rig.setTarget(pages: 1024)
        try rig.serviceAll()
        let sent = Set(rig.device.inflateBuffers.flatMap { $0 })
        #expect(rig.driver.counters.balloonBlocksMoved == 1)
        #expect(rig.memory.held[1] == nil)
        #expect(sent.count == 1024)
        #expect(rig.device.actual == 1024)
    }

    @Test("a restarted driver re-inflates to the preserved num_pages, and first states actual as 0")
    func restartReinflates() throws {
        let rig = try Rig().running(target: 2048)
        #expect(rig.device.actual == 2048)
        // A new process: new driver and memory on the same device (num_pages and actual survive reset).
        let memory = SimulatedBalloonMemory(base: rig.device.properties.ramSize - (64 << 20), bytes: 64 << 20)
        let driver = BalloonDriver(transport: try rig.device.makeTransport(), allocator: rig.device.makeDMAAllocator(),
                                   balloonMemory: memory)
        rig.device.clearEvents()
        try driver.bringUp()
        try rig.serviceAll(driver)
        #expect(rig.actualWrites.first == [0, 0, 0, 0])
        #expect(rig.device.actual == 2048)
        #expect(memory.heldBytes == 8 << 20)
    }

    @Test("after a device reset the acknowledged balloon stays held and actual is restated; buffers in flight are given back")
    func resetKeepsBalloon() throws {
        let rig = try Rig().running(target: 2048)
        rig.device.processPFNsOnNotify = false
        rig.setTarget(pages: 4096)
        try rig.serviceAll()
        #expect(rig.memory.heldBytes == 16 << 20)
        try rig.driver.bringUp()  // the reset drops the in-flight inflate
        #expect(rig.device.actual == 2048)
        rig.device.processPFNsOnNotify = true
        rig.device.drainPFNQueues()
        try rig.serviceAll()
        #expect(rig.device.actual == 4096)
        #expect(rig.memory.heldBytes == 16 << 20)
    }

    @Test("shutdown resets the device first, then gives every balloon page back")
    func shutdownReleases() throws {
        let rig = try Rig().running(target: 2048)
        rig.driver.shutdown()
        #expect(rig.memory.heldBytes == 0)
        #expect(rig.device.status == [])
    }

    // MARK: memory taken and given back in groups (offline memory blocks)

    /// A rig whose balloon memory groups 2 MiB blocks by 16 MiB (8 blocks, 4096 pages), with
    /// buffers of 1024 PFNs, two in flight: one group's deflate spans four buffers.
    func groupedRig() throws -> Rig {
        var options = BalloonDriverOptions()
        options.sizing.pagesPerBuffer = 1024
        options.sizing.buffersInFlight = 2
        let rig = try Rig(options: options)
        rig.memory.groupBytes = 16 << 20
        return rig
    }

    /// The handles the deflates gave back, and the memory's groups they belong to.
    func released(_ rig: Rig, after events: Int) -> [UInt64] {
        rig.memory.events.dropFirst(events).flatMap { e -> [UInt64] in if case .release(let h) = e { return h }; return [] }
    }

    @Test("a deflate that gives back one block of a group gives back the whole group, across buffers, and the balloon then re-inflates to its target")
    func deflateCompletesGroups() throws {
        let rig = try groupedRig().running(target: 16384)  // 64 MiB: four groups
        #expect(rig.device.actual == 16384)
        let before = rig.memory.held
        let groupOf = { (h: UInt64) in (before[h]!.ranges[0].start.value - rig.memory.base) / (16 << 20) }
        let events = rig.memory.events.count
        rig.setTarget(pages: 16384 - 512)  // one 2 MiB block too many
        try rig.serviceAll()
        let gone = released(rig, after: events)
        #expect(gone.count == 8, "the block's seven group mates went with it (an offline block only comes back online whole)")
        #expect(Set(gone.map(groupOf)).count == 1)
        #expect(rig.device.deflateBuffers.flatMap { $0 }.count == 4096, "four buffers of 1024 PFNs with two in flight: the rest of the group waited for an ack")
        // The overshoot is inflated again with other memory, up to the target exactly.
        #expect(rig.device.actual == 16384 - 512)
        #expect(rig.memory.heldBytes == UInt64(16384 - 512) * 4096)
    }

    @Test("at its target with a group only partly used (the inflate ended early), the driver deflates the used part so the group can go back to the guest, then re-inflates with other memory")
    func strandedGroupIsDeflated() throws {
        let rig = try groupedRig().running(target: 2048)  // 4 blocks, half of one group
        let group = rig.memory.held.values.compactMap { rig.memory.releaseGroup(of: $0) }
        #expect(Set(group).count == 1)
        rig.memory.stranded = Set(group)
        let events = rig.memory.events.count
        rig.setTarget(pages: 2048)  // a config interrupt: the driver looks again
        try rig.serviceAll()
        #expect(released(rig, after: events).count == 4, "the four blocks of the partly used group were deflated")
        #expect(rig.memory.stranded.isEmpty)
        #expect(rig.device.actual == 2048, "and the balloon is back at its target")
        #expect(rig.device.deflateBuffers.flatMap { $0 }.count == 2048)
    }

    @Test("a pressure-size deflate smaller than a group gives the guest the whole group back once all of it is posted")
    func partialDeflateReleasesWholeGroup() throws {
        let rig = try groupedRig().running(target: 8192)
        rig.device.processPFNsOnNotify = false
        let events = rig.memory.events.count
        rig.setTarget(pages: 8192 - 1024)
        try rig.serviceAll()
        // Only two buffers may be in flight: the third and fourth wait; the blocks of the
        // group not yet posted are still held (the device may not have seen their PFNs).
        #expect(released(rig, after: events).count == 4)
        rig.device.drainPFNQueues()
        try rig.serviceAll()
        #expect(released(rig, after: events).count == 8)
        rig.device.processPFNsOnNotify = true
        rig.device.drainPFNQueues()
        try rig.serviceAll()
        #expect(rig.device.actual == 8192 - 1024)
    }

    @Test("a device reset while a group's deflate is owed keeps the owed blocks as balloon (they are still inflated on the host)")
    func resetKeepsOwedGroupBlocks() throws {
        let rig = try groupedRig().running(target: 4096)
        rig.device.processPFNsOnNotify = false
        rig.setTarget(pages: 4096 - 512)
        try rig.serviceAll()
        #expect(rig.memory.heldBytes == 8 << 20, "two buffers (4 blocks) posted and given back, 4 owed")
        try rig.driver.bringUp()
        #expect(rig.device.actual == 2048, "the owed blocks are acknowledged balloon: actual counts them")
        rig.device.processPFNsOnNotify = true
        rig.device.drainPFNQueues()
        try rig.serviceAll()
        #expect(rig.device.actual == 4096 - 512)
    }

    @Test("before taking memory to inflate, the driver tells the memory how much the rest of the inflate wants")
    func inflatePlans() throws {
        var options = BalloonDriverOptions()
        options.sizing.pagesPerBuffer = 1024
        let rig = try Rig(options: options).running(target: 3072)
        #expect(Array(rig.memory.plans.drop { $0 == 0 }.prefix(3)) == [3072, 2048, 1024], "one plan per buffer: what is left of the way to the target")
        #expect(rig.memory.plans.last == 0, "at the target nothing more is planned")
    }
}
