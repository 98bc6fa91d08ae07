import Testing
import TestSupport
import BalloonSimulator
import VirtioCore
@testable import VirtioPCI

/// The simulated device's BAR4 with an MSI-X table of `tableSize` vectors in front of its
/// common config: `msix_config` and each queue's `queue_msix_vector` keep a vector below the
/// table size and read back NO_VECTOR for anything else (what QEMU's virtio-pci does once
/// MSI-X is enabled). Every write of the vector registers and of queue_enable is logged.
final class MSIXBAR4: MMIORegion {
    enum Write: Equatable { case msixConfig(UInt16), queueVector(queue: UInt16, UInt16), queueEnable(queue: UInt16) }
    let inner: MMIORegion
    let tableSize: UInt16
    var configVector: UInt16 = virtioNoVector
    var queueVectors: [UInt16: UInt16] = [:]
    var writes: [Write] = []
    var length: Int { inner.length }

    init(inner: MMIORegion, tableSize: UInt16) {
        self.inner = inner
        self.tableSize = tableSize
    }

    private var selected: UInt16 { inner.read16(at: CommonConfig.queueSelect) }

    func read8(at offset: Int) -> UInt8 { inner.read8(at: offset) }
    func read32(at offset: Int) -> UInt32 { inner.read32(at: offset) }
    func read16(at offset: Int) -> UInt16 {
        switch offset {
        case CommonConfig.msixConfig: return configVector
        case CommonConfig.queueMSIXVector: return queueVectors[selected] ?? virtioNoVector
        default: return inner.read16(at: offset)
        }
    }
    func write8(_ value: UInt8, at offset: Int) { inner.write8(value, at: offset) }
    func write32(_ value: UInt32, at offset: Int) { inner.write32(value, at: offset) }
    func write16(_ value: UInt16, at offset: Int) {
        let accepted = value < tableSize ? value : virtioNoVector
        switch offset {
        case CommonConfig.msixConfig:
            writes.append(.msixConfig(value))
            configVector = accepted
        case CommonConfig.queueMSIXVector:
            writes.append(.queueVector(queue: selected, value))
            queueVectors[selected] = accepted
        case CommonConfig.queueEnable:
            writes.append(.queueEnable(queue: selected))
            inner.write16(value, at: offset)
        default:
            inner.write16(value, at: offset)
        }
    }
}

@Suite("MSI-X vectors through the modern transport (vfio): msix_config and queue_msix_vector written and read back")
struct MSIXVectorTests {
    func transport(tableSize: UInt16) throws -> (SimulatedBalloonDevice, MSIXBAR4, ModernPCITransport) {
        let dev = SimulatedBalloonDevice()
        let bar = MSIXBAR4(inner: dev.bar4, tableSize: tableSize)
        let t = try ModernPCITransport(config: dev.configSpace, barSizes: dev.configSpace.barSizes, mapBAR: { (b) throws(PCIError) -> MMIORegion in
            guard b == 4 else { throw PCIError.bar(index: b, reason: PCIAccessProblem.notMapped) }
            return bar
        }, pause: { _ in })
        return (dev, bar, t)
    }

    func enable(_ t: ModernPCITransport, _ dev: SimulatedBalloonDevice, queue: UInt16) throws {
        let alloc = dev.makeDMAAllocator()
        let desc = try alloc.allocate(byteCount: 16 * 64, alignment: 16)
        let avail = try alloc.allocate(byteCount: 6 + 2 * 64, alignment: 2)
        let used = try alloc.allocate(byteCount: 6 + 8 * 64, alignment: 4)
        try t.enableQueue(queue, size: 64, descriptors: desc.physicalAddress, driver: avail.physicalAddress, device: used.physicalAddress)
    }

    @Test("without a vector plan (INTx) no vector register is touched")
    func intxLeavesVectorsAlone() throws {
        let (dev, bar, t) = try transport(tableSize: 4)
        #expect(t.msixVectors == nil)
        try t.setUpInterrupts()
        try enable(t, dev, queue: 0)
        #expect(bar.writes == [.queueEnable(queue: 0)])
    }

    @Test("with a per-queue plan: msix_config gets vector 0, each queue 1 + its index before queue_enable, all read back")
    func programsVectors() throws {
        let (dev, bar, t) = try transport(tableSize: 4)
        t.msixVectors = MSIXVectorPlan(tableSize: 4, queueCount: 3)
        try t.setUpInterrupts()
        #expect(bar.configVector == 0)
        for q: UInt16 in 0..<3 { try enable(t, dev, queue: q) }
        #expect(bar.writes == [
            .msixConfig(0),
            .queueVector(queue: 0, 1), .queueEnable(queue: 0),
            .queueVector(queue: 1, 2), .queueEnable(queue: 1),
            .queueVector(queue: 2, 3), .queueEnable(queue: 2),
        ])
        #expect(bar.queueVectors == [0: 1, 1: 2, 2: 3])
    }

    @Test("with a shared plan every queue gets vector 1")
    func sharedVector() throws {
        let (dev, bar, t) = try transport(tableSize: 2)
        t.msixVectors = MSIXVectorPlan(tableSize: 2, queueCount: 3)
        try t.setUpInterrupts()
        for q: UInt16 in 0..<3 { try enable(t, dev, queue: q) }
        #expect(bar.queueVectors == [0: 1, 1: 1, 2: 1])
    }

    @Test("a device that reads back NO_VECTOR for msix_config fails setUpInterrupts with msixVectorRejected")
    func configVectorRejected() throws {
        // The plain simulator has no MSI-X: every vector register reads 0xffff.
        let dev = SimulatedBalloonDevice()
        let t = try dev.makeTransport()
        t.msixVectors = MSIXVectorPlan(tableSize: 3, queueCount: 2)
        #expect(throws: TransportError.msixVectorRejected(source: "config", vector: 0, got: 0xffff)) { try t.setUpInterrupts() }
        let message = TransportError.msixVectorRejected(source: "config", vector: 0, got: 0xffff).description
        #expect(message.contains("NO_VECTOR") && message.contains("vector 0 for config"))
    }

    @Test("a queue vector the device cannot map fails enableQueue with msixVectorRejected, and the queue stays disabled")
    func queueVectorRejected() throws {
        let (dev, bar, t) = try transport(tableSize: 2)
        // The plan believes in 3 vectors; the device only has 2.
        t.msixVectors = MSIXVectorPlan(tableSize: 3, queueCount: 2)
        try t.setUpInterrupts()
        try enable(t, dev, queue: 0)
        #expect(throws: TransportError.msixVectorRejected(source: "queue 1", vector: 2, got: 0xffff)) { try enable(t, dev, queue: 1) }
        #expect(!t.queueEnabled(1))
        #expect(!bar.writes.contains(.queueEnable(queue: 1)))
    }
}
