/// A guest-physical address: what the device sees in descriptors and queue addresses.
public struct PhysicalAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var value: UInt64
    public init(_ value: UInt64) { self.value = value }
    public static func < (a: Self, b: Self) -> Bool { a.value < b.value }
    public static func + (a: Self, offset: UInt64) -> Self { Self(a.value + offset) }
    public var description: String { "0x" + String(value, radix: 16) }
    /// The balloon's 4 KiB page frame number (`VIRTIO_BALLOON_PFN_SHIFT` is 12 whatever the
    /// guest page size), or nil when it does not fit the protocol's 32 bits (≥ 16 TiB).
    public var balloonPFN: UInt32? {
        let pfn = value >> 12
        return pfn <= UInt64(UInt32.max) ? UInt32(pfn) : nil
    }
}

/// A contiguous range of guest-physical memory.
public struct GuestPhysicalRange: Hashable, Sendable, CustomStringConvertible {
    public var start: PhysicalAddress
    public var length: UInt64
    public init(start: PhysicalAddress, length: UInt64) {
        self.start = start
        self.length = length
    }
    public init(start: UInt64, length: UInt64) { self.init(start: PhysicalAddress(start), length: length) }
    public var end: UInt64 { start.value + length }
    public var description: String { "[\(start)+0x\(String(length, radix: 16))]" }
}

/// The balloon protocol's page unit: 4 KiB, whatever the guest's page size.
public let balloonPageSize: UInt64 = 4096

/// Coalesces ranges (sorted by start) that touch into fewer, larger ones, and splits any
/// longer than `maxLength` (a descriptor carries at most 4 GiB - 1; balloond uses smaller).
/// Ranges are assumed 4 KiB-aligned and disjoint.
public func coalesce(_ ranges: [GuestPhysicalRange], maxLength: UInt64) -> [GuestPhysicalRange] {
    precondition(maxLength >= balloonPageSize)
    let limit = maxLength & ~(balloonPageSize - 1)
    var merged: [GuestPhysicalRange] = []
    for r in ranges.sorted(by: { $0.start < $1.start }) where r.length > 0 {
        if var last = merged.last, last.end == r.start.value {
            last.length += r.length
            merged[merged.count - 1] = last
        } else {
            merged.append(r)
        }
    }
    var out: [GuestPhysicalRange] = []
    for r in merged {
        var start = r.start.value
        var left = r.length
        while left > 0 {
            let n = min(left, limit)
            out.append(GuestPhysicalRange(start: start, length: n))
            start += n
            left -= n
        }
    }
    return out
}
