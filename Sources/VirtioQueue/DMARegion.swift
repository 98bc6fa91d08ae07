import CBalloonShims
import VirtioCore

/// A block of memory the device can reach by DMA: a virtual mapping plus the guest-physical
/// address of its first byte. The block is physically contiguous.
///
/// This type and `MMIOWindow` are the only places balloond reads or writes memory shared with
/// the device. Every access is bounds-checked against `size` and has the exact width of the
/// field it touches; multi-byte values are little-endian as virtio 1.x requires.
@safe public final class DMARegion {
    // Unsafe: `base` points at `size` bytes that stay mapped until `release` runs in deinit;
    // every accessor below checks `offset + width <= size` first.
    private let base: UnsafeMutableRawPointer
    /// Guest-physical address of byte 0.
    public let physicalAddress: PhysicalAddress
    /// Length in bytes.
    public let size: Int
    /// Keeps a parent region (and so its mapping) alive for sub-regions.
    private let owner: AnyObject?
    private let release: (() -> Void)?

    /// Wraps memory the caller has mapped, locked and translated.
    ///
    /// - Parameters:
    ///   - unsafeBase: the virtual address of the block; must stay valid until `release` is called.
    ///   - physicalAddress: where the device sees byte 0.
    ///   - size: length in bytes.
    ///   - release: unmaps or frees the block; called once, from deinit.
    public init(unsafeBase: UnsafeMutableRawPointer, physicalAddress: PhysicalAddress, size: Int, release: (() -> Void)?) {
        precondition(size > 0, "empty DMA region")
        unsafe self.base = unsafeBase
        self.physicalAddress = physicalAddress
        self.size = size
        self.owner = nil
        self.release = release
    }

    private init(parent: DMARegion, offset: Int, size: Int) {
        unsafe self.base = parent.base + offset
        self.physicalAddress = parent.physicalAddress + UInt64(offset)
        self.size = size
        self.owner = parent
        self.release = nil
    }

    deinit { release?() }

    /// A view of `length` bytes at `offset` that keeps this region alive.
    public func subregion(offset: Int, length: Int) -> DMARegion {
        precondition(offset >= 0 && length > 0 && offset + length <= size, "subregion out of bounds")
        return DMARegion(parent: self, offset: offset, size: length)
    }

    /// The guest-physical address of the byte at `offset`.
    public func physical(at offset: Int) -> PhysicalAddress {
        precondition(offset >= 0 && offset <= size)
        return physicalAddress + UInt64(offset)
    }

    /// Whether `[address, address+length)` lies entirely inside this region.
    public func contains(_ address: PhysicalAddress, length: UInt64) -> Bool {
        address.value >= physicalAddress.value && length <= UInt64(size)
            && address.value - physicalAddress.value <= UInt64(size) - length
    }

    /// The offset of a guest-physical address inside this region.
    public func offset(of address: PhysicalAddress) -> Int? {
        contains(address, length: 0) ? Int(address.value - physicalAddress.value) : nil
    }

    @inline(__always) private func pointer(_ offset: Int, _ width: Int) -> UnsafeMutableRawPointer {
        precondition(offset >= 0 && offset % width == 0 && offset + width <= size, "DMA access out of bounds or misaligned")
        return unsafe base + offset
    }

    // MARK: ring fields (single untorn accesses, little-endian)

    public func load8(at offset: Int) -> UInt8 { unsafe pointer(offset, 1).load(as: UInt8.self) }
    public func store8(_ value: UInt8, at offset: Int) { unsafe pointer(offset, 1).storeBytes(of: value, as: UInt8.self) }
    public func load16(at offset: Int) -> UInt16 { UInt16(littleEndian: unsafe bs_ring_load16(pointer(offset, 2))) }
    public func load32(at offset: Int) -> UInt32 { UInt32(littleEndian: unsafe bs_ring_load32(pointer(offset, 4))) }
    public func load64(at offset: Int) -> UInt64 { UInt64(littleEndian: unsafe bs_ring_load64(pointer(offset, 8))) }
    public func store16(_ value: UInt16, at offset: Int) { unsafe bs_ring_store16(pointer(offset, 2), value.littleEndian) }
    public func store32(_ value: UInt32, at offset: Int) { unsafe bs_ring_store32(pointer(offset, 4), value.littleEndian) }
    public func store64(_ value: UInt64, at offset: Int) { unsafe bs_ring_store64(pointer(offset, 8), value.littleEndian) }

    /// Stores a ring index with release ordering: every earlier store to shared memory becomes
    /// visible to the device before the new index does (virtio 1.2 §2.7.13.3.1).
    public func storeRelease16(_ value: UInt16, at offset: Int) { unsafe bs_ring_store16_release(pointer(offset, 2), value.littleEndian) }
    /// Loads a ring index with acquire ordering: entries it covers are read only after it.
    public func loadAcquire16(at offset: Int) -> UInt16 { UInt16(littleEndian: unsafe bs_ring_load16_acquire(pointer(offset, 2))) }

    /// Copies `bytes` into the region at `offset` (for buffers, not ring fields).
    public func write(_ bytes: [UInt8], at offset: Int) {
        precondition(offset >= 0 && offset + bytes.count <= size, "DMA write out of bounds")
        unsafe bytes.withUnsafeBytes { src in
            if let s = src.baseAddress { unsafe (base + offset).copyMemory(from: s, byteCount: src.count) }
        }
    }

    /// Copies `count` bytes out of the region.
    public func read(at offset: Int, count: Int) -> [UInt8] {
        precondition(offset >= 0 && count >= 0 && offset + count <= size, "DMA read out of bounds")
        return unsafe [UInt8](UnsafeRawBufferPointer(start: base + offset, count: count))
    }

    /// Zeroes the whole region.
    public func zero() { unsafe base.initializeMemory(as: UInt8.self, repeating: 0, count: size) }
}

/// A full barrier, for the point between publishing `avail->idx` and reading the device's
/// notification suppression fields (`used->flags` or `avail_event`): without it the CPU may
/// read them before its index store is visible and miss a needed kick.
@inline(__always) public func fullMemoryBarrier() { bs_fence_seq_cst() }

/// Why DMA memory could not be had.
public enum DMAError: Error, Hashable, CustomStringConvertible, Sendable {
    /// A bump arena has no room for the allocation: `wanted` bytes, `free` of `size` left.
    case arenaExhausted(wanted: Int, free: Int, size: Int)
    /// More bytes than the allocator can ever hand out in one physically contiguous piece.
    case tooLarge(byteCount: Int, largestAllocation: Int)
    /// The platform allocator failed; its own error (e.g. PlatformLinux's `DMAMemoryError`)
    /// says why and keeps the underlying errno.
    case platform(any ErrorReason)

    public var description: String {
        switch self {
        case .arenaExhausted(let wanted, let free, let size):
            return "DMA arena exhausted: \(wanted) bytes wanted, \(free) of \(size) left"
        case .tooLarge(let byteCount, let largest):
            return "\(byteCount) bytes of physically contiguous DMA memory wanted, but at most \(largest) bytes can be had in one piece"
        case .platform(let e):
            return e.description
        }
    }

    public static func == (a: DMAError, b: DMAError) -> Bool {
        switch (a, b) {
        case let (.arenaExhausted(w1, f1, s1), .arenaExhausted(w2, f2, s2)): return w1 == w2 && f1 == f2 && s1 == s2
        case let (.tooLarge(b1, l1), .tooLarge(b2, l2)): return b1 == b2 && l1 == l2
        case let (.platform(e1), .platform(e2)): return AnyHashable(e1) == AnyHashable(e2)
        default: return false
        }
    }

    public func hash(into hasher: inout Hasher) {
        switch self {
        case let .arenaExhausted(w, f, s): hasher.combine(0); hasher.combine(w); hasher.combine(f); hasher.combine(s)
        case let .tooLarge(b, l): hasher.combine(1); hasher.combine(b); hasher.combine(l)
        case let .platform(e): hasher.combine(2); hasher.combine(AnyHashable(e))
        }
    }
}

/// Hands out physically contiguous DMA regions.
public protocol DMAAllocator: AnyObject {
    /// Allocates `byteCount` bytes aligned to `alignment` (a power of two, ≤ 4096), physically
    /// contiguous and zeroed.
    func allocate(byteCount: Int, alignment: Int) throws(DMAError) -> DMARegion
    /// The most bytes one `allocate` can ever return (e.g. 4096 for an allocator of single
    /// pages): callers size their buffers to it instead of failing on every allocation.
    var largestAllocation: Int { get }
}

/// A bump allocator over one big contiguous region (e.g. one 2 MiB hugepage): every ring and
/// small buffer balloond needs fits in it.
public final class DMAArena: DMAAllocator {
    public let region: DMARegion
    private var next = 0

    public init(region: DMARegion) {
        self.region = region
        region.zero()
    }

    public var bytesFree: Int { region.size - next }

    public var largestAllocation: Int { region.size }

    public func allocate(byteCount: Int, alignment: Int) throws(DMAError) -> DMARegion {
        precondition(byteCount > 0 && alignment > 0 && alignment & (alignment - 1) == 0)
        let start = (next + alignment - 1) & ~(alignment - 1)
        guard start + byteCount <= region.size else {
            throw .arenaExhausted(wanted: byteCount, free: region.size - next, size: region.size)
        }
        next = start + byteCount
        let sub = region.subregion(offset: start, length: byteCount)
        sub.zero()
        return sub
    }
}
