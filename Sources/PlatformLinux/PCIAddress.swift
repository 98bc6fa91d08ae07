/// A PCI function's address: domain, bus, device (slot) and function, as sysfs names it
/// (`0000:00:03.0`, `/sys/bus/pci/devices/0000:00:03.0`).
public struct PCIAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var domain: UInt32
    public var bus: UInt8
    public var device: UInt8
    public var function: UInt8

    public init(domain: UInt32 = 0, bus: UInt8, device: UInt8, function: UInt8) {
        precondition(device < 32 && function < 8, "PCI device is 0...31 and function 0...7")
        self.domain = domain
        self.bus = bus
        self.device = device
        self.function = function
    }

    /// Parses `DDDD:BB:DD.F` (sysfs, lspci -D) or `BB:DD.F` (lspci; domain 0). Hex digits,
    /// either case. Returns nil for anything else.
    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        let domainText: Substring, busText: Substring, slotText: Substring
        switch parts.count {
        case 3: (domainText, busText, slotText) = (parts[0], parts[1], parts[2])
        case 2: (domainText, busText, slotText) = ("0", parts[0], parts[1])
        default: return nil
        }
        let df = slotText.split(separator: ".", omittingEmptySubsequences: false)
        guard df.count == 2,
              !domainText.isEmpty, domainText.count <= 8, let d = UInt32(domainText, radix: 16),
              !busText.isEmpty, busText.count <= 2, let b = UInt8(busText, radix: 16),
              !df[0].isEmpty, df[0].count <= 2, let s = UInt8(df[0], radix: 16), s < 32,
              df[1].count == 1, let f = UInt8(df[1], radix: 16), f < 8
        else { return nil }
        self.init(domain: d, bus: b, device: s, function: f)
    }

    /// `0000:00:03.0`: the sysfs directory name.
    public var description: String {
        func pad(_ v: UInt64, _ n: Int) -> String {
            let s = String(v, radix: 16)
            return String(repeating: "0", count: max(0, n - s.count)) + s
        }
        return "\(pad(UInt64(domain), 4)):\(pad(UInt64(bus), 2)):\(pad(UInt64(device), 2)).\(function)"
    }

    /// The sysfs directory name (same as `description`).
    public var bdf: String { description }

    public static func < (a: Self, b: Self) -> Bool {
        (a.domain, a.bus, a.device, a.function) < (b.domain, b.bus, b.device, b.function)
    }

    /// `/sys/bus/pci/devices/<BDF>` under `root`.
    public func sysfsDirectory(in root: SysRoot) -> String {
        root.path("/sys/bus/pci/devices/\(bdf)")
    }
}
