import VirtioCore

/// How many I/O vectors QEMU needs to map a buffer the driver posts (`virtqueue_map_desc`),
/// so that no element needs more than QEMU maps for one: 1024 (`VIRTQUEUE_MAX_SIZE`); more
/// is a device error (NEEDS_RESET, "too many write descriptors").
///
/// QEMU maps a descriptor in pieces that are contiguous in its own memory. Guest-physical
/// addresses (uio) are one piece per descriptor: guest RAM is contiguous in QEMU's address
/// space. With ACCESS_PLATFORM every address goes through the vIOMMU one IOTLB entry at a
/// time, and consecutive IOVAs are one piece only where the guest-physical pages behind them
/// are consecutive too: memory without transparent hugepages (or a fragmented guest) behind
/// an IOMMU that maps 4 KiB pages costs one vector per page, so that is what is counted. A
/// chain of 256 hint ranges of 1 MiB could then need 65,536. (Reports need no budget: each
/// reported block is one huge page, contiguous behind the IOMMU too: one vector.)
struct ElementVectorBudget: Equatable {
    /// QEMU's `VIRTQUEUE_MAX_SIZE`.
    static let maxPerElement = 1024
    /// The IOMMU's smallest page when the device translates addresses; nil for guest-physical.
    let iommuPageBytes: UInt64?

    /// The vectors QEMU may need for one descriptor covering `range`.
    func vectors(_ range: GuestPhysicalRange) -> Int {
        guard let page = iommuPageBytes, page > 0 else { return 1 }
        return Int((range.start.value % page + range.length + page - 1) / page)
    }

    func vectors<C: Collection>(_ ranges: C) -> Int where C.Element == GuestPhysicalRange {
        ranges.reduce(0) { $0 + vectors($1) }
    }

    /// How many of `ranges`, from the front, fit in one element of at most `maxRanges`
    /// descriptors; at least one (a single range must fit: see `longestRange`).
    func prefixFitting(_ ranges: [GuestPhysicalRange], maxRanges: Int) -> Int {
        var n = 0
        var used = 0
        for r in ranges.prefix(max(1, maxRanges)) {
            let v = vectors(r)
            if n > 0 && used + v > Self.maxPerElement { break }
            used += v
            n += 1
        }
        return n
    }

    /// `bytes`, or less where one descriptor that long could need more vectors than an element
    /// may have: a power of two, so sources that split at aligned sizes keep doing so (ranges
    /// start on a balloon page; one more page where an IOMMU page is larger than that).
    func longestRange(_ bytes: UInt64) -> UInt64 {
        guard let page = iommuPageBytes, page > 0, page <= 1 << 40 else { return max(balloonPageSize, bytes) }
        let pages = UInt64(page <= balloonPageSize && balloonPageSize % page == 0 ? Self.maxPerElement : Self.maxPerElement - 1)
        let limit = pages * page
        return max(balloonPageSize, min(bytes, UInt64(1) << (63 - limit.leadingZeroBitCount)))
    }
}
