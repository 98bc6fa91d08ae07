/// Statistics tags (virtio 1.2 §5.5.6.3; Linux 6.1 uapi `VIRTIO_BALLOON_S_*`).
public enum BalloonStatTag: UInt16, CaseIterable, Sendable {
    case swapIn = 0, swapOut = 1, majorFaults = 2, minorFaults = 3, memFree = 4, memTotal = 5
    case available = 6, caches = 7, hugetlbAllocations = 8, hugetlbFailures = 9

    /// QEMU's QOM key (`qom-get guest-stats`).
    public var qemuName: String {
        switch self {
        case .swapIn: return "stat-swap-in"
        case .swapOut: return "stat-swap-out"
        case .majorFaults: return "stat-major-faults"
        case .minorFaults: return "stat-minor-faults"
        case .memFree: return "stat-free-memory"
        case .memTotal: return "stat-total-memory"
        case .available: return "stat-available-memory"
        case .caches: return "stat-disk-caches"
        case .hugetlbAllocations: return "stat-htlb-pgalloc"
        case .hugetlbFailures: return "stat-htlb-pgfail"
        }
    }
}

/// One `struct virtio_balloon_stat { le16 tag; le64 val; }` (packed, 10 bytes).
public struct BalloonStat: Hashable, Sendable {
    public let tag: BalloonStatTag
    public let value: UInt64
    public init(_ tag: BalloonStatTag, _ value: UInt64) {
        self.tag = tag
        self.value = value
    }

    public static let encodedSize = 10
}

/// Encodes stats as the stats queue carries them: packed 10-byte little-endian entries.
public func encodeBalloonStats(_ stats: [BalloonStat]) -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(stats.count * BalloonStat.encodedSize)
    for s in stats {
        out.append(UInt8(s.tag.rawValue & 0xff))
        out.append(UInt8(s.tag.rawValue >> 8))
        for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: s.value >> (8 * UInt64(i)))) }
    }
    return out
}

/// Computes the ten stats the way Linux 6.1's `update_balloon_stats` does, from the text of
/// `/proc/vmstat` and `/proc/meminfo`. Always returns all ten tags, in Linux's order
/// (0,1,2,3,8,9,4,5,6,7), so the buffer has the same shape every time.
///
/// - Parameter pageSize: the guest page size (swap counters are in pages).
public func computeBalloonStats(vmstat: String, meminfo: String, pageSize: UInt64 = 4096) -> [BalloonStat] {
    let vm = parseKeyValues(vmstat, separator: " ")
    let mem = parseKeyValues(meminfo, separator: ":")
    func kib(_ key: String) -> UInt64 { (mem[key] ?? 0) * 1024 }
    return [
        BalloonStat(.swapIn, (vm["pswpin"] ?? 0) * pageSize),
        BalloonStat(.swapOut, (vm["pswpout"] ?? 0) * pageSize),
        BalloonStat(.majorFaults, vm["pgmajfault"] ?? 0),
        BalloonStat(.minorFaults, vm["pgfault"] ?? 0),
        BalloonStat(.hugetlbAllocations, vm["htlb_buddy_alloc_success"] ?? 0),
        BalloonStat(.hugetlbFailures, vm["htlb_buddy_alloc_fail"] ?? 0),
        BalloonStat(.memFree, kib("MemFree")),
        BalloonStat(.memTotal, kib("MemTotal")),
        BalloonStat(.available, kib("MemAvailable")),
        // NR_FILE_PAGES: vmstat nr_file_pages when present, else Buffers+Cached+SwapCached.
        BalloonStat(.caches, vm["nr_file_pages"].map { $0 * pageSize } ?? (kib("Buffers") + kib("Cached") + kib("SwapCached"))),
    ]
}

/// Parses `key<sep> value [unit]` lines into a dictionary of the first number on each line.
func parseKeyValues(_ text: String, separator: Character) -> [String: UInt64] {
    var out: [String: UInt64] = [:]
    for line in text.split(separator: "\n") {
        guard let sep = line.firstIndex(of: separator) else { continue }
        let key = line[..<sep].trimmingCharacters(in: " \t")
        let rest = line[line.index(after: sep)...].split(separator: " ", omittingEmptySubsequences: true)
        if let first = rest.first, let v = UInt64(first) { out[key] = v }
    }
    return out
}

extension Substring {
    func trimmingCharacters(in set: String) -> String {
        var s = self
        while let c = s.first, set.contains(c) { s.removeFirst() }
        while let c = s.last, set.contains(c) { s.removeLast() }
        return String(s)
    }
}

/// Where the driver gets stats from (real: /proc; tests: fixed values).
public protocol BalloonStatsSource: AnyObject {
    func collect() -> [BalloonStat]
}
