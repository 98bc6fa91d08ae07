import VirtioCore
import VirtioPCI

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
            throw .configAccess(offset: offset, reason: PCIAccessProblem.outsideConfigSpace(width: width, size: bytes.count))
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
