/// The `device_status` field (virtio 1.2 §2.1 Device Status Field).
public struct DeviceStatus: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    public static let acknowledge = DeviceStatus(rawValue: 1)
    public static let driver = DeviceStatus(rawValue: 2)
    public static let driverOK = DeviceStatus(rawValue: 4)
    public static let featuresOK = DeviceStatus(rawValue: 8)
    /// The device hit an error it cannot recover from; the driver must reset it.
    public static let needsReset = DeviceStatus(rawValue: 0x40)
    public static let failed = DeviceStatus(rawValue: 0x80)

    public var description: String {
        if rawValue == 0 { return "0 (reset)" }
        let parts: [(DeviceStatus, String)] = [
            (.acknowledge, "ACKNOWLEDGE"), (.driver, "DRIVER"), (.featuresOK, "FEATURES_OK"),
            (.driverOK, "DRIVER_OK"), (.needsReset, "NEEDS_RESET"), (.failed, "FAILED"),
        ]
        var names = parts.filter { contains($0.0) }.map(\.1)
        let known = parts.reduce(UInt8(0)) { $0 | $1.0.rawValue }
        if rawValue & ~known != 0 { names.append("0x" + String(rawValue & ~known, radix: 16)) }
        return "0x" + String(rawValue, radix: 16) + " (" + names.joined(separator: "|") + ")"
    }
}
