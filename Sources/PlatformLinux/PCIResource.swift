/// One line of a PCI function's sysfs `resource` file: `start end flags`, each as
/// `0x%016llx` (Linux `drivers/pci/pci-sysfs.c: resource_show`). Lines 0–5 are the BARs,
/// line 6 the expansion ROM, further lines bridge windows.
public struct PCIResource: Hashable, Sendable, CustomStringConvertible {
    public var start: UInt64
    public var end: UInt64
    /// `IORESOURCE_*` flags (`include/linux/ioport.h`).
    public var flags: UInt64

    public init(start: UInt64, end: UInt64, flags: UInt64) {
        self.start = start
        self.end = end
        self.flags = flags
    }

    // include/linux/ioport.h
    public static let ioresourceIO: UInt64 = 0x0000_0100
    public static let ioresourceMem: UInt64 = 0x0000_0200
    public static let ioresourcePrefetch: UInt64 = 0x0000_2000
    public static let ioresourceSizeAlign: UInt64 = 0x0004_0000
    public static let ioresourceMem64: UInt64 = 0x0010_0000
    public static let ioresourceDisabled: UInt64 = 0x1000_0000
    public static let ioresourceUnset: UInt64 = 0x2000_0000

    /// Whether the resource exists (the kernel prints all zeroes for an absent BAR; the
    /// smallest real BAR is 4 bytes, so `end > start` is the test libpci uses too).
    public var isPresent: Bool { end > start }
    /// Length in bytes, 0 when absent.
    public var size: UInt64 { isPresent ? end - start + 1 : 0 }
    /// An I/O-port BAR (cannot be mmap'd on x86).
    public var isIO: Bool { flags & Self.ioresourceIO != 0 }
    /// A memory BAR.
    public var isMemory: Bool { flags & Self.ioresourceMem != 0 }
    public var is64Bit: Bool { flags & Self.ioresourceMem64 != 0 }
    public var isPrefetchable: Bool { flags & Self.ioresourcePrefetch != 0 }

    public var description: String {
        guard isPresent else { return "absent" }
        let kind = isIO ? "I/O" : isMemory ? (is64Bit ? "64-bit " : "32-bit ") + (isPrefetchable ? "prefetchable memory" : "memory") : "other"
        return "\(kind) at \(hex(start)), \(size) bytes (flags \(hex(flags)))"
    }
}

/// Parses a sysfs `resource` file: one `start end flags` line per resource, hex with "0x".
/// Root-independent and pure: the text is all it needs.
///
/// - Parameter path: only for the error message.
public func parseSysfsResourceFile(_ text: String, path: String = "resource") throws(PlatformError) -> [PCIResource] {
    var result: [PCIResource] = []
    for (n, line) in text.split(separator: "\n", omittingEmptySubsequences: true).enumerated() {
        let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
        guard fields.count == 3 else {
            throw .malformedFile(path: path, reason: .resourceFieldCount(line: n + 1, fields: fields.count, text: String(line)))
        }
        var values: [UInt64] = []
        for f in fields {
            guard let v = parseNumber(String(f), hex: true) else {
                throw .malformedFile(path: path, reason: .notHex(line: n + 1, field: String(f)))
            }
            values.append(v)
        }
        guard values[1] >= values[0] || (values[0] == 0 && values[1] == 0) else {
            throw .malformedFile(path: path, reason: .endBelowStart(line: n + 1, start: values[0], end: values[1]))
        }
        result.append(PCIResource(start: values[0], end: values[1], flags: values[2]))
    }
    return result
}

/// Reads and parses `/sys/bus/pci/devices/<BDF>/resource`.
public func readPCIResources(_ address: PCIAddress, root: SysRoot = .host) throws(PlatformError) -> [PCIResource] {
    let path = address.sysfsDirectory(in: root) + "/resource"
    let text: String
    do { text = try Sys.readTextFile(path) } catch {
        if error.errno == .noSuchFileOrDirectory { throw .deviceNotFound(bdf: address.bdf) }
        throw .system(error)
    }
    return try parseSysfsResourceFile(text, path: path)
}
