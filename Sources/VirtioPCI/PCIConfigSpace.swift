/// Access to a PCI function's configuration space (the first 256 bytes at least).
///
/// Real conformance: sysfs `/sys/bus/pci/devices/BDF/config` (PlatformLinux). Fakes: a byte
/// array (`FakePCIConfigSpace`), and the simulator's device.
public protocol PCIConfigSpace: AnyObject {
    func read8(at offset: Int) throws(PCIError) -> UInt8
    func read16(at offset: Int) throws(PCIError) -> UInt16
    func read32(at offset: Int) throws(PCIError) -> UInt32
    func write16(_ value: UInt16, at offset: Int) throws(PCIError)
}

/// Errors from PCI config space and BAR access.
public enum PCIError: Error, Hashable, CustomStringConvertible {
    /// Reading or writing config space failed (I/O error, device gone).
    case configAccess(offset: Int, reason: String)
    /// A BAR could not be mapped or is not what a virtio device should have.
    case bar(index: Int, reason: String)

    public var description: String {
        switch self {
        case .configAccess(let o, let r): return "PCI config space access at 0x\(String(o, radix: 16)) failed: \(r)"
        case .bar(let i, let r): return "BAR\(i): \(r)"
        }
    }
}

/// Standard PCI config header offsets and bits used here.
public enum PCIConfig {
    public static let vendorID = 0x00
    public static let deviceID = 0x02
    public static let command = 0x04
    public static let status = 0x06
    public static let revision = 0x08
    public static let classCode = 0x09
    public static let subsystemVendorID = 0x2c
    public static let subsystemID = 0x2e
    public static let capabilitiesPointer = 0x34
    public static let interruptPin = 0x3d

    /// Command: memory space decode.
    public static let commandMemory: UInt16 = 1 << 1
    /// Command: bus master. QEMU clears DRIVER_OK on every Command write without it.
    public static let commandBusMaster: UInt16 = 1 << 2
    /// Command: INTx disable (uio_pci_generic sets it in its interrupt handler).
    public static let commandINTxDisable: UInt16 = 1 << 10
    /// Status: capability list present.
    public static let statusCapList: UInt16 = 1 << 4
    /// Status: INTx asserted.
    public static let statusInterrupt: UInt16 = 1 << 3

    /// Red Hat / virtio vendor.
    public static let virtioVendor: UInt16 = 0x1af4
    /// Transitional virtio-balloon.
    public static let balloonTransitionalID: UInt16 = 0x1002
    /// Modern virtio-balloon: 0x1040 + VIRTIO_ID_BALLOON (5).
    public static let balloonModernID: UInt16 = 0x1045
    /// VIRTIO_ID_BALLOON.
    public static let virtioBalloonDeviceType: UInt16 = 5
}

/// A config space backed by a byte array, for tests.
public final class FakePCIConfigSpace: PCIConfigSpace {
    public var bytes: [UInt8]
    /// Every 16-bit write, in order (offset, value).
    public private(set) var writes: [(Int, UInt16)] = []

    public init(bytes: [UInt8]) {
        self.bytes = bytes + Array(repeating: 0, count: max(0, 256 - bytes.count))
    }

    private func check(_ offset: Int, _ width: Int) throws(PCIError) {
        guard offset >= 0, offset + width <= bytes.count else {
            throw .configAccess(offset: offset, reason: "outside the \(bytes.count)-byte config space")
        }
    }

    public func read8(at offset: Int) throws(PCIError) -> UInt8 {
        try check(offset, 1)
        return bytes[offset]
    }

    public func read16(at offset: Int) throws(PCIError) -> UInt16 {
        try check(offset, 2)
        return UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8
    }

    public func read32(at offset: Int) throws(PCIError) -> UInt32 {
        try check(offset, 4)
        return (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[offset + $1]) << (8 * UInt32($1)) }
    }

    public func write16(_ value: UInt16, at offset: Int) throws(PCIError) {
        try check(offset, 2)
        bytes[offset] = UInt8(value & 0xff)
        bytes[offset + 1] = UInt8(value >> 8)
        writes.append((offset, value))
    }
}
