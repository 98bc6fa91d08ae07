import VirtioCore
import VirtioQueue

/// One buffer the device popped: the chain's readable (OUT) and writable (IN) ranges.
public struct DeviceElement: Hashable, Sendable {
    public let head: UInt16
    public let readable: [GuestPhysicalRange]
    public let writable: [GuestPhysicalRange]
}

/// An error QEMU reports with `virtio_error` (docs/virtio-balloon.md §2.4), mostly from walking
/// a ring; the device is then broken until reset. `description` is QEMU 7.2's message.
public enum DeviceRingError: Error, Hashable, CustomStringConvertible {
    /// A ring part ("desc", "avail", "used") is not in guest memory.
    case cannotMap(String)
    /// queue_enable written with a value other than 1.
    case wrongQueueEnable(UInt64)
    /// queue_enable = 1 for a queue whose rings are not all in guest memory.
    case cannotMapRings
    /// `avail->idx` moved by more than the queue size.
    case availIndexJump(from: UInt16, to: UInt16)
    /// More elements popped than the queue has entries.
    case sizeExceeded
    /// The available ring names a head outside the queue.
    case headOutOfRange(UInt16)
    /// A chain longer than the queue (a loop).
    case loopedDescriptor
    /// A descriptor of length 0.
    case zeroSizedBuffer
    /// An indirect descriptor (the simulator does not offer INDIRECT_DESC).
    case indirectDescriptor
    /// A buffer outside guest memory, or one the device cannot read.
    case bogusDescriptor
    /// A device-readable descriptor after a device-writable one.
    case incorrectOrder
    /// A descriptor's next is outside the queue.
    case nextOutOfRange(UInt16)
    /// A free page hint command id buffer shorter than 4 bytes or unreadable.
    case incorrectCommandID
    /// An element needs more I/O vectors than QEMU maps for one element (1024,
    /// `VIRTQUEUE_MAX_SIZE`): through an IOMMU each IOMMU page of a descriptor is one vector.
    case tooManyWriteDescriptors
    case tooManyReadDescriptors
    /// Fault injection: NEEDS_RESET right after DRIVER_OK.
    case injectedNeedsReset

    public var description: String {
        switch self {
        case .cannotMap(let what): return "Cannot map \(what)"
        case .wrongQueueEnable(let value): return "wrong value for queue_enable \(value)"
        case .cannotMapRings: return "Cannot map desc/avail/used"
        case .availIndexJump(let from, let to): return "Guest moved used index from \(from) to \(to)"
        case .sizeExceeded: return "Virtqueue size exceeded"
        case .headOutOfRange(let head): return "Guest says index \(head) is available"
        case .loopedDescriptor: return "Looped descriptor"
        case .zeroSizedBuffer: return "virtio: zero sized buffers are not allowed"
        case .indirectDescriptor: return "simulator: indirect descriptors not offered"
        case .bogusDescriptor: return "virtio: bogus descriptor or out of resources"
        case .incorrectOrder: return "Incorrect order for descriptors"
        case .nextOutOfRange(let next): return "Desc next is \(next)"
        case .incorrectCommandID: return "virtio-balloon: received an incorrect cmd id"
        case .tooManyWriteDescriptors: return "virtio: too many write descriptors in indirect table"
        case .tooManyReadDescriptors: return "virtio: too many read descriptors in indirect table"
        case .injectedNeedsReset: return "fault injection: NEEDS_RESET after DRIVER_OK"
        }
    }
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
            throw .cannotMap(what)
        }
        return r
    }

    /// Whether the driver has made buffers available that the device has not popped.
    func hasAvailable(_ memory: SimulatedGuestMemory) throws(DeviceRingError) -> Bool {
        guard enabled else { return false }
        let (avail, off) = try ring(memory, driverAddress, 6 + 2 * Int(size), "avail")
        return avail.loadAcquire16(at: off + QueueLayout.availIdx) != lastAvailIndex
    }

    /// QEMU's `VIRTQUEUE_MAX_SIZE`: the most I/O vectors `virtqueue_map_desc` maps for one
    /// element (readable and writable together).
    static let maxIOVectors = 1024

    /// `virtqueue_split_pop`: the next available chain, or nil. `iommuPageBytes`: with
    /// ACCESS_PLATFORM behind a vIOMMU, QEMU maps a descriptor one IOTLB entry at a time, so
    /// each IOMMU page it touches is one I/O vector (nil: one vector per descriptor, guest RAM
    /// being contiguous in QEMU's address space).
    /// `contiguous`: ranges whose memory behind the IOMMU is contiguous (one vector per
    /// descriptor inside one, as QEMU joins translations that land on contiguous memory).
    func pop(_ memory: SimulatedGuestMemory, iommuPageBytes: UInt64? = nil,
             contiguous: [GuestPhysicalRange] = []) throws(DeviceRingError) -> DeviceElement? {
        guard enabled else { return nil }
        let (avail, aoff) = try ring(memory, driverAddress, 6 + 2 * Int(size), "avail")
        let (desc, doff) = try ring(memory, descAddress, 16 * Int(size), "desc")
        let availIndex = avail.loadAcquire16(at: aoff + QueueLayout.availIdx)
        let pending = availIndex &- lastAvailIndex
        if pending == 0 { return nil }
        guard pending <= size else { throw .availIndexJump(from: lastAvailIndex, to: availIndex) }
        guard inflight < Int(size) else { throw .sizeExceeded }
        let head = avail.load16(at: aoff + QueueLayout.availRing(Int(lastAvailIndex % size)))
        guard head < size else { throw .headOutOfRange(head) }
        var readable: [GuestPhysicalRange] = []
        var writable: [GuestPhysicalRange] = []
        var i = head
        var count = 0
        var vectors = 0
        while true {
            count += 1
            guard count <= Int(size) else { throw .loopedDescriptor }
            let base = doff + 16 * Int(i)
            let addr = desc.load64(at: base)
            let len = desc.load32(at: base + 8)
            let flags = desc.load16(at: base + 12)
            let next = desc.load16(at: base + 14)
            guard len > 0 else { throw .zeroSizedBuffer }
            guard flags & QueueLayout.descFlagIndirect == 0 else { throw .indirectDescriptor }
            guard memory.isMappable(PhysicalAddress(addr), length: UInt64(len)) else {
                throw .bogusDescriptor
            }
            let range = GuestPhysicalRange(start: addr, length: UInt64(len))
            let isWrite = flags & QueueLayout.descFlagWrite != 0
            if !isWrite { guard writable.isEmpty else { throw .incorrectOrder } }
            if let page = iommuPageBytes, !contiguous.contains(where: { $0.start.value <= addr && addr + UInt64(len) <= $0.end }) {
                vectors += Int((addr % page + UInt64(len) + page - 1) / page)
            } else {
                vectors += 1
            }
            if vectors > Self.maxIOVectors { throw isWrite ? .tooManyWriteDescriptors : .tooManyReadDescriptors }
            if isWrite { writable.append(range) } else { readable.append(range) }
            if flags & QueueLayout.descFlagNext == 0 { break }
            guard next < size else { throw .nextOutOfRange(next) }
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
