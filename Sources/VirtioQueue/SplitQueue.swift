import VirtioCore

/// What went wrong on a virtqueue. Device-caused violations are errors, never traps.
public enum QueueError: Error, Hashable, CustomStringConvertible {
    /// Not a power of two in 1...1024.
    case invalidSize(UInt16)
    /// A chain needs more descriptors than are free.
    case full(needed: Int, free: Int)
    /// A chain with no buffers.
    case emptyChain
    /// A zero-length buffer (QEMU marks the device broken for one).
    case zeroLengthBuffer
    /// A buffer longer than a descriptor's 32-bit length.
    case bufferTooLong(UInt64)
    /// The device returned a head index outside the ring.
    case usedIDOutOfRange(id: UInt32, size: UInt16)
    /// The device returned a head that is not outstanding (never posted, or already returned).
    case usedIDNotOutstanding(id: UInt32)
    /// The device moved `used->idx` by more than there are buffers in flight.
    case usedIndexJump(from: UInt16, to: UInt16, inFlight: Int)
    /// The device claims to have written more than the chain's writable bytes.
    case usedLengthTooLarge(id: UInt32, length: UInt32, writable: UInt64)
    /// DMA memory for the ring could not be had.
    case dma(DMAError)

    public var description: String {
        switch self {
        case .invalidSize(let s): return "queue size \(s) is not a power of two in 1...1024"
        case .full(let n, let f): return "queue full: \(n) descriptors needed, \(f) free"
        case .emptyChain: return "a descriptor chain needs at least one buffer"
        case .zeroLengthBuffer: return "zero-length buffers are not allowed (QEMU breaks the device)"
        case .bufferTooLong(let l): return "buffer of \(l) bytes exceeds a descriptor's 32-bit length"
        case .usedIDOutOfRange(let id, let size): return "device returned used id \(id) outside a queue of \(size)"
        case .usedIDNotOutstanding(let id): return "device returned used id \(id), which is not outstanding"
        case .usedIndexJump(let a, let b, let n): return "device moved used index from \(a) to \(b) with only \(n) buffers in flight"
        case .usedLengthTooLarge(let id, let l, let w): return "device reports \(l) bytes written to used id \(id), whose chain has \(w) writable bytes"
        case .dma(let m): return "ring memory: \(m)"
        }
    }
}

/// A buffer the device handed back.
public struct UsedBuffer<Token> {
    /// The head descriptor index of the chain.
    public let head: UInt16
    /// Bytes the device says it wrote (QEMU's balloon always says 0).
    public let length: UInt32
    /// What the driver attached when it posted the chain.
    public let token: Token
}

/// The driver side of a split virtqueue (virtio 1.2 §2.7).
///
/// The device can write the used ring and read everything else; nothing the device can
/// write is trusted. The queue keeps a private shadow of the descriptor chains, the free list
/// and both indices, and validates every used entry against it.
public final class SplitQueue<Token> {
    public let index: UInt16
    public let layout: QueueLayout
    public var size: UInt16 { layout.size }
    /// Whether VIRTIO_F_EVENT_IDX was negotiated.
    public let eventIndex: Bool

    let descriptors: DMARegion
    let available: DMARegion
    let used: DMARegion

    private struct Chain {
        var descriptors: [UInt16]
        var writableBytes: UInt64
        var token: Token
    }

    /// Shadow of outstanding chains, by head index.
    private var chains: [Chain?]
    /// Free descriptor indices (a stack; order does not matter to the device).
    private var freeList: [UInt16]
    /// Our copy of `avail->idx`; never read back from shared memory.
    private var availIndex: UInt16 = 0
    /// `avail->idx` at the last kick decision.
    private var availIndexAtLastKick: UInt16 = 0
    /// The `used->idx` value we have consumed up to.
    private var lastUsedIndex: UInt16 = 0

    /// Guest-physical addresses to program into the common config.
    public var descriptorAreaAddress: PhysicalAddress { descriptors.physicalAddress }
    public var driverAreaAddress: PhysicalAddress { available.physicalAddress }
    public var deviceAreaAddress: PhysicalAddress { used.physicalAddress }

    /// Builds an empty queue in fresh DMA memory.
    public init(index: UInt16, size: UInt16, allocator: DMAAllocator, eventIndex: Bool = false) throws(QueueError) {
        guard QueueLayout.isValid(size: size) else { throw .invalidSize(size) }
        self.index = index
        self.layout = QueueLayout(size: size)
        self.eventIndex = eventIndex
        do {
            descriptors = try allocator.allocate(byteCount: layout.descriptorTableBytes, alignment: 16)
            available = try allocator.allocate(byteCount: layout.availableRingBytes, alignment: 2)
            used = try allocator.allocate(byteCount: layout.usedRingBytes, alignment: 4)
        } catch {
            throw .dma(error)
        }
        chains = Array(repeating: nil, count: Int(size))
        freeList = (0..<size).reversed().map { $0 }
    }

    /// Descriptors not in use.
    public var freeDescriptors: Int { freeList.count }
    /// Chains posted and not yet returned.
    public var inFlight: Int { chains.reduce(0) { $0 + ($1 == nil ? 0 : 1) } }
    /// Our `avail->idx` (for status output and tests).
    public var availableIndex: UInt16 { availIndex }
    /// The used index consumed so far.
    public var usedIndexConsumed: UInt16 { lastUsedIndex }

    /// Posts one chain: device-readable ranges first, then device-writable ones (the order
    /// virtio requires; QEMU breaks the device on a readable after a writable). The chain is
    /// published to the device at once; after posting a batch, notify the device when
    /// `kickNeeded()` says so.
    ///
    /// - Returns: the head descriptor index.
    @discardableResult
    public func add(readable: [GuestPhysicalRange] = [], writable: [GuestPhysicalRange] = [], token: Token) throws(QueueError) -> UInt16 {
        let count = readable.count + writable.count
        guard count > 0 else { throw .emptyChain }
        guard count <= freeList.count else { throw .full(needed: count, free: freeList.count) }
        for r in readable + writable {
            guard r.length > 0 else { throw .zeroLengthBuffer }
            guard r.length <= UInt64(UInt32.max) else { throw .bufferTooLong(r.length) }
        }
        var ids: [UInt16] = []
        ids.reserveCapacity(count)
        for _ in 0..<count { ids.append(freeList.removeLast()) }
        var writableBytes: UInt64 = 0
        for (i, range) in (readable + writable).enumerated() {
            let isWritable = i >= readable.count
            if isWritable { writableBytes += range.length }
            var flags: UInt16 = isWritable ? QueueLayout.descFlagWrite : 0
            let last = i == count - 1
            if !last { flags |= QueueLayout.descFlagNext }
            let base = Int(ids[i]) * 16
            descriptors.store64(range.start.value, at: base)
            descriptors.store32(UInt32(range.length), at: base + 8)
            descriptors.store16(flags, at: base + 12)
            descriptors.store16(last ? 0 : ids[i + 1], at: base + 14)
        }
        let head = ids[0]
        chains[Int(head)] = Chain(descriptors: ids, writableBytes: writableBytes, token: token)
        let slot = Int(availIndex & (size - 1))
        available.store16(head, at: QueueLayout.availRing(slot))
        availIndex &+= 1
        // Release: the descriptors and the ring slot above must be visible before the index.
        available.storeRelease16(availIndex, at: QueueLayout.availIdx)
        return head
    }

    /// Whether the device wants a notification for what was posted since the last call
    /// (virtio 1.2 §2.7.10): `used->flags` NO_NOTIFY without EVENT_IDX, `avail_event` with it.
    /// Call once per batch, then write the notify register when it returns true.
    public func kickNeeded() -> Bool {
        // Full barrier: our avail->idx store must be visible before we read the device's
        // suppression state, or the device could go idle between the two and miss the kick.
        fullMemoryBarrier()
        let old = availIndexAtLastKick
        let new = availIndex
        availIndexAtLastKick = new
        if old == new { return false }
        if eventIndex {
            let event = used.load16(at: layout.availEventOffset)
            return ringNeedsEvent(event: event, new: new, old: old)
        }
        return used.load16(at: QueueLayout.usedFlags) & QueueLayout.usedFlagNoNotify == 0
    }

    /// Whether the device has returned buffers we have not consumed yet.
    public var hasUsed: Bool { used.loadAcquire16(at: QueueLayout.usedIdx) != lastUsedIndex }

    /// Takes every buffer the device has returned, validating each entry against the shadow.
    ///
    /// On a violation the entries before it are consumed and returned state stays consistent;
    /// the error names what the device did wrong. The caller should reset the device.
    public func takeUsed() throws(QueueError) -> [UsedBuffer<Token>] {
        // Acquire: ring entries are read only after the index that publishes them.
        let deviceIndex = used.loadAcquire16(at: QueueLayout.usedIdx)
        let pending = Int(deviceIndex &- lastUsedIndex)
        let outstanding = inFlight
        guard pending <= outstanding else {
            throw .usedIndexJump(from: lastUsedIndex, to: deviceIndex, inFlight: outstanding)
        }
        var out: [UsedBuffer<Token>] = []
        out.reserveCapacity(pending)
        while lastUsedIndex != deviceIndex {
            let slot = Int(lastUsedIndex & (size - 1))
            let id = used.load32(at: QueueLayout.usedRingID(slot))
            let length = used.load32(at: QueueLayout.usedRingLen(slot))
            guard id < UInt32(size) else { throw .usedIDOutOfRange(id: id, size: size) }
            guard let chain = chains[Int(id)] else { throw .usedIDNotOutstanding(id: id) }
            guard UInt64(length) <= chain.writableBytes else {
                throw .usedLengthTooLarge(id: id, length: length, writable: chain.writableBytes)
            }
            chains[Int(id)] = nil
            freeList.append(contentsOf: chain.descriptors)
            lastUsedIndex &+= 1
            out.append(UsedBuffer(head: UInt16(id), length: length, token: chain.token))
        }
        if eventIndex {
            // Ask for an interrupt at the next used entry.
            available.store16(lastUsedIndex, at: layout.usedEventOffset)
            fullMemoryBarrier()
        }
        return out
    }

    /// Tokens of every chain still outstanding (for teardown after a device reset).
    public func outstandingTokens() -> [Token] { chains.compactMap { $0?.token } }

    /// Forgets every outstanding chain. Only valid after the device was reset (it no longer
    /// owns any buffer); the ring memory itself is then reprogrammed from scratch.
    public func resetAfterDeviceReset() {
        chains = Array(repeating: nil, count: Int(size))
        freeList = (0..<size).reversed().map { $0 }
        availIndex = 0
        availIndexAtLastKick = 0
        lastUsedIndex = 0
        descriptors.zero()
        available.zero()
        used.zero()
    }

    /// Test support: start both indices at `value` as if `value` buffers had already gone
    /// round (to exercise the 16-bit wrap). Only valid on a queue the device has not seen.
    public func debugStartIndices(at value: UInt16) {
        precondition(freeList.count == Int(size), "only on an idle queue")
        availIndex = value
        availIndexAtLastKick = value
        lastUsedIndex = value
        available.store16(value, at: QueueLayout.availIdx)
        used.store16(value, at: QueueLayout.usedIdx)
    }
}
