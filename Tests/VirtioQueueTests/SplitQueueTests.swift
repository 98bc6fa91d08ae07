import Testing
import BalloonSimulator
import VirtioCore
@testable import VirtioQueue

/// A minimal device side over the queue's own regions: pops avail entries and writes used
/// entries, so driver-side rules are tested without the full simulator.
private struct RingPeer {
    let q: SplitQueue<Int>
    var lastAvail: UInt16
    var usedIdx: UInt16

    init(_ q: SplitQueue<Int>) {
        self.q = q
        // The device has popped exactly what it has returned so far.
        usedIdx = q.used.load16(at: QueueLayout.usedIdx)
        lastAvail = usedIdx
    }

    mutating func popHead() -> UInt16? {
        let idx = q.available.load16(at: QueueLayout.availIdx)
        guard idx != lastAvail else { return nil }
        let head = q.available.load16(at: QueueLayout.availRing(Int(lastAvail % q.size)))
        lastAvail &+= 1
        return head
    }

    mutating func push(id: UInt32, len: UInt32 = 0, advance: UInt16 = 1) {
        let slot = Int(usedIdx % q.size)
        q.used.store32(id, at: QueueLayout.usedRingID(slot))
        q.used.store32(len, at: QueueLayout.usedRingLen(slot))
        usedIdx &+= advance
        q.used.store16(usedIdx, at: QueueLayout.usedIdx)
    }

    func descriptor(_ i: UInt16) -> (addr: UInt64, len: UInt32, flags: UInt16, next: UInt16) {
        let b = Int(i) * 16
        return (q.descriptors.load64(at: b), q.descriptors.load32(at: b + 8), q.descriptors.load16(at: b + 12), q.descriptors.load16(at: b + 14))
    }
}

private func makeQueue(size: UInt16, eventIndex: Bool = false) throws -> SplitQueue<Int> {
    let alloc = HeapDMAAllocator(memory: SimulatedGuestMemory())
    return try SplitQueue<Int>(index: 0, size: size, allocator: alloc, eventIndex: eventIndex)
}

private let page = GuestPhysicalRange(start: 0x10000, length: 4096)

@Suite("Split virtqueue, driver side (virtio 1.2 §2.7)")
struct SplitQueueTests {
    @Test("layout: 16-byte descriptors, avail 6+2N, used 6+8N", arguments: [UInt16(1), 128, 256, 1024])
    func layout(size: UInt16) {
        let l = QueueLayout(size: size)
        #expect(l.descriptorTableBytes == 16 * Int(size))
        #expect(l.availableRingBytes == 6 + 2 * Int(size))
        #expect(l.usedRingBytes == 6 + 8 * Int(size))
        #expect(l.usedEventOffset == 4 + 2 * Int(size))
        #expect(l.availEventOffset == 4 + 8 * Int(size))
    }

    @Test("sizes must be powers of two up to 1024", arguments: [UInt16(0), 3, 100, 1000, 2048])
    func invalidSizes(size: UInt16) {
        #expect(throws: QueueError.invalidSize(size)) { try makeQueue(size: size) }
    }

    @Test("a chain puts readable ranges before writable ones, linked with NEXT, WRITE on writable only")
    func chainLayout() throws {
        let q = try makeQueue(size: 8)
        let head = try q.add(readable: [GuestPhysicalRange(start: 0x1000, length: 4)],
                             writable: [GuestPhysicalRange(start: 0x20000, length: 0x400000), GuestPhysicalRange(start: 0x800000, length: 4096)], token: 1)
        let peer = RingPeer(q)
        let d0 = peer.descriptor(head)
        #expect(d0.addr == 0x1000 && d0.len == 4 && d0.flags == QueueLayout.descFlagNext)
        let d1 = peer.descriptor(d0.next)
        #expect(d1.addr == 0x20000 && d1.len == 0x400000 && d1.flags == QueueLayout.descFlagNext | QueueLayout.descFlagWrite)
        let d2 = peer.descriptor(d1.next)
        #expect(d2.addr == 0x800000 && d2.flags == QueueLayout.descFlagWrite)
        #expect(q.available.load16(at: QueueLayout.availIdx) == 1)
        #expect(q.freeDescriptors == 5)
    }

    @Test("a full ring refuses the next chain with .full and keeps its state")
    func fullRing() throws {
        let q = try makeQueue(size: 4)
        for i in 0..<4 { try q.add(writable: [page], token: i) }
        #expect(throws: QueueError.full(needed: 1, free: 0)) { try q.add(writable: [page], token: 9) }
        #expect(q.inFlight == 4)
        var peer = RingPeer(q)
        let h = peer.popHead()!
        peer.push(id: UInt32(h))
        let used = try q.takeUsed()
        #expect(used.map(\.token) == [0])
        try q.add(writable: [page], token: 5)
        #expect(q.inFlight == 4)
    }

    @Test("zero-length and empty chains are refused before they reach the device")
    func zeroLength() throws {
        let q = try makeQueue(size: 4)
        #expect(throws: QueueError.zeroLengthBuffer) { try q.add(writable: [GuestPhysicalRange(start: 0x1000, length: 0)], token: 0) }
        #expect(throws: QueueError.emptyChain) { try q.add(token: 0) }
        #expect(throws: QueueError.bufferTooLong(1 << 32)) { try q.add(writable: [GuestPhysicalRange(start: 0, length: 1 << 32)], token: 0) }
        #expect(q.freeDescriptors == 4)
    }

    @Test("16-bit indices wrap from 65535 to 0 without losing or duplicating a buffer")
    func wrapAround() throws {
        let q = try makeQueue(size: 4)
        q.debugStartIndices(at: 65533)
        var peer = RingPeer(q)
        var returned: [Int] = []
        for round in 0..<3 {
            for i in 0..<3 { try q.add(writable: [page], token: round * 10 + i) }
            while let h = peer.popHead() { peer.push(id: UInt32(h)) }
            returned += try q.takeUsed().map(\.token)
        }
        #expect(returned == [0, 1, 2, 10, 11, 12, 20, 21, 22])
        #expect(q.availableIndex == 65533 &+ 9)
        #expect(q.usedIndexConsumed == 65533 &+ 9)
        #expect(q.inFlight == 0)
    }

    @Test("a used id outside the ring is a typed error, not a crash")
    func usedIDOutOfRange() throws {
        let q = try makeQueue(size: 4)
        try q.add(writable: [page], token: 0)
        var peer = RingPeer(q)
        _ = peer.popHead()
        peer.push(id: 7)
        #expect(throws: QueueError.usedIDOutOfRange(id: 7, size: 4)) { try q.takeUsed() }
    }

    @Test("a used id that is not outstanding is a typed error")
    func usedIDNotOutstanding() throws {
        let q = try makeQueue(size: 4)
        let head = try q.add(readable: [page, page], token: 0)
        var peer = RingPeer(q)
        _ = peer.popHead()
        // id of the second descriptor in the chain: in range, but not a head.
        let second = peer.descriptor(head).next
        peer.push(id: UInt32(second))
        #expect(throws: QueueError.usedIDNotOutstanding(id: UInt32(second))) { try q.takeUsed() }
    }

    @Test("a used id returned twice is refused the second time")
    func doubleReturn() throws {
        let q = try makeQueue(size: 4)
        try q.add(writable: [page], token: 0)
        try q.add(writable: [page], token: 1)
        var peer = RingPeer(q)
        let h = peer.popHead()!
        peer.push(id: UInt32(h))
        peer.push(id: UInt32(h))
        #expect(throws: QueueError.usedIDNotOutstanding(id: UInt32(h))) { try q.takeUsed() }
    }

    @Test("used index moving past the buffers in flight is a typed error")
    func usedIndexJump() throws {
        let q = try makeQueue(size: 8)
        try q.add(writable: [page], token: 0)
        var peer = RingPeer(q)
        let h = peer.popHead()!
        peer.push(id: UInt32(h), advance: 5)
        #expect(throws: QueueError.usedIndexJump(from: 0, to: 5, inFlight: 1)) { try q.takeUsed() }
    }

    @Test("used length larger than the chain's writable bytes is a typed error")
    func usedLengthTooLarge() throws {
        let q = try makeQueue(size: 4)
        try q.add(readable: [GuestPhysicalRange(start: 0x1000, length: 100)], token: 0)
        var peer = RingPeer(q)
        let h = peer.popHead()!
        peer.push(id: UInt32(h), len: 1)
        #expect(throws: QueueError.usedLengthTooLarge(id: UInt32(h), length: 1, writable: 0)) { try q.takeUsed() }
    }

    @Test("kick: NO_NOTIFY in used->flags suppresses it; a batch needs one kick")
    func kickWithoutEventIndex() throws {
        let q = try makeQueue(size: 8)
        #expect(q.kickNeeded() == false)  // nothing new
        try q.add(writable: [page], token: 0)
        try q.add(writable: [page], token: 1)
        #expect(q.kickNeeded() == true)
        #expect(q.kickNeeded() == false)
        q.used.store16(QueueLayout.usedFlagNoNotify, at: QueueLayout.usedFlags)
        try q.add(writable: [page], token: 2)
        #expect(q.kickNeeded() == false)
    }

    @Test("kick with EVENT_IDX follows avail_event (vring_need_event), and used_event is maintained")
    func kickWithEventIndex() throws {
        let q = try makeQueue(size: 8, eventIndex: true)
        // Device asks to be kicked when avail idx passes 1 (avail_event = 1).
        q.used.store16(1, at: q.layout.availEventOffset)
        try q.add(writable: [page], token: 0)  // idx 0 -> 1: event 1 not crossed
        #expect(q.kickNeeded() == false)
        try q.add(writable: [page], token: 1)  // idx 1 -> 2: crosses event 1
        #expect(q.kickNeeded() == true)
        var peer = RingPeer(q)
        let h = peer.popHead()!
        peer.push(id: UInt32(h))
        _ = try q.takeUsed()
        #expect(q.available.load16(at: q.layout.usedEventOffset) == 1)
        #expect(ringNeedsEvent(event: 65535, new: 0, old: 65535))
    }

    @Test("after a device reset the queue forgets every chain and starts at index 0")
    func resetAfterDeviceReset() throws {
        let q = try makeQueue(size: 4)
        try q.add(writable: [page], token: 0)
        try q.add(writable: [page], token: 1)
        #expect(q.outstandingTokens().sorted() == [0, 1])
        q.resetAfterDeviceReset()
        #expect(q.inFlight == 0 && q.freeDescriptors == 4 && q.availableIndex == 0)
        #expect(q.available.load16(at: QueueLayout.availIdx) == 0)
    }

    @Test("a DMA arena hands out aligned, non-overlapping, zeroed sub-regions and says when it is exhausted")
    func arena() throws {
        let alloc = HeapDMAAllocator(memory: SimulatedGuestMemory())
        let arena = DMAArena(region: try alloc.allocate(byteCount: 4096, alignment: 4096))
        let a = try arena.allocate(byteCount: 10, alignment: 16)
        let b = try arena.allocate(byteCount: 100, alignment: 64)
        #expect(b.physicalAddress.value % 64 == 0)
        #expect(b.physicalAddress.value >= a.physicalAddress.value + 10)
        #expect(b.read(at: 0, count: 100).allSatisfy { $0 == 0 })
        // a at 0..<10, b at 64..<164: 3932 of 4096 bytes left.
        #expect { try arena.allocate(byteCount: 5000, alignment: 16) } throws: { error in
            guard case DMAError.arenaExhausted(wanted: 5000, free: 3932, size: 4096) = error else { return false }
            return "\(error)" == "DMA arena exhausted: 5000 bytes wanted, 3932 of 4096 left"
        }
    }
}
