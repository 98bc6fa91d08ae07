import Testing
import TestSupport
import BalloonSimulator
import VirtioCore
@testable import VirtioPCI

@Suite("Modern virtio-pci transport against the simulated QEMU device")
struct ModernTransportTests {
    @Test("a function that is not virtio is refused; the transport itself accepts any virtio device type")
    func notVirtio() {
        var bytes = qemuConfigBytes()
        bytes[0] = 0x86; bytes[1] = 0x80  // 8086:1002 is not virtio
        let config = FakePCIConfigSpace(bytes: bytes)
        #expect(throws: TransportError.notAVirtioDevice(vendor: 0x8086, device: 0x1002)) {
            try ModernPCITransport(config: config, barSizes: qemuBARs, mapBAR: { (b) throws(PCIError) -> MMIORegion in throw PCIError.bar(index: b, reason: PCIAccessProblem.notMapped) },
                                   pause: { _ in })
        }
        // 1af4:1000 (transitional virtio-net) gets past the identity check: the transport
        // goes on to map its BARs (here: refused), because the device type is the driver's
        // business (BalloonDriver refuses a type other than 5 at bring-up).
        bytes = qemuConfigBytes()
        bytes[2] = 0x00; bytes[3] = 0x10
        #expect(throws: TransportError.pci(.bar(index: 4, reason: PCIAccessProblem.notMapped))) {
            try ModernPCITransport(config: FakePCIConfigSpace(bytes: bytes), barSizes: qemuBARs,
                                   mapBAR: { (b) throws(PCIError) -> MMIORegion in throw PCIError.bar(index: b, reason: PCIAccessProblem.notMapped) }, pause: { _ in })
        }
    }

    @Test("device features read as QEMU 7.2 offers them, both halves")
    func features() throws {
        let dev = SimulatedBalloonDevice(properties: BalloonDeviceProperties(freePageHint: true, freePageReporting: true, deflateOnOOM: true))
        let t = try dev.makeTransport()
        #expect(t.deviceFeatures() == FeatureBits(low: 0x3000_003e, high: 0x101))
        let plainDevice = SimulatedBalloonDevice()
        let plain = try plainDevice.makeTransport()
        #expect(plain.deviceFeatures() == FeatureBits(low: 0x3000_0012, high: 0x101))
    }

    @Test("reset writes 0 and waits for 0; a device that never resets times out with a typed error")
    func resetTimeout() throws {
        let dev = SimulatedBalloonDevice()
        let t = try dev.makeTransport()
        t.setStatus([.acknowledge])
        try t.reset()
        #expect(t.status() == [])
        t.setStatus([.acknowledge])
        dev.faults.neverResets = true
        var slept = 0
        #expect(throws: TransportError.resetTimedOut(status: [.acknowledge], milliseconds: 5)) {
            try t.reset(timeoutMilliseconds: 5, sleep: { slept += $0 })
        }
        #expect(slept >= 5000)
    }

    @Test("FEATURES_OK is re-read: a device that clears it fails negotiation")
    func featuresOKReadBack() throws {
        let dev = SimulatedBalloonDevice()
        dev.faults.rejectFeaturesOK = true
        let t = try dev.makeTransport()
        try t.reset()
        t.addStatus([.acknowledge, .driver])
        #expect(throws: TransportError.featuresNotAccepted([.acknowledge, .driver])) { try t.negotiate(wanted: [.statsVQ]) }
    }

    @Test("features are written as two halves and read back raw")
    func featureWrite() throws {
        let dev = SimulatedBalloonDevice()
        let t = try dev.makeTransport()
        t.setDriverFeatures([.statsVQ, .version1, .freePageHint])
        // QEMU returns the raw value written (FREE_PAGE_HINT is not offered here).
        #expect(t.driverFeatures() == [.statsVQ, .version1, .freePageHint])
        t.addStatus([.acknowledge, .driver, .featuresOK])
        #expect(dev.negotiatedFeatures == [.statsVQ, .version1])
    }

    @Test("queue setup programs size and 64-bit addresses as two halves, then enable=1; notify goes to 0x3000 + 4q")
    func queueSetup() throws {
        let dev = SimulatedBalloonDevice()
        let t = try dev.makeTransport()
        let alloc = dev.makeDMAAllocator()
        let desc = try alloc.allocate(byteCount: 16 * 64, alignment: 16)
        let avail = try alloc.allocate(byteCount: 6 + 2 * 64, alignment: 2)
        let used = try alloc.allocate(byteCount: 6 + 8 * 64, alignment: 4)
        #expect(t.queueSize(2) == 128)
        try t.enableQueue(2, size: 64, descriptors: desc.physicalAddress, driver: avail.physicalAddress, device: used.physicalAddress)
        #expect(t.queueEnabled(2))
        #expect(dev.programmedQueueSize(2) == 64)
        #expect(t.common.read32(at: CommonConfig.queueDescHigh) == UInt32(desc.physicalAddress.value >> 32))
        try t.enableDMA()
        try t.notify(queue: 2)
        #expect(dev.notifyCount[2] == 1)
        #expect(throws: TransportError.queueIndexOutOfRange(queue: 5, numQueues: 3)) {
            try t.enableQueue(5, size: 64, descriptors: desc.physicalAddress, driver: avail.physicalAddress, device: used.physicalAddress)
        }
    }

    @Test("num_queues and queue sizes follow QEMU's properties", arguments: BalloonDeviceProperties.allFeatureCombinations)
    func queueCounts(_ p: BalloonDeviceProperties) throws {
        let dev = SimulatedBalloonDevice(properties: p)
        let t = try dev.makeTransport()
        let expected = 3 + (p.freePageHint ? 1 : 0) + (p.freePageReporting ? 1 : 0)
        #expect(t.numQueues == UInt16(expected))
        if p.freePageHint { #expect(t.queueSize(3) == 1024) }
        if p.freePageReporting { #expect(t.queueSize(p.freePageHint ? 4 : 3) == 32) }
    }

    @Test("device config reads past QEMU's config size return all-ones")
    func configSize() throws {
        let dev = SimulatedBalloonDevice(properties: BalloonDeviceProperties(pagePoison: false))
        let t = try dev.makeTransport()
        #expect(try t.readDeviceConfig32(at: 8) == 0xffff_ffff)
        #expect(try t.readDeviceConfig32(at: 0) == 0)
        #expect(throws: TransportError.deviceConfigOutOfRange(offset: 2, length: 4)) { try t.readDeviceConfig32(at: 2) }
    }

    @Test("Command writes keep Bus Master; INTx unmask clears only bit 10")
    func commandRegister() throws {
        let dev = SimulatedBalloonDevice()
        let t = try dev.makeTransport()
        try t.enableBusMaster()
        #expect(dev.configSpace.command & PCIConfig.commandBusMaster != 0)
        try dev.configSpace.write16(dev.configSpace.command | PCIConfig.commandINTxDisable, at: PCIConfig.command)
        try t.unmaskINTx()
        #expect(dev.configSpace.command & PCIConfig.commandINTxDisable == 0)
        #expect(dev.configSpace.command & PCIConfig.commandBusMaster != 0)
        #expect(dev.configSpace.commandWrites.allSatisfy { $0 & PCIConfig.commandBusMaster != 0 })
    }
}
