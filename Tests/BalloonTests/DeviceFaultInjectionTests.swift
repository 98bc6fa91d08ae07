import Testing
import BalloonSimulator
import BalloonBlocks
import FreePages
import VirtioCore
import VirtioPCI
@testable import Balloon

/// A hostile or broken device, as the driver sees it (issue 9 L1, M3, M7, L2): each fault
/// is a typed error or bounded work, never a trap or a hang, and no memory goes back to the
/// guest while the device may still write it.
@Suite("Driver fault injection: hostile device")
struct DeviceFaultInjectionTests {
    // MARK: L1: config_generation that never settles

    @Test("bring-up against a config_generation that never settles fails with a typed error, not a hang")
    func unstableGenerationAtBringUp() throws {
        let rig = try Rig()
        rig.device.faults.unstableGenerationReads = 1_000_000
        #expect(throws: BalloonError.transport(.configGenerationUnstable(attempts: configReadMaxAttempts))) {
            try rig.driver.bringUp()
        }
    }

    @Test("a config interrupt whose config never settles is a typed error from serviceInterrupt")
    func unstableGenerationAtInterrupt() throws {
        let rig = try Rig()
        try rig.driver.bringUp()
        rig.device.setTarget(bytes: 512 << 20)
        rig.device.faults.unstableGenerationReads = 1_000_000
        #expect(try rig.line.wait(timeoutMilliseconds: 0))
        #expect(throws: BalloonError.transport(.configGenerationUnstable(attempts: configReadMaxAttempts))) {
            try rig.driver.serviceInterrupt(line: rig.line)
        }
    }

    // MARK: L1: a new cmd id on every config interrupt

    @Test("a host posting a new cmd id on every config interrupt: each serviceInterrupt acts on a bounded number of ids, then returns")
    func newIDOnEveryConfigInterrupt() throws {
        // Rounds that poll mid-round (several batches each), and a source that lasts ~170 rounds.
        let rig = try Rig.hinting(ramMiB: 1024)
        rig.source.inner.limitPerRound = 4 << 20
        rig.driver.hintOptions.maxRangeBytes = 64 << 10
        rig.driver.hintOptions.batchRanges = 16
        let bound = rig.driver.hintOptions.maxCommandChangesPerCall
        rig.device.faults.newHintRoundOnConfigInterrupt = 10_000
        rig.device.startHintRound()
        for _ in 0..<5 {
            #expect(try rig.line.wait(timeoutMilliseconds: 0))
            let before = rig.driver.counters.hintRounds
            try rig.driver.serviceInterrupt(line: rig.line)
            #expect(rig.driver.counters.hintRounds - before <= bound)
            #expect(rig.driver.hintCommandPending)
        }
        #expect(rig.driver.counters.hintCommandsDeferred == 5)
        // The host calms down: the pending id is acted on without waiting for an interrupt.
        rig.device.faults.newHintRoundOnConfigInterrupt = 0
        for _ in 0..<10 {
            if try rig.line.wait(timeoutMilliseconds: 0) {
                try rig.driver.serviceInterrupt(line: rig.line)
            } else if rig.driver.hintCommandPending {
                try rig.driver.serviceHintCommand(line: rig.line)
            } else {
                break
            }
        }
        #expect(!rig.driver.hintCommandPending)
        #expect(!rig.device.broken)
        #expect(rig.device.hintState == .stop)
    }

    // MARK: L1/L5: a pending stop ends long hint work

    @Test("a pending stop ends a hint round waiting on a full ring, before the full-ring timeout, with STOP sent")
    func stopEndsFullRingWait() throws {
        let rig = try Rig.hinting()
        rig.driver.hintOptions.maxRangeBytes = 4096
        rig.driver.hintOptions.fullRingTimeout = .milliseconds(300)
        rig.device.processHintsOnNotify = false
        var checks = 0
        rig.driver.shouldStop = {
            checks += 1
            return checks > 200
        }
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(rig.driver.counters.hintRounds == 1)
        #expect(rig.driver.counters.hintRoundsTimedOut == 0)
        #expect(rig.source.endRounds == 1)
        rig.device.drainHintQueue()
        #expect(rig.device.receivedHintIDs == [0x8000_0001, 0])
        #expect(!rig.device.broken)
    }

    @Test("with a stop pending, a new cmd id starts no round and stays pending")
    func stopBeforeRound() throws {
        let rig = try Rig.hinting()
        rig.driver.shouldStop = { true }
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(rig.driver.counters.hintRounds == 0)
        #expect(rig.driver.hintCommandPending)
    }

    // MARK: M7: reset before Bus Master

    private func index(_ events: [SimulatedBalloonDevice.Event], _ e: SimulatedBalloonDevice.Event) -> Int {
        events.firstIndex(of: e) ?? Int.max
    }

    @Test("after a SIGKILL, a new driver resets the device before Bus Master is set again (the old rings are never live)")
    func resetBeforeBusMasterAfterKill() throws {
        let rig = try Rig()
        try rig.driver.bringUp()
        rig.device.simulateDriverKilled()
        #expect(!rig.device.busMaster)
        rig.device.clearEvents()
        let resetsBefore = rig.device.commandAtResets.count
        let next = BalloonDriver(transport: try rig.device.makeTransport(), allocator: rig.device.makeDMAAllocator())
        try next.bringUp()
        let e = rig.device.events
        let reset = index(e, .status([]))
        #expect(reset < index(e, .busMaster(true)))
        #expect(index(e, .busMaster(true)) != Int.max)
        #expect(rig.device.commandAtResets.count == resetsBefore + 1)
        #expect(rig.device.commandAtResets.last.map { $0 & PCIConfig.commandBusMaster == 0 } == true)
        #expect(rig.device.status.contains(.driverOK))
    }

    @Test("a re-bring-up with Bus Master on clears it, resets, then sets it again")
    func rebringUpClearsBusMasterFirst() throws {
        let rig = try Rig()
        try rig.driver.bringUp()
        rig.device.clearEvents()
        try rig.driver.bringUp()
        let e = rig.device.events
        #expect(index(e, .busMaster(false)) < index(e, .status([])))
        #expect(index(e, .status([])) < index(e, .busMaster(true)))
        #expect(rig.device.commandAtResets.last.map { $0 & PCIConfig.commandBusMaster == 0 } == true)
        #expect(rig.device.status.contains(.driverOK))
    }

    @Test("memory decoding off before bring-up: the reset happens with memory decoding on and Bus Master off")
    func memoryDecodeOnAtReset() throws {
        let rig = try Rig()
        rig.device.configSpace.command = 0
        try rig.driver.bringUp()
        let c = try #require(rig.device.commandAtResets.last)
        #expect(c & PCIConfig.commandMemory != 0)
        #expect(c & PCIConfig.commandBusMaster == 0)
    }

    @Test("a Bus Master that will not clear fails bring-up with a typed error before any reset")
    func busMasterStuckFailsBringUp() throws {
        let rig = try Rig()
        try rig.driver.bringUp()
        rig.device.faults.busMasterStuckOn = true
        let resets = rig.device.commandAtResets.count
        #expect(throws: BalloonError.transport(.busMasterDidNotClear(command: rig.device.configSpace.command))) {
            try rig.driver.bringUp()
        }
        #expect(rig.device.commandAtResets.count == resets)
    }

    // MARK: M3: no memory back to the guest while the device may still write it

    /// A running device with inflated balloon pages and owned hint pages still outstanding.
    private func busyRig() throws -> Rig {
        let props = BalloonDeviceProperties(freePageHint: true)
        let rig = try Rig(props, options: BalloonDriverOptions(resetTimeout: .milliseconds(1)))
        try rig.driver.bringUp()
        rig.device.setTarget(bytes: props.ramSize - (16 << 20))
        try rig.serviceAll()
        let hints = rig.source.inner
        hints.limitPerRound = 8 << 20
        rig.device.processHintsOnNotify = false
        rig.device.startHintRound()
        try rig.serviceAll()
        #expect(rig.memory.heldBytes == 16 << 20)
        #expect(hints.heldBytes == 8 << 20)
        return rig
    }

    @Test("a reset that fails at shutdown: Bus Master is cleared, and only then does the memory go back to the guest")
    func failedResetClearsBusMaster() throws {
        let rig = try busyRig()
        rig.device.faults.neverResets = true
        let hints = try #require(rig.driver.hintSource)
        rig.driver.shutdown()
        #expect(!rig.device.busMaster)
        #expect(rig.memory.heldBytes == 0)
        #expect(hints.heldBytes == 0)
        #expect(!rig.driver.memoryKeptAfterShutdown)
    }

    @Test("a reset that fails and a Bus Master that cannot be cleared: balloon, hint and DMA memory are all kept",
          arguments: ["clear fails", "bit stuck"])
    func failedResetAndBusMasterKeepsMemory(_ fault: String) throws {
        weak var weakDriver: BalloonDriver<ModernPCITransport>?
        var rig: Rig? = try busyRig()
        let memory = rig!.memory
        let hints = try #require(rig!.driver.hintSource)
        let device = rig!.device
        device.faults.neverResets = true
        if fault == "clear fails" { device.faults.busMasterClearFails = true } else { device.faults.busMasterStuckOn = true }
        rig!.driver.shutdown()
        weakDriver = rig!.driver
        #expect(rig!.driver.memoryKeptAfterShutdown)
        rig = nil
        #expect(device.busMaster)
        #expect(memory.heldBytes == 16 << 20)
        #expect(hints.heldBytes == 8 << 20)
        // The driver, and with it every DMA region the device was given, stays alive.
        #expect(weakDriver != nil)
    }

    // MARK: L2: PFNs at or above 2^32

    @Test("balloon memory at or above 16 TiB is given back, counted and never sent as a truncated PFN")
    func pfnsAbove32BitsNeverSent() throws {
        let limit: UInt64 = 1 << 44
        // Guest RAM reaching past 16 TiB; the balloon's memory straddles the limit (4 huge
        // blocks below, 4 above, handed out from the top).
        let ram = SimulatedGuestMemory(ram: GuestPhysicalRange(start: 0, length: limit + (16 << 20)))
        let props = BalloonDeviceProperties()
        let device = SimulatedBalloonDevice(properties: props, memory: ram)
        let memory = SimulatedBalloonMemory(base: limit - (8 << 20), bytes: 16 << 20)
        let clock = FakeClock()
        let driver = BalloonDriver(transport: try device.makeTransport(), allocator: device.makeDMAAllocator(), balloonMemory: memory)
        driver.clock = clock.monotonic
        let line = device.makeInterruptLine()
        try driver.bringUp()
        device.setTarget(bytes: props.ramSize - (16 << 20))
        var n = 0
        while try line.wait(timeoutMilliseconds: 0) {
            try driver.serviceInterrupt(line: line)
            n += 1
            try #require(n < 100)
        }
        let sent = device.inflateBuffers.flatMap { $0 }
        #expect(!sent.isEmpty)
        // Only the frames below the limit went out, each under its own PFN.
        #expect(sent.allSatisfy { UInt64($0) >= (limit - (8 << 20)) >> 12 })
        #expect(Set(sent) == Set(memory.held.values.flatMap { $0.checkedPFNs ?? [] }))
        #expect(memory.held.values.allSatisfy { $0.pfnsFitIn32Bits })
        #expect(memory.heldBytes == 8 << 20)
        #expect(driver.counters.balloonBlocksUnaddressable > 0)
        #expect(driver.counters.inflateShortfalls > 0)
        #expect(device.badPFNs.isEmpty)
    }

    @Test("checked PFN conversion: a block reaching 16 TiB has no PFNs, one just below has all of them")
    func checkedPFNs() {
        let limit: UInt64 = 1 << 44
        let below = BalloonBlock(handle: 1, ranges: [GuestPhysicalRange(start: PhysicalAddress(limit - 8192), length: 8192)])
        let across = BalloonBlock(handle: 2, ranges: [GuestPhysicalRange(start: PhysicalAddress(limit - 4096), length: 8192)])
        #expect(below.checkedPFNs == [UInt32.max - 1, UInt32.max])
        #expect(across.checkedPFNs == nil)
        #expect(across.pfns.isEmpty)
        #expect(!across.pfnsFitIn32Bits)
    }
}
