/// `struct virtio_balloon_config` (virtio 1.2 §5.5.4), all fields little-endian.
public enum BalloonConfigLayout {
    /// le32, device-written: target balloon size in 4 KiB pages.
    public static let numPages = 0
    /// le32, driver-written: pages currently in the balloon. Always one aligned 32-bit store.
    public static let actual = 4
    /// le32, device-written: free page hint command id (STOP, DONE or a round id).
    public static let freePageHintCmdID = 8
    /// le32, driver-written before DRIVER_OK when PAGE_POISON is negotiated.
    public static let poisonVal = 12
}

/// The value of `free_page_hint_cmd_id` (virtio 1.2 §5.5.6.4).
public enum FreePageHintCommand: Hashable, Sendable, CustomStringConvertible {
    /// 0: stop hinting (QEMU also reads 0 while in START; see docs/virtio-balloon.md §6.2).
    case stop
    /// 1: the device no longer needs the hinted pages; release them.
    case done
    /// ≥ 2: a new hinting round with this id.
    case round(UInt32)

    public static let stopID: UInt32 = 0
    public static let doneID: UInt32 = 1

    public init(rawValue: UInt32) {
        switch rawValue {
        case Self.stopID: self = .stop
        case Self.doneID: self = .done
        default: self = .round(rawValue)
        }
    }

    public var rawValue: UInt32 {
        switch self {
        case .stop: return Self.stopID
        case .done: return Self.doneID
        case .round(let id): return id
        }
    }

    public var description: String {
        switch self {
        case .stop: return "STOP"
        case .done: return "DONE"
        case .round(let id): return "round 0x" + String(id, radix: 16)
        }
    }
}
