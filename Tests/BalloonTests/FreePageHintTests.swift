import Testing
import BalloonSimulator
import FreePages
import VirtioCore
import VirtioPCI
@testable import Balloon

@Suite("Free page hinting protocol (docs/virtio-balloon.md §6)")
struct FreePageHintTests {
    @Test("a round: START with the id, hints covering the source's free blocks, then STOP; all hints land in START")
    func fullRound() throws {
        let rig = try Rig.hinting()
        let freeBefore = rig.source.inner.freePages
        rig.device.startHintRound()
        try rig.serviceAll()
        let id: UInt32 = 0x8000_0001
        #expect(rig.device.receivedHintIDs == [id, 0])
        let hinted = rig.device.hintedRanges[id] ?? []
        let bytes = hinted.reduce(UInt64(0)) { $0 + $1.length }
        #expect(bytes == UInt64(freeBefore) * 4096)
        #expect(hinted.allSatisfy { $0.start.value % 4096 == 0 && $0.length % 4096 == 0 && $0.length <= 4 << 20 })
        #expect(!hinted.contains { rig.source.inner.overlapsGuestMemory($0) })
        #expect(rig.device.hintState == .stop)
        #expect(rig.driver.counters.bytesHinted == bytes)
        #expect(rig.driver.counters.lastRoundFirstHintMicros != nil)
        // Pages stay held (owned) until DONE.
        #expect(rig.source.heldBytes == bytes)
        rig.device.finishHinting()
        try rig.serviceAll()
        #expect(rig.source.heldBytes == 0)
        #expect(rig.source.inner.freePages == freeBefore)
    }

    @Test("a source that gives memory back in larger units gets longer descriptors; others the driver's 4 MiB")
    func preferredRangeLength() throws {
        let rig = try Rig.hinting()
        rig.source.preferredMax = 64 << 20
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(!rig.source.maxRangeBytesAsked.isEmpty)
        #expect(rig.source.maxRangeBytesAsked.allSatisfy { $0 == 64 << 20 })
        rig.device.finishHinting()
        try rig.serviceAll()
        let plain = try Rig.hinting()
        plain.device.startHintRound()
        try plain.serviceAll()
        #expect(plain.source.maxRangeBytesAsked.allSatisfy { $0 == 4 << 20 })
    }

    @Test("the range limit is the longer of the driver's and the source's, for rounds and for balloond scan alike")
    func rangeLimitRule() throws {
        let rig = try Rig.hinting()
        let options = HintOptions()
        rig.source.preferredMax = 1 << 20
        #expect(options.maxRangeBytes(for: rig.source) == 4 << 20, "a shorter unit does not shorten descriptors")
        rig.source.preferredMax = nil
        #expect(options.maxRangeBytes(for: rig.source) == 4 << 20)
        rig.source.preferredMax = 32 << 20
        #expect(options.maxRangeBytes(for: rig.source) == 32 << 20)
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(!rig.source.maxRangeBytesAsked.isEmpty)
        #expect(rig.source.maxRangeBytesAsked.allSatisfy { $0 == options.maxRangeBytes(for: rig.source) })
    }

    @Test("an inflate makes a hint reserve give way first, and the reserve refills no sooner than a minute later")
    func inflateYieldsTheReserve() throws {
        let rig = try Rig(BalloonDeviceProperties(freePageHint: true))
        rig.source.reserveTarget = 1 << 30
        rig.source.reserveScript = [.full]
        rig.source.heldUntilDone = 256 << 20
        try rig.driver.bringUp()
        rig.setTarget(pages: 16 << 8)
        try rig.serviceAll()
        #expect(rig.driver.actualPages == 16 << 8)
        #expect(rig.source.pressureRequests == [16 << 20], "the reserve gives back what the inflate needs")
        #expect(rig.source.heldUntilDone == 240 << 20)
        #expect(rig.driver.counters.inflateHintReserveReleases == 1)
        #expect(rig.driver.hinting.reserveNextPass == rig.clock.now + .seconds(60))
    }

    @Test("an inflate leaves memory a source holds for a round alone when the source keeps no reserve")
    func inflateWithoutReserve() throws {
        let rig = try Rig(BalloonDeviceProperties(freePageHint: true))
        rig.source.heldUntilDone = 256 << 20
        try rig.driver.bringUp()
        rig.setTarget(pages: 16 << 8)
        try rig.serviceAll()
        #expect(rig.driver.actualPages == 16 << 8)
        #expect(rig.source.pressureRequests.isEmpty)
        #expect(rig.driver.hinting.reserveNextPass == nil)
    }

    @Test("the id reads 0 while QEMU is in START, with no interrupt: the driver keeps hinting (it never polls the field)")
    func idReadsZeroInStart() throws {
        let rig = try Rig.hinting()
        var sawZero = false
        rig.device.onHintElement = { dev in
            if dev.hintState == .start, (try? rig.driver.transport.readDeviceConfig32(at: 8)) == 0 { sawZero = true }
        }
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(sawZero)
        #expect((rig.device.hintedRanges[0x8000_0001] ?? []).count > 1)
    }

    @Test("a repeated id (config interrupt with the same id) does not start a second round")
    func repeatedID() throws {
        let rig = try Rig.hinting()
        rig.device.startHintRound()
        try rig.serviceAll()
        let sent = rig.driver.counters.hintsSent
        // Another config interrupt (e.g. a target change) while the field still reads the id.
        rig.device.faults.forcedCmdID = 0x8000_0001
        rig.device.setTarget(bytes: 200 << 20)
        try rig.serviceAll()
        #expect(rig.driver.counters.hintRounds == 1)
        #expect(rig.driver.counters.hintsSent == sent)
        #expect(rig.device.receivedHintIDs == [0x8000_0001, 0])
    }

    @Test("a stale id is answered, but the device ignores its hints (only the current id starts START)")
    func staleID() throws {
        let rig = try Rig.hinting()
        rig.device.startHintRound()  // device is REQUESTED with 0x80000001
        rig.device.faults.forcedCmdID = 0x7000_0000  // the driver reads an old id
        try rig.serviceAll()
        #expect(rig.device.receivedHintIDs.first == 0x7000_0000)
        #expect(rig.device.hintState == .requested)
        #expect(rig.device.allHintedRanges.isEmpty)
        #expect(rig.device.ignoredHints > 0)
    }

    @Test("a new id ends the running round and starts the next one at once")
    func newIDMidRound() throws {
        let rig = try Rig.hinting()
        var triggered = false
        rig.device.onHintElement = { dev in
            if !triggered, (dev.hintedRanges[0x8000_0001]?.count ?? 0) >= 10 {
                triggered = true
                rig.source.inner.churn(count: -50)  // the guest frees memory between the rounds
                dev.stopHintRound()
                dev.startHintRound()
            }
        }
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(rig.driver.counters.hintRounds == 2)
        #expect(rig.device.receivedHintIDs == [0x8000_0001, 0, 0x8000_0002, 0], "\(rig.device.receivedHintIDs.map { String($0, radix: 16) })")
        #expect((rig.device.hintedRanges[0x8000_0002] ?? []).count > 0)
        #expect(rig.device.receivedHintIDs.filter { $0 == 0x8000_0002 }.count == 1)
        // Pages from both rounds stay held until DONE.
        #expect(rig.source.releaseDeviceStatus.isEmpty)
    }

    @Test("DONE without START: nothing held, nothing sent, no hang")
    func doneWithoutStart() throws {
        let rig = try Rig.hinting()
        rig.device.finishHinting()
        try rig.serviceAll()
        #expect(rig.device.receivedHintIDs.isEmpty)
        #expect(rig.source.heldBytes == 0)
        #expect(rig.driver.counters.hintRounds == 0)
    }

    @Test("a cancelled migration (DONE right after START) releases every hinted page")
    func cancelled() throws {
        let rig = try Rig.hinting()
        rig.device.onHintElement = { dev in
            if dev.hintState == .start, !(dev.hintedRanges[0x8000_0001] ?? []).isEmpty { dev.finishHinting() }
        }
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(rig.source.heldBytes == 0)
        #expect(rig.source.releaseHintState == [.done])
    }

    @Test("once a round's last hint is back, the driver records how long QEMU took to apply them, from the cmd id")
    func appliedTiming() throws {
        let rig = try Rig(BalloonDeviceProperties(freePageHint: true, ramSize: 64 << 20),
                          hints: SimulatedBuddyAllocator(bytes: 64 << 20, usedFraction: 0.5, seed: 3))
        try rig.driver.bringUp()
        rig.driver.hintOptions.batchRanges = 2  // two elements: the first batch, then the rest
        rig.device.processHintsOnNotify = false
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(rig.driver.counters.hintsSent > 2)
        #expect(rig.driver.counters.lastRoundStopMicros == 0, "the source ran dry: STOP sent with the hints still queued")
        #expect(rig.driver.counters.lastRoundAppliedMicros == nil, "nothing applied yet")
        rig.clock.advance(milliseconds: 30)
        rig.device.drainHintQueueOnce(limit: 2)  // START, the first element
        try rig.driver.serviceInterrupt(line: rig.line)
        #expect(rig.driver.counters.lastRoundAppliedMicros == nil, "one element still out")
        rig.clock.advance(milliseconds: 20)
        rig.device.drainHintQueue()
        try rig.driver.serviceInterrupt(line: rig.line)
        #expect(rig.driver.counters.lastRoundAppliedMicros == 50_000)
    }

    @Test("STOP while hints are queued: the round ends, late hints are acked and ignored, pages kept until DONE")
    func stopWhileQueued() throws {
        let rig = try Rig.hinting()
        rig.driver.hintOptions.batchRanges = 4  // the first element leaves with 4 ranges, the rest after it
        rig.device.processHintsOnNotify = false
        rig.device.startHintRound()
        try rig.serviceAll()
        rig.device.drainHintQueueOnce(limit: 2)  // START and the first element, applied
        rig.device.stopHintRound()               // the next bitmap sync
        let queuedAfterStop = rig.driver.counters.hintsSent - (rig.device.hintedRanges[0x8000_0001]?.count ?? 0)
        #expect(rig.device.hintedRanges[0x8000_0001]?.count == 4)
        #expect(queuedAfterStop > 0)
        rig.device.drainHintQueue()
        try rig.driver.serviceInterrupt(line: rig.line)
        #expect(rig.device.ignoredHints == 1, "the second element came after STOP")
        #expect(rig.source.appliedRanges.count == rig.driver.counters.hintsSent)
        #expect(rig.source.heldBytes > 0)
        #expect(rig.device.receivedHintIDs.last == 0)
    }

    @Test("ranges found while an element is out leave together in the next one, never more than maxRangesPerElement")
    func rangesGatherWhileAnElementIsOut() throws {
        let rig = try Rig.hinting()
        rig.driver.hintOptions.batchRanges = 2
        rig.driver.hintOptions.maxRangesPerElement = 16
        rig.device.processHintsOnNotify = false
        var elementSizes: [Int] = []
        var seen = 0
        rig.device.onHintElement = { dev in
            let n = dev.hintedRanges[0x8000_0001]?.count ?? 0
            if n > seen { elementSizes.append(n - seen); seen = n }
        }
        let free = rig.source.inner.freePages
        rig.device.startHintRound()
        try rig.serviceAll()
        let sent = rig.driver.counters.hintsSent
        #expect(sent > 34, "enough ranges for several full elements")
        rig.device.drainHintQueue()
        try rig.driver.serviceInterrupt(line: rig.line)
        #expect(elementSizes.first == 2, "the first batch leaves alone, at once")
        #expect(elementSizes.dropFirst().allSatisfy { $0 <= 16 })
        #expect(elementSizes.dropFirst().dropLast().allSatisfy { $0 == 16 }, "the device took nothing meanwhile: elements fill up")
        #expect(elementSizes.reduce(0, +) == sent)
        let bytes = rig.device.hintedRanges[0x8000_0001]!.reduce(UInt64(0)) { $0 + $1.length }
        #expect(bytes == UInt64(free) * 4096, "every free page hinted once")
    }

    @Test("a device that takes each element at once gets one element per batch")
    func oneElementPerBatchWhenTheDeviceKeepsUp() throws {
        let rig = try Rig.hinting()
        rig.driver.hintOptions.batchRanges = 2
        var elementSizes: [Int] = []
        var seen = 0
        rig.device.onHintElement = { dev in
            let n = dev.hintedRanges[0x8000_0001]?.count ?? 0
            if n > seen { elementSizes.append(n - seen); seen = n }
        }
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(elementSizes.count > 10)
        #expect(elementSizes.allSatisfy { $0 <= 2 })
    }

    @Test("ring full with a device that does not consume: one slot stays for STOP, the round times out, no hang")
    func ringFull() throws {
        let rig = try Rig.hinting(ramMiB: 8192, usedFraction: 0.1)
        rig.driver.hintOptions.fullRingTimeout = .milliseconds(20)
        rig.device.processHintsOnNotify = false
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(rig.driver.counters.hintRoundsTimedOut == 1)
        #expect(rig.driver.counters.hintsSent == 1024 - 2)  // START + the slot kept for STOP
        rig.device.drainHintQueue()
        #expect(rig.device.receivedHintIDs == [0x8000_0001, 0])
        #expect(!rig.device.broken)
    }

    @Test("a device that never answers: bring-up completes, a hint round times out with STOP queued, nothing hangs")
    func neverAnswers() throws {
        let rig = try Rig.hinting(ramMiB: 8192, usedFraction: 0.1)
        rig.driver.hintOptions.fullRingTimeout = .milliseconds(20)
        rig.device.faults.ignoreNotifications = true
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(rig.driver.counters.hintRoundsTimedOut == 1)
        #expect(rig.device.receivedHintIDs.isEmpty)
        // Pages stay held: their hints may still be applied by a device that wakes up later.
        #expect(rig.source.heldBytes > 0)
        rig.driver.shutdown()
        #expect(rig.source.heldBytes == 0)
    }

    @Test("owned pages are given back only after the device can no longer apply their hints (DONE or reset)")
    func releaseOrder() throws {
        let rig = try Rig.hinting()
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(rig.source.heldBytes > 0)
        rig.driver.shutdown()
        #expect(rig.source.releaseDeviceStatus == [[]])  // device already reset
        #expect(rig.source.heldBytes == 0)
    }

    @Test("postcopy: no round ever starts, so nothing is taken and nothing hangs")
    func postcopy() throws {
        let rig = try Rig.hinting()
        rig.device.setTarget(bytes: 128 << 20)  // unrelated config interrupt; cmd id stays STOP
        try rig.serviceAll()
        #expect(rig.source.inner.rounds.isEmpty)
        #expect(rig.source.heldBytes == 0)
    }

    @Test("without a hint source, FREE_PAGE_HINT is not negotiated")
    func noSource() throws {
        let device = SimulatedBalloonDevice(properties: BalloonDeviceProperties(freePageHint: true))
        let driver = BalloonDriver(transport: try device.makeTransport(), allocator: device.makeDMAAllocator())
        try driver.bringUp()
        #expect(!device.negotiatedFeatures.contains(.freePageHint))
    }

    @Test("the buddy simulator never hands out a page twice and restores itself on release")
    func buddyInvariants() throws {
        let b = SimulatedBuddyAllocator(bytes: 64 << 20, usedFraction: 0.5, seed: 3)
        let free = b.freePages
        try b.beginRound(id: 2)
        var all: [GuestPhysicalRange] = []
        while true {
            let batch = try b.nextBatch(maxRanges: 7, maxRangeBytes: 1 << 20)
            if batch.isEmpty { break }
            all += batch
        }
        #expect(all.allSatisfy { $0.length <= 1 << 20 })
        let sorted = all.sorted { $0.start < $1.start }
        #expect(zip(sorted, sorted.dropFirst()).allSatisfy { $0.end <= $1.start.value })
        #expect(all.reduce(0) { $0 + $1.length } == UInt64(free) * 4096)
        #expect(b.freePages == 0)
        b.releaseAll()
        #expect(b.freePages == free)
    }

    @Test("coalesce merges touching ranges and splits long ones")
    func coalescing() {
        let r = coalesce([GuestPhysicalRange(start: 0x3000, length: 0x1000), GuestPhysicalRange(start: 0x1000, length: 0x2000),
                          GuestPhysicalRange(start: 0x10000, length: 0x5000)], maxLength: 0x2000)
        #expect(r == [GuestPhysicalRange(start: 0x1000, length: 0x2000), GuestPhysicalRange(start: 0x3000, length: 0x1000),
                      GuestPhysicalRange(start: 0x10000, length: 0x2000), GuestPhysicalRange(start: 0x12000, length: 0x2000),
                      GuestPhysicalRange(start: 0x14000, length: 0x1000)])
    }
}
