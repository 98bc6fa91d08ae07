import VirtioCore
import VirtioQueue

/// One buffer the device popped: the chain's readable (OUT) and writable (IN) ranges.
public struct DeviceElement: Hashable, Sendable {
    public let head: UInt16
    public let readable: [GuestPhysicalRange]
    public let writable: [GuestPhysicalRange]
}

/// A ring error QEMU reports with `virtio_error` (docs/virtio-balloon.md §2.4); the device is
/// then broken until reset.
public struct DeviceRingError: Error, Hashable, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// The device side of a split virtqueue, walking rings with QEMU 7.2's checks.
final class DeviceQueue {
    let index: UInt16
    /// Size as the device offers it (QEMU's default for the queue).
    let maxSize: UInt16
    var size: UInt16
    var enabled = false
    var descAddress = PhysicalAddress(0)
    var driverAddress = PhysicalAddress(0)
    var deviceAddress = PhysicalAddress(0)
    var lastAvailIndex: UInt16 = 0
    var usedIndex: UInt16 = 0
    /// Elements popped and not yet pushed back.
    var inflight = 0

    init(index: UInt16, size: UInt16) {
        self.index = index
        self.maxSize = size
        self.size = size
    }

    func reset() {
        enabled = false
        size = maxSize
        descAddress = PhysicalAddress(0)
        driverAddress = PhysicalAddress(0)
        deviceAddress = PhysicalAddress(0)
        lastAvailIndex = 0
        usedIndex = 0
        inflight = 0
    }

    private func ring(_ memory: SimulatedGuestMemory, _ address: PhysicalAddress, _ length: Int, _ what: String) throws(DeviceRingError) -> (DMARegion, Int) {
        guard let r = memory.region(containing: address, length: UInt64(length)) else {
            throw DeviceRingError(message: "Cannot map \(what)")
        }
        return r
    }

    /// Whether the driver has made buffers available that the device has not popped.
    func hasAvailable(_ memory: SimulatedGuestMemory) throws(DeviceRingError) -> Bool {
        guard enabled else { return false }
        let (avail, off) = try ring(memory, driverAddress, 6 + 2 * Int(size), "avail")
        return avail.loadAcquire16(at: off + QueueLayout.availIdx) != lastAvailIndex
    }

    /// `virtqueue_split_pop`: the next available chain, or nil.
    func pop(_ memory: SimulatedGuestMemory) throws(DeviceRingError) -> DeviceElement? {
        guard enabled else { return nil }
        let (avail, aoff) = try ring(memory, driverAddress, 6 + 2 * Int(size), "avail")
        let (desc, doff) = try ring(memory, descAddress, 16 * Int(size), "desc")
        let availIndex = avail.loadAcquire16(at: aoff + QueueLayout.availIdx)
        let pending = availIndex &- lastAvailIndex
        if pending == 0 { return nil }
        guard pending <= size else { throw DeviceRingError(message: "Guest moved used index from \(lastAvailIndex) to \(availIndex)") }
        guard inflight < Int(size) else { throw DeviceRingError(message: "Virtqueue size exceeded") }
        let head = avail.load16(at: aoff + QueueLayout.availRing(Int(lastAvailIndex % size)))
        guard head < size else { throw DeviceRingError(message: "Guest says index \(head) is available") }
        var readable: [GuestPhysicalRange] = []
        var writable: [GuestPhysicalRange] = []
        var i = head
        var count = 0
        while true {
            count += 1
            guard count <= Int(size) else { throw DeviceRingError(message: "Looped descriptor") }
            let base = doff + 16 * Int(i)
            let addr = desc.load64(at: base)
            let len = desc.load32(at: base + 8)
            let flags = desc.load16(at: base + 12)
            let next = desc.load16(at: base + 14)
            guard len > 0 else { throw DeviceRingError(message: "virtio: zero sized buffers are not allowed") }
            guard flags & QueueLayout.descFlagIndirect == 0 else { throw DeviceRingError(message: "simulator: indirect descriptors not offered") }
            guard memory.isMappable(PhysicalAddress(addr), length: UInt64(len)) else {
                throw DeviceRingError(message: "virtio: bogus descriptor or out of resources")
            }
            let range = GuestPhysicalRange(start: addr, length: UInt64(len))
            if flags & QueueLayout.descFlagWrite != 0 {
                writable.append(range)
            } else {
                guard writable.isEmpty else { throw DeviceRingError(message: "Incorrect order for descriptors") }
                readable.append(range)
            }
            if flags & QueueLayout.descFlagNext == 0 { break }
            guard next < size else { throw DeviceRingError(message: "Desc next is \(next)") }
            i = next
        }
        lastAvailIndex &+= 1
        inflight += 1
        return DeviceElement(head: head, readable: readable, writable: writable)
    }

    /// `virtqueue_push`: returns an element with `length` bytes written.
    func push(_ memory: SimulatedGuestMemory, head: UInt32, length: UInt32, extraIndexAdvance: UInt16 = 0) throws(DeviceRingError) {
        let (used, off) = try ring(memory, deviceAddress, 6 + 8 * Int(size), "used")
        let slot = Int(usedIndex % size)
        used.store32(head, at: off + QueueLayout.usedRingID(slot))
        used.store32(length, at: off + QueueLayout.usedRingLen(slot))
        usedIndex &+= 1 &+ extraIndexAdvance
        used.storeRelease16(usedIndex, at: off + QueueLayout.usedIdx)
        inflight = max(0, inflight - 1)
    }

    /// `virtqueue_rewind(vq, 1)`: makes the last popped element available again.
    func unpop() {
        lastAvailIndex &-= 1
        inflight = max(0, inflight - 1)
    }
}
