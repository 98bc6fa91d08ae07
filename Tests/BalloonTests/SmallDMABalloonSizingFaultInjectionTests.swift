import Testing
import BalloonSimulator
import VirtioCore
import VirtioPCI
import VirtioQueue
import BalloonBlocks
import FreePages
@testable import Balloon

/// DMA memory as balloond has it without hugepages: single 4 KiB pages, nothing larger
/// (`PageDMAAllocator`), over the simulator's heap memory.
final class PageSizedDMAAllocator: DMAAllocator {
    let inner: HeapDMAAllocator
    private(set) var refused: [Int] = []
    init(memory: SimulatedGuestMemory) { inner = HeapDMAAllocator(memory: memory) }
    var largestAllocation: Int { 4096 }
    func allocate(byteCount: Int, alignment: Int) throws(DMAError) -> DMARegion {
        guard byteCount <= 4096 else {
            refused.append(byteCount)
            throw .tooLarge(byteCount: byteCount, largestAllocation: 4096)
        }
        return try inner.allocate(byteCount: byteCount, alignment: alignment)
    }
}

@Suite("Inflate without hugepages: PFN buffers sized to the DMA allocator (issue 9 M1)")
struct SmallDMABalloonSizingFaultInjectionTests {
    private func driver(_ device: SimulatedBalloonDevice, allocator: DMAAllocator, memory: SimulatedBalloonMemory,
                        maxQueueSize: UInt16 = 256) throws -> BalloonDriver<ModernPCITransport> {
        var options = BalloonDriverOptions()
        options.maxQueueSize = maxQueueSize
        return BalloonDriver(transport: try device.makeTransport(), allocator: allocator, options: options, balloonMemory: memory)
    }

    private func service(_ line: SimulatedInterruptLine, _ driver: BalloonDriver<ModernPCITransport>) throws {
        var n = 0
        while try line.wait(timeoutMilliseconds: 0) {
            try driver.serviceInterrupt(line: line)
            n += 1
            precondition(n < 1000, "interrupt storm")
        }
    }

    @Test("with a 4 KiB-only DMA allocator the balloon inflates to num_pages and deflates back, 1024 PFNs per buffer, each 2 MiB block in one buffer")
    func inflatesWithPageSizedBuffers() throws {
        let device = SimulatedBalloonDevice(properties: BalloonDeviceProperties())
        device.hostPageSize = 2 << 20
        let line = device.makeInterruptLine()
        let ram = device.properties.ramSize
        let memory = SimulatedBalloonMemory(base: ram - (64 << 20), bytes: 64 << 20)
        let allocator = PageSizedDMAAllocator(memory: device.memory)
        let d = try driver(device, allocator: allocator, memory: memory)
        try d.bringUp()
        device.setTarget(bytes: ram - 8192 * 4096)  // 32 MiB
        try service(line, d)
        #expect(device.actual == 8192)
        #expect(device.inflatedPFNs.count == 8192)
        #expect(allocator.refused.isEmpty)
        #expect(!device.inflateBuffers.isEmpty)
        for buffer in device.inflateBuffers { #expect(buffer.count % 512 == 0 && buffer.count <= 1024) }
        // Every 2 MiB host page went: all 512 PFNs of each block travelled together.
        #expect(device.discardedHostPages.count == 16)

        device.setTarget(bytes: ram)
        try service(line, d)
        #expect(device.actual == 0)
        #expect(memory.heldBytes == 0)
    }

    @Test("an allocator smaller than one 2 MiB block's 512 PFNs (2 KiB) inflates nothing and says why, without splitting a block")
    func refusesWhenABlockDoesNotFit() throws {
        final class Tiny: DMAAllocator {
            let inner: HeapDMAAllocator
            init(memory: SimulatedGuestMemory) { inner = HeapDMAAllocator(memory: memory) }
            var largestAllocation: Int { 1024 }
            func allocate(byteCount: Int, alignment: Int) throws(DMAError) -> DMARegion {
                guard byteCount <= 1024 else { throw .tooLarge(byteCount: byteCount, largestAllocation: 1024) }
                return try inner.allocate(byteCount: byteCount, alignment: alignment)
            }
        }
        let device = SimulatedBalloonDevice(properties: BalloonDeviceProperties())
        let line = device.makeInterruptLine()
        let ram = device.properties.ramSize
        let memory = SimulatedBalloonMemory(base: ram - (64 << 20), bytes: 64 << 20)
        // Queues of 32 entries: every ring part fits in 1 KiB.
        let d = try driver(device, allocator: Tiny(memory: device.memory), memory: memory, maxQueueSize: 32)
        try d.bringUp()
        device.setTarget(bytes: ram - 2048 * 4096)
        try service(line, d)
        #expect(device.actual == 0)
        #expect(device.inflateBuffers.isEmpty)
        #expect(memory.heldBytes == 0)
        #expect(d.statusSnapshot().shortfall?.contains("2 MiB block") == true)
    }
}
