/// Byte layout of a split virtqueue of `size` entries (virtio 1.2 §2.7).
///
/// The three parts are separate DMA regions (each physically contiguous on its own), so a
/// 4 KiB-page fallback allocator can place them on different pages.
public struct QueueLayout: Hashable, Sendable {
    public let size: UInt16
    /// Descriptor table: 16 bytes per entry, 16-byte aligned.
    public var descriptorTableBytes: Int { 16 * Int(size) }
    /// Available ring: flags, idx, ring[size], used_event; 2-byte aligned.
    public var availableRingBytes: Int { 6 + 2 * Int(size) }
    /// Used ring: flags, idx, ring[size] of {id, len}, avail_event; 4-byte aligned.
    public var usedRingBytes: Int { 6 + 8 * Int(size) }

    // Offsets inside the available ring.
    public static let availFlags = 0
    public static let availIdx = 2
    public static func availRing(_ slot: Int) -> Int { 4 + 2 * slot }
    public var usedEventOffset: Int { 4 + 2 * Int(size) }

    // Offsets inside the used ring.
    public static let usedFlags = 0
    public static let usedIdx = 2
    public static func usedRingID(_ slot: Int) -> Int { 4 + 8 * slot }
    public static func usedRingLen(_ slot: Int) -> Int { 8 + 8 * slot }
    public var availEventOffset: Int { 4 + 8 * Int(size) }

    /// `VIRTQ_DESC_F_NEXT`, `_WRITE`, `_INDIRECT`.
    public static let descFlagNext: UInt16 = 1
    public static let descFlagWrite: UInt16 = 2
    public static let descFlagIndirect: UInt16 = 4
    /// `VIRTQ_USED_F_NO_NOTIFY`: the device does not want kicks (without EVENT_IDX).
    public static let usedFlagNoNotify: UInt16 = 1
    /// `VIRTQ_AVAIL_F_NO_INTERRUPT`.
    public static let availFlagNoInterrupt: UInt16 = 1

    /// Largest queue balloond drives (QEMU's maximum, the free page queue).
    public static let maxSize: UInt16 = 1024

    public init(size: UInt16) { self.size = size }

    /// Whether `size` is a legal split-queue size for balloond: a power of two in 1...1024.
    public static func isValid(size: UInt16) -> Bool { size > 0 && size <= maxSize && size & (size - 1) == 0 }
}

/// `vring_need_event` (virtio 1.2 §2.7.10): with EVENT_IDX, whether moving an index from
/// `old` to `new` crosses the other side's `event` index.
@inline(__always) public func ringNeedsEvent(event: UInt16, new: UInt16, old: UInt16) -> Bool {
    (new &- event &- 1) < (new &- old)
}
