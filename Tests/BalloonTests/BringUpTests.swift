import Testing
import BalloonSimulator
import VirtioCore
import VirtioPCI
import VirtioQueue
import FreePages
@testable import Balloon

@Suite("Device bring-up (virtio 1.2 §3.1.1, docs/virtio-balloon.md §1.6)")
struct BringUpTests {
    @Test("afterDeviceReset runs once per bring-up, after the reset and after hint memory went back, before the device is acknowledged")
    func afterDeviceResetHook() throws {
        let rig = try Rig()
        var eventsAtHook: [Int] = []
        rig.driver.afterDeviceReset = { eventsAtHook.append(rig.device.events.count) }
        try rig.driver.bringUp()
        #expect(eventsAtHook.count == 1)
        let e = Array(rig.device.events.prefix(eventsAtHook[0]))
        #expect(e.contains(.status([])), "the reset came first")
        #expect(!e.contains(.status([.acknowledge])), "nothing of the new session yet")
        #expect(rig.source.releaseDeviceStatus.count <= 1)
        try rig.driver.bringUp()
        #expect(eventsAtHook.count == 2)
    }

    @Test("bring-up order: reset with Bus Master off and memory decoding on, then bus master, ACK, DRIVER, features, FEATURES_OK, queues, stats primed, DRIVER_OK")
    func order() throws {
        let rig = try Rig()
        try rig.driver.bringUp()
        let e = rig.device.events
        func first(_ pred: (SimulatedBalloonDevice.Event) -> Bool) -> Int { e.firstIndex(where: pred) ?? Int.max }
        let busMaster = first { $0 == .busMaster(true) }
        let reset = first { $0 == .status([]) }
        let ack = first { $0 == .status([.acknowledge]) }
        let driver = first { $0 == .status([.acknowledge, .driver]) }
        let featuresOK = first { if case .driverFeatures = $0 { return true }; return false }
        let queue0 = first { if case .queueEnabled(0, _) = $0 { return true }; return false }
        let queue2 = first { if case .queueEnabled(2, _) = $0 { return true }; return false }
        let statsKick = first { $0 == .notify(2) }
        let driverOK = first { if case .status(let s) = $0 { return s.contains(.driverOK) }; return false }
        // The device is reset while it cannot reach memory (M7), and may only after that.
        let commandAtReset = try #require(rig.device.commandAtResets.first)
        #expect(commandAtReset & PCIConfig.commandBusMaster == 0)
        #expect(commandAtReset & PCIConfig.commandMemory != 0)
        #expect(reset < busMaster && busMaster < ack)
        #expect(reset < ack && ack < driver && driver < featuresOK)
        #expect(featuresOK < queue0 && queue0 < queue2 && queue2 < statsKick && statsKick < driverOK)
        #expect(driverOK != Int.max)
        #expect(rig.device.status == [.acknowledge, .driver, .featuresOK, .driverOK])
        #expect(rig.device.holdsStatsBuffer)
        #expect(rig.device.stats.count == 10)
    }

    @Test("queues are set up by QEMU's numbering for every property combination", arguments: BalloonDeviceProperties.allFeatureCombinations)
    func numbering(_ props: BalloonDeviceProperties) throws {
        var options = BalloonDriverOptions()
        options.wantedFeatures.insert(.reporting)
        let rig = try Rig(props, options: options)
        try rig.driver.bringUp()
        #expect(rig.driver.queueForTesting(.inflate)?.index == 0)
        #expect(rig.driver.queueForTesting(.deflate)?.index == 1)
        #expect(rig.driver.queueForTesting(.stats)?.index == 2)
        if props.freePageHint {
            #expect(rig.driver.queueForTesting(.freePageHint)?.index == 3)
            #expect(rig.device.isQueueEnabled(3))
            #expect(rig.device.programmedQueueSize(3) == 1024)
        } else {
            #expect(rig.driver.queueForTesting(.freePageHint) == nil)
        }
        let reportingIndex: UInt16? = props.freePageReporting ? (props.freePageHint ? 4 : 3) : nil
        // REPORTING with no poisoning policy needs nothing else; it is enabled where offered.
        #expect(rig.driver.queueForTesting(.reporting)?.index == reportingIndex)
        if let r = reportingIndex { #expect(rig.device.isQueueEnabled(r)) }
        #expect(!rig.device.broken)
    }

    @Test("an offered hint queue is skipped but keeps index 3 when balloond does not accept hinting")
    func hintOfferedNotAccepted() throws {
        var options = BalloonDriverOptions()
        options.wantedFeatures = [.statsVQ, .reporting, .version1]
        let rig = try Rig(BalloonDeviceProperties(freePageHint: true, freePageReporting: true), options: options)
        try rig.driver.bringUp()
        #expect(!rig.device.isQueueEnabled(3))
        #expect(rig.driver.queueForTesting(.reporting)?.index == 4)
        #expect(rig.device.isQueueEnabled(4))
    }

    @Test("a queue whose size does not match QEMU's numbering is refused")
    func sizeMismatch() throws {
        let rig = try Rig(BalloonDeviceProperties(freePageHint: true))
        rig.device.faults.zeroSizedQueues = [3]
        #expect(throws: BalloonError.self) { try rig.driver.bringUp() }
        #expect(rig.device.status.contains(.failed))
    }

    @Test("poison_val is written before DRIVER_OK as Linux does, only when PAGE_POISON is negotiated", arguments: [
        (PagePoisonPolicy.poison, UInt32?(0xAAAA_AAAA)), (.initOnFree, 0), (.none, nil),
    ])
    func poison(policy: PagePoisonPolicy, expected: UInt32?) throws {
        let rig = try Rig(BalloonDeviceProperties(), options: BalloonDriverOptions(poisonPolicy: policy))
        try rig.driver.bringUp()
        #expect(rig.driver.poisonValue == expected)
        #expect(rig.device.negotiatedFeatures.contains(.pagePoison) == (expected != nil))
        let e = rig.device.events
        let write = e.firstIndex { if case .configWrite(offset: 12, _) = $0 { return true }; return false }
        let ok = e.firstIndex { if case .status(let s) = $0 { return s.contains(.driverOK) }; return false }!
        if let expected {
            #expect(write != nil && write! < ok)
            #expect(rig.device.poisonVal == expected)
            if case .configWrite(_, let bytes)? = write.map({ e[$0] }) { #expect(bytes.count == 4) }
        } else {
            #expect(write == nil)
        }
    }

    @Test("REPORTING is dropped when pages are poisoned but PAGE_POISON is not offered (Linux virtballoon_validate)")
    func reportingNeedsPoison() {
        let offered: FeatureBits = [.statsVQ, .reporting, .version1]
        let want = BalloonDriver<ModernPCITransport>.wantedFeatures(offered: offered, implemented: [.statsVQ, .reporting, .pagePoison], poison: .poison)
        #expect(!want.contains(.reporting))
        let want2 = BalloonDriver<ModernPCITransport>.wantedFeatures(offered: offered, implemented: [.statsVQ, .reporting, .pagePoison], poison: .none)
        #expect(want2.contains(.reporting) && !want2.contains(.pagePoison))
    }

    @Test("num_pages and the cmd id are read right after DRIVER_OK (no config interrupt comes for earlier changes)")
    func readsConfigAfterDriverOK() throws {
        let rig = try Rig(BalloonDeviceProperties(freePageHint: true))
        // Host sets a target before the driver is up: QEMU raises no interrupt for it.
        rig.device.setTarget(bytes: 768 << 20)
        try rig.driver.bringUp()
        #expect(rig.driver.targetPages == 65536)
        #expect(rig.driver.hintCommand == .stop)
    }

    @Test("a config interrupt delivers a new target and a new hint cmd id")
    func configInterrupt() throws {
        let rig = try Rig(BalloonDeviceProperties(freePageHint: true))
        try rig.driver.bringUp()
        rig.device.setTarget(bytes: 512 << 20)
        try rig.serviceAll()
        #expect(rig.driver.targetPages == 131072)
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(rig.driver.hintCommand == .round(0x8000_0001))
        #expect(rig.driver.counters.configChanges == 2)
        // After servicing, INTx is unmasked and Bus Master is still set.
        #expect(rig.device.configSpace.command & PCIConfig.commandINTxDisable == 0)
        #expect(rig.device.busMaster)
    }

    @Test("the stats queue keeps exactly one buffer: refilled when the device returns it, never two outstanding")
    func statsRefill() throws {
        let rig = try Rig()
        try rig.driver.bringUp()
        #expect(rig.device.statsUpdates == 1)
        rig.stats.value = 42
        rig.device.requestStats()
        try rig.serviceAll()
        #expect(rig.device.statsUpdates == 2)
        #expect(rig.device.stats[4] == 42)
        #expect(rig.device.holdsStatsBuffer)
        #expect(rig.device.statsBuffersReturnedEarly == 0)
        #expect(rig.driver.counters.statsBuffersSent == 2)
    }

    @Test("a device that does not keep FEATURES_OK: bring-up fails with FAILED set and an actionable message")
    func legacyDevice() throws {
        let rig = try Rig()
        rig.device.faults.rejectFeaturesOK = true
        do {
            try rig.driver.bringUp()
            Issue.record("expected failure")
        } catch {
            let featuresNotAccepted = if case .transport(.featuresNotAccepted) = error { true } else { false }
            #expect(featuresNotAccepted, "\(error)")
            #expect(error.description.contains("FEATURES_OK"))
        }
        #expect(rig.device.status.contains(.failed))
    }

    @Test("a device that never completes reset gives a typed timeout, not a hang")
    func neverResets() throws {
        let rig = try Rig(options: BalloonDriverOptions(resetTimeout: .milliseconds(2)))
        rig.device.faults.neverResets = true
        try rig.driver.transport.enableDMA()
        rig.driver.transport.setStatus([.acknowledge])
        #expect(throws: BalloonError.self) { try rig.driver.bringUp() }
    }

    @Test("corrupted used entries from the device are typed errors")
    func corruptedUsed() throws {
        let rig = try Rig()
        try rig.driver.bringUp()
        rig.device.faults.corruptNextUsedID[2] = 200
        rig.device.requestStats()
        do {
            try rig.serviceAll()
            Issue.record("expected a queue error")
        } catch let error as BalloonError {
            guard case .queue(.stats, .usedIDOutOfRange(id: 200, size: 128)) = error else {
                Issue.record("wrong error \(error)")
                return
            }
        }
        #expect(rig.driver.counters.errors == 1)
    }

    @Test("NEEDS_RESET from the device is reported, and a fresh bring-up recovers it")
    func needsResetRecovery() throws {
        let rig = try Rig()
        try rig.driver.bringUp()
        // Break the device the way QEMU breaks: queue_enable written with a value other than 1.
        rig.device.bar4.write16(2, at: CommonConfig.queueSelect)
        rig.device.bar4.write16(2, at: CommonConfig.queueEnable)
        #expect(rig.device.broken)
        #expect(rig.device.lastError == .wrongQueueEnable(2))
        #expect(rig.device.lastError?.description == "wrong value for queue_enable 2")
        #expect(rig.device.status.contains(.needsReset))
        #expect(throws: BalloonError.transport(.needsReset(rig.device.status))) { try rig.serviceAll() }
        try rig.driver.bringUp()
        #expect(!rig.device.broken)
        #expect(rig.device.status.contains(.driverOK))
        #expect(rig.device.holdsStatsBuffer)
    }

    @Test("after a bus-master clear (uio release) and restart, the device comes back")
    func restartAfterBusMasterClear() throws {
        let rig = try Rig()
        try rig.driver.bringUp()
        // A kill between uio masking INTx and balloond's unmask, then uio's release(): Bus
        // Master clear and INTx-Disable set.
        try rig.device.configSpace.write16(0x0103 | PCIConfig.commandINTxDisable, at: PCIConfig.command)
        #expect(!rig.device.status.contains(.driverOK))
        try rig.driver.bringUp()
        #expect(rig.device.status.contains(.driverOK))
        #expect(rig.device.busMaster)
        #expect(rig.device.configSpace.command & PCIConfig.commandINTxDisable == 0)
        // And interrupts reach the driver again.
        rig.device.setTarget(bytes: 512 << 20)
        try rig.serviceAll()
        #expect(rig.driver.targetPages == 131072)
    }

    @Test("shutdown resets the device")
    func shutdown() throws {
        let rig = try Rig()
        try rig.driver.bringUp()
        rig.driver.shutdown()
        #expect(rig.device.status == [])
        #expect(!rig.device.holdsStatsBuffer)
    }
}
