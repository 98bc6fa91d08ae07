/// A 64-bit virtio feature set (virtio 1.2 §2.2 Feature Bits).
///
/// Device-type bits 0–23 belong to the balloon (§5.5.3); 24–40 are transport bits (§6).
public struct FeatureBits: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(bit: Int) { self.rawValue = 1 << UInt64(bit) }
    /// Builds a set from the two 32-bit halves the common config exposes.
    public init(low: UInt32, high: UInt32) { self.rawValue = UInt64(low) | UInt64(high) << 32 }
    public var low: UInt32 { UInt32(truncatingIfNeeded: rawValue) }
    public var high: UInt32 { UInt32(truncatingIfNeeded: rawValue >> 32) }

    // MARK: virtio-balloon (§5.5.3)
    /// Host must be told before pages are used after a deflate. QEMU never offers it.
    public static let mustTellHost = FeatureBits(bit: 0)
    /// A statistics virtqueue (index 2) exists.
    public static let statsVQ = FeatureBits(bit: 1)
    /// The driver may deflate under memory pressure.
    public static let deflateOnOOM = FeatureBits(bit: 2)
    /// Free page hinting (queue 3, `free_page_hint_cmd_id`).
    public static let freePageHint = FeatureBits(bit: 3)
    /// The driver tells the device what freed pages contain (`poison_val`).
    public static let pagePoison = FeatureBits(bit: 4)
    /// Free page reporting (the reporting virtqueue).
    public static let reporting = FeatureBits(bit: 5)

    // MARK: transport (§6)
    public static let notifyOnEmpty = FeatureBits(bit: 24)
    public static let anyLayout = FeatureBits(bit: 27)
    public static let indirectDesc = FeatureBits(bit: 28)
    public static let eventIdx = FeatureBits(bit: 29)
    /// Modern (non-legacy) device semantics. balloond requires it.
    public static let version1 = FeatureBits(bit: 32)
    /// The device sits behind an IOMMU. Never accepted: balloon descriptors carry
    /// guest-physical addresses.
    public static let accessPlatform = FeatureBits(bit: 33)
    public static let ringPacked = FeatureBits(bit: 34)
    public static let inOrder = FeatureBits(bit: 35)
    public static let orderPlatform = FeatureBits(bit: 36)
    public static let srIOV = FeatureBits(bit: 37)
    public static let notificationData = FeatureBits(bit: 38)
    public static let notifConfigData = FeatureBits(bit: 39)
    public static let ringReset = FeatureBits(bit: 40)

    /// Every balloon device bit defined by virtio 1.2 (bits 0–5). Bits ≥ 6 are unstandardised
    /// and collide between proposals (docs/virtio-balloon.md §1.5).
    public static let allBalloonBits: FeatureBits = [.mustTellHost, .statsVQ, .deflateOnOOM, .freePageHint, .pagePoison, .reporting]

    static let names: [(FeatureBits, String)] = [
        (.mustTellHost, "MUST_TELL_HOST"), (.statsVQ, "STATS_VQ"), (.deflateOnOOM, "DEFLATE_ON_OOM"),
        (.freePageHint, "FREE_PAGE_HINT"), (.pagePoison, "PAGE_POISON"), (.reporting, "REPORTING"),
        (.notifyOnEmpty, "NOTIFY_ON_EMPTY"), (.anyLayout, "ANY_LAYOUT"), (.indirectDesc, "INDIRECT_DESC"),
        (.eventIdx, "EVENT_IDX"), (.version1, "VERSION_1"), (.accessPlatform, "ACCESS_PLATFORM"),
        (.ringPacked, "RING_PACKED"), (.inOrder, "IN_ORDER"), (.orderPlatform, "ORDER_PLATFORM"),
        (.srIOV, "SR_IOV"), (.notificationData, "NOTIFICATION_DATA"), (.notifConfigData, "NOTIF_CONFIG_DATA"),
        (.ringReset, "RING_RESET"),
    ]

    /// Names of the set bits, e.g. `STATS_VQ|VERSION_1|bit(45)`.
    public var names: [String] {
        var out: [String] = []
        var rest = self
        for (bit, name) in Self.names where contains(bit) {
            out.append(name)
            rest.remove(bit)
        }
        for i in 0..<64 where rest.rawValue & (1 << UInt64(i)) != 0 { out.append("bit(\(i))") }
        return out
    }

    public var description: String {
        "0x" + String(rawValue, radix: 16) + (isEmpty ? "" : " (" + names.joined(separator: "|") + ")")
    }
}
