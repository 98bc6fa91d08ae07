import VirtioCore
import CBalloonShims

/// Exact-width register access to a window of device memory (a BAR or part of one).
public protocol MMIORegion: AnyObject {
    /// Length of the window in bytes.
    var length: Int { get }
    func read8(at offset: Int) -> UInt8
    func read16(at offset: Int) -> UInt16
    func read32(at offset: Int) -> UInt32
    func write8(_ value: UInt8, at offset: Int)
    func write16(_ value: UInt16, at offset: Int)
    func write32(_ value: UInt32, at offset: Int)
}

/// Device memory mapped into this process (BAR4 from sysfs `resource4`, uncached).
///
/// With `DMARegion`, the only code that touches device-visible memory. Every access is
/// volatile, of exactly the stated width, aligned and bounds-checked, and little-endian.
@safe public final class MMIOWindow: MMIORegion {
    // Unsafe: `base` maps `length` bytes of device memory until `unmap` runs in deinit.
    private let base: UnsafeMutableRawPointer
    public let length: Int
    private let unmap: (() -> Void)?

    /// - Parameters:
    ///   - unsafeBase: a mapping of at least `length` bytes of device memory.
    ///   - unmap: called once from deinit.
    public init(unsafeBase: UnsafeMutableRawPointer, length: Int, unmap: (() -> Void)?) {
        unsafe self.base = unsafeBase
        self.length = length
        self.unmap = unmap
    }

    deinit { unmap?() }

    @inline(__always) private func at(_ offset: Int, _ width: Int) -> UnsafeMutableRawPointer {
        precondition(offset >= 0 && offset % width == 0 && offset + width <= length, "MMIO access out of bounds or misaligned")
        return unsafe base + offset
    }

    public func read8(at offset: Int) -> UInt8 { unsafe bs_mmio_read8(at(offset, 1)) }
    public func read16(at offset: Int) -> UInt16 { UInt16(littleEndian: unsafe bs_mmio_read16(at(offset, 2))) }
    public func read32(at offset: Int) -> UInt32 { UInt32(littleEndian: unsafe bs_mmio_read32(at(offset, 4))) }
    public func write8(_ value: UInt8, at offset: Int) { unsafe bs_mmio_write8(at(offset, 1), value) }
    public func write16(_ value: UInt16, at offset: Int) { unsafe bs_mmio_write16(at(offset, 2), value.littleEndian) }
    public func write32(_ value: UInt32, at offset: Int) { unsafe bs_mmio_write32(at(offset, 4), value.littleEndian) }
}

/// A sub-window of another region (e.g. the common config inside BAR4).
public final class MMIOSubregion: MMIORegion {
    public let parent: MMIORegion
    public let base: Int
    public let length: Int

    public init(parent: MMIORegion, base: Int, length: Int) {
        precondition(base >= 0 && length >= 0 && base + length <= parent.length, "subregion outside its BAR")
        self.parent = parent
        self.base = base
        self.length = length
    }

    @inline(__always) private func check(_ offset: Int, _ width: Int) {
        precondition(offset >= 0 && offset + width <= length, "register access outside its virtio structure")
    }

    public func read8(at offset: Int) -> UInt8 { check(offset, 1); return parent.read8(at: base + offset) }
    public func read16(at offset: Int) -> UInt16 { check(offset, 2); return parent.read16(at: base + offset) }
    public func read32(at offset: Int) -> UInt32 { check(offset, 4); return parent.read32(at: base + offset) }
    public func write8(_ value: UInt8, at offset: Int) { check(offset, 1); parent.write8(value, at: base + offset) }
    public func write16(_ value: UInt16, at offset: Int) { check(offset, 2); parent.write16(value, at: base + offset) }
    public func write32(_ value: UInt32, at offset: Int) { check(offset, 4); parent.write32(value, at: base + offset) }
}
