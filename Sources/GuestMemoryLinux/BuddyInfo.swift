/// `/proc/buddyinfo`: free blocks per order, per zone
/// (`Node 0, zone   Normal   5018   5134 ...`, order 0 first).
public struct BuddyInfo: Hashable, Sendable {
    public struct Zone: Hashable, Sendable {
        public var node: Int
        public var name: String
        /// Free blocks of each order (index = order; a block of order k is 2^k pages).
        public var freeBlocks: [UInt64]
        public init(node: Int, name: String, freeBlocks: [UInt64]) {
            self.node = node
            self.name = name
            self.freeBlocks = freeBlocks
        }
    }

    public var zones: [Zone]
    public init(zones: [Zone]) { self.zones = zones }

    /// Parses the file's text (pure). Malformed lines are an error, so a format change is
    /// noticed rather than read as "no free memory".
    public init(parsing text: String) throws(GuestMemoryError) {
        var zones: [Zone] = []
        for (n, line) in text.split(separator: "\n", omittingEmptySubsequences: true).enumerated() {
            let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "," })
            guard words.count >= 5, words[0] == "Node", let node = Int(words[1]), words[2] == "zone" else {
                throw .malformedFile(path: "/proc/buddyinfo", reason: "line \(n + 1) is not 'Node N, zone NAME counts…': \(line)")
            }
            var counts: [UInt64] = []
            for w in words[4...] {
                guard let c = UInt64(w) else {
                    throw .malformedFile(path: "/proc/buddyinfo", reason: "line \(n + 1) has a non-numeric count '\(w)'")
                }
                counts.append(c)
            }
            zones.append(Zone(node: node, name: String(words[3]), freeBlocks: counts))
        }
        self.zones = zones
    }

    /// Free bytes held in blocks of at least `minimumBlockBytes` (a power of two ≥ 4 KiB),
    /// over the zones not in `excludingZones`. For hugetlb pool growth: 2 MiB, excluding
    /// "DMA" (hugetlb allocations never come from ZONE_DMA).
    public func freeBytes(inBlocksOfAtLeast minimumBlockBytes: UInt64, excludingZones: Set<String> = ["DMA"]) -> UInt64 {
        var minOrder = 0
        while (UInt64(4096) << UInt64(minOrder)) < minimumBlockBytes { minOrder += 1 }
        var total: UInt64 = 0
        for z in zones where !excludingZones.contains(z.name) {
            for (order, count) in z.freeBlocks.enumerated() where order >= minOrder {
                total += count * (UInt64(4096) << UInt64(order))
            }
        }
        return total
    }
}
