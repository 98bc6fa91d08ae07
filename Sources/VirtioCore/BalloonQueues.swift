/// The balloon's virtqueues, by role.
public enum BalloonQueueRole: String, Sendable, CaseIterable, CustomStringConvertible {
    case inflate, deflate, stats, freePageHint = "free-page-hint", reporting
    public var description: String { rawValue }

    /// Queue size QEMU 7.2 creates for this role; used to confirm the numbering.
    public var qemuSize: UInt16 {
        switch self {
        case .inflate, .deflate, .stats: return 128
        case .freePageHint: return 1024
        case .reporting: return 32
        }
    }
}

/// Virtqueue indices for a balloon device, following QEMU's numbering (docs/virtio-balloon.md §3.2).
///
/// QEMU creates queues from its *properties* (the offered features), not from what the driver
/// negotiates: inflate 0, deflate 1, stats 2 (always), free-page-hint 3 if offered, reporting
/// next (3 or 4) if offered. A queue the driver does not accept is simply left disabled.
public struct BalloonQueueIndices: Hashable, Sendable {
    public let inflate: UInt16 = 0
    public let deflate: UInt16 = 1
    public let stats: UInt16 = 2
    public let freePageHint: UInt16?
    public let reporting: UInt16?

    public init(offered: FeatureBits) {
        var next: UInt16 = 3
        if offered.contains(.freePageHint) {
            freePageHint = next
            next += 1
        } else {
            freePageHint = nil
        }
        reporting = offered.contains(.reporting) ? next : nil
    }

    public func index(of role: BalloonQueueRole) -> UInt16? {
        switch role {
        case .inflate: return inflate
        case .deflate: return deflate
        case .stats: return stats
        case .freePageHint: return freePageHint
        case .reporting: return reporting
        }
    }

    /// The number of queues the device exposes (`num_queues`).
    public var count: UInt16 { (reporting ?? freePageHint ?? stats) + 1 }
}
