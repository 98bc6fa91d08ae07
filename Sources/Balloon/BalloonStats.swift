import VirtioCore

// BalloonStatTag (the tag numbers and QEMU names) lives in VirtioCore/BalloonStatTag.swift.

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

/// Computes the sixteen stats the way Linux 6.12's `update_balloon_stats` does, from the text
/// of `/proc/vmstat` and `/proc/meminfo`. Always returns all sixteen tags, in Linux 6.12's
/// order (0,1,2,3,10,11,12,13,14,15,8,9,4,5,6,7), so the buffer has the same shape every
/// time. A device that knows only the ten virtio 1.2 tags (QEMU < 9.2) ignores the rest.
///
/// Linux 6.12, drivers/virtio/virtio_balloon.c, `update_balloon_vm_stats` and
/// `update_balloon_stats` (v6.12):
///
///     update_stat(vb, idx++, VIRTIO_BALLOON_S_SWAP_IN,  pages_to_bytes(events[PSWPIN]));
///     update_stat(vb, idx++, VIRTIO_BALLOON_S_SWAP_OUT, pages_to_bytes(events[PSWPOUT]));
///     update_stat(vb, idx++, VIRTIO_BALLOON_S_MAJFLT, events[PGMAJFAULT]);
///     update_stat(vb, idx++, VIRTIO_BALLOON_S_MINFLT, events[PGFAULT]);
///     update_stat(vb, idx++, VIRTIO_BALLOON_S_OOM_KILL, events[OOM_KILL]);
///     for (zid = 0; zid < MAX_NR_ZONES; zid++)
///             stall += events[ALLOCSTALL_NORMAL - ZONE_NORMAL + zid];
///     update_stat(vb, idx++, VIRTIO_BALLOON_S_ALLOC_STALL, stall);
///     update_stat(vb, idx++, VIRTIO_BALLOON_S_ASYNC_SCAN,  pages_to_bytes(events[PGSCAN_KSWAPD]));
///     update_stat(vb, idx++, VIRTIO_BALLOON_S_DIRECT_SCAN, pages_to_bytes(events[PGSCAN_DIRECT]));
///     update_stat(vb, idx++, VIRTIO_BALLOON_S_ASYNC_RECLAIM,  pages_to_bytes(events[PGSTEAL_KSWAPD]));
///     update_stat(vb, idx++, VIRTIO_BALLOON_S_DIRECT_RECLAIM, pages_to_bytes(events[PGSTEAL_DIRECT]));
///     update_stat(vb, idx++, VIRTIO_BALLOON_S_HTLB_PGALLOC, events[HTLB_BUDDY_PGALLOC]);
///     update_stat(vb, idx++, VIRTIO_BALLOON_S_HTLB_PGFAIL,  events[HTLB_BUDDY_PGALLOC_FAIL]);
///     ... then MEMFREE, MEMTOT, AVAIL, CACHES from si_meminfo / si_mem_available / NR_FILE_PAGES.
///
/// In /proc/vmstat (mm/vmstat.c `vmstat_text`) those events are `pswpin`, `pswpout`,
/// `pgmajfault`, `pgfault`, `oom_kill`, `allocstall_<zone>` for each configured zone (dma,
/// dma32, normal, movable, ... : the sum over all of them is the loop above),
/// `pgscan_kswapd`, `pgscan_direct`, `pgsteal_kswapd`, `pgsteal_direct`,
/// `htlb_buddy_alloc_success` and `htlb_buddy_alloc_fail`. Scans and reclaims are pages:
/// sent as bytes; OOM kills and stalls are counts. A counter missing from the file (an
/// older kernel) reads 0, as a zero-initialised event would.
///
/// - Parameter pageSize: the guest page size (swap, scan and reclaim counters are in pages).
public func computeBalloonStats(vmstat: String, meminfo: String, pageSize: UInt64 = 4096) -> [BalloonStat] {
    let vm = parseKeyValues(vmstat, separator: " ")
    let mem = parseKeyValues(meminfo, separator: ":")
    func kib(_ key: String) -> UInt64 { (mem[key] ?? 0) &* 1024 }
    func pages(_ key: String) -> UInt64 { (vm[key] ?? 0) &* pageSize }
    // Every zone's allocstall_<zone> (kernels before 4.10 had one "allocstall" line). Counters
    // wrap like the kernel's unsigned long sum.
    let stalls = vm.reduce(UInt64(0)) { sum, entry in
        entry.key == "allocstall" || entry.key.hasPrefix("allocstall_") ? sum &+ entry.value : sum
    }
    return [
        BalloonStat(.swapIn, pages("pswpin")),
        BalloonStat(.swapOut, pages("pswpout")),
        BalloonStat(.majorFaults, vm["pgmajfault"] ?? 0),
        BalloonStat(.minorFaults, vm["pgfault"] ?? 0),
        BalloonStat(.oomKills, vm["oom_kill"] ?? 0),
        BalloonStat(.allocationStalls, stalls),
        BalloonStat(.asyncScans, pages("pgscan_kswapd")),
        BalloonStat(.directScans, pages("pgscan_direct")),
        BalloonStat(.asyncReclaims, pages("pgsteal_kswapd")),
        BalloonStat(.directReclaims, pages("pgsteal_direct")),
        BalloonStat(.hugetlbAllocations, vm["htlb_buddy_alloc_success"] ?? 0),
        BalloonStat(.hugetlbFailures, vm["htlb_buddy_alloc_fail"] ?? 0),
        BalloonStat(.memFree, kib("MemFree")),
        BalloonStat(.memTotal, kib("MemTotal")),
        BalloonStat(.available, kib("MemAvailable")),
        // NR_FILE_PAGES: vmstat nr_file_pages when present, else Buffers+Cached+SwapCached.
        BalloonStat(.caches, vm["nr_file_pages"].map { $0 &* pageSize } ?? (kib("Buffers") &+ kib("Cached") &+ kib("SwapCached"))),
    ]
}

/// Parses `key<sep> value [unit]` lines into a dictionary of the first number on each line.
func parseKeyValues(_ text: String, separator: Character) -> [String: UInt64] {
    var out: [String: UInt64] = [:]
    let bytes = Array(text.utf8)
    scanKeyValues(bytes[...], separator: separator.asciiValue ?? UInt8(ascii: " ")) { key, value in
        if let value, let k = String(validating: key, as: UTF8.self) { out[k] = value }
        return true
    }
    return out
}

/// The one tokenizer for the kernel's `key<sep> value [unit]` files (/proc/meminfo with ":",
/// /proc/vmstat with " "), on bytes: for each line, `body` gets the key (surrounding blanks
/// trimmed) and the first number after the separator (nil when the line has none, or one too
/// large for UInt64); returning false stops the scan. Lines without the separator are skipped.
func scanKeyValues(_ text: ArraySlice<UInt8>, separator: UInt8, _ body: (ArraySlice<UInt8>, UInt64?) -> Bool) {
    let space = UInt8(ascii: " "), tab = UInt8(ascii: "\t"), newline = UInt8(ascii: "\n")
    var i = text.startIndex
    while i < text.endIndex {
        let lineEnd = text[i...].firstIndex(of: newline) ?? text.endIndex
        defer { i = lineEnd < text.endIndex ? lineEnd + 1 : lineEnd }
        guard let sep = text[i..<lineEnd].firstIndex(of: separator) else { continue }
        var keyStart = i, keyEnd = sep
        while keyStart < keyEnd, text[keyStart] == space || text[keyStart] == tab { keyStart += 1 }
        while keyEnd > keyStart, text[keyEnd - 1] == space || text[keyEnd - 1] == tab { keyEnd -= 1 }
        var j = sep + 1
        while j < lineEnd, text[j] == space || text[j] == tab { j += 1 }
        var value: UInt64? = nil
        var digits = 0
        var overflow = false
        while j < lineEnd, text[j] >= UInt8(ascii: "0"), text[j] <= UInt8(ascii: "9") {
            let (times10, o1) = (value ?? 0).multipliedReportingOverflow(by: 10)
            let (sum, o2) = times10.addingReportingOverflow(UInt64(text[j] - UInt8(ascii: "0")))
            overflow = overflow || o1 || o2
            value = sum
            digits += 1
            j += 1
        }
        // A number must end at a blank or the line's end ("12kB" or "1.5" is not one).
        if digits == 0 || overflow || (j < lineEnd && text[j] != space && text[j] != tab) { value = nil }
        if !body(text[keyStart..<keyEnd], value) { return }
    }
}

/// Where the driver gets stats from (real: /proc; tests: fixed values).
public protocol BalloonStatsSource: AnyObject {
    func collect() -> [BalloonStat]
}

/// Stats from the running kernel's `/proc/vmstat` and `/proc/meminfo`.
public final class ProcStatsSource: BalloonStatsSource {
    let readFile: (String) -> String?
    let pageSize: UInt64

    /// - Parameter readFile: returns a file's text, or nil when it cannot be read.
    public init(pageSize: UInt64 = 4096, readFile: @escaping (String) -> String?) {
        self.readFile = readFile
        self.pageSize = pageSize
    }

    public func collect() -> [BalloonStat] {
        computeBalloonStats(vmstat: readFile("/proc/vmstat") ?? "", meminfo: readFile("/proc/meminfo") ?? "", pageSize: pageSize)
    }
}

// MARK: the stats queue

extension BalloonDriver {
    /// Posts the one stats buffer, filled with fresh values, and kicks.
    func postStats() throws(BalloonError) {
        guard let q = queues[.stats], !statsOutstanding else { return }
        let stats = statsSource?.collect() ?? BalloonStatTag.allCases.map { BalloonStat($0, UInt64.max) }
        let bytes = encodeBalloonStats(stats)
        if statsBuffer == nil || statsBuffer!.size < bytes.count {
            do { statsBuffer = try allocator.allocate(byteCount: max(bytes.count, 160), alignment: 16) } catch { throw .dma(error) }
        }
        let buffer = statsBuffer!
        buffer.write(bytes, at: 0)
        do {
            try q.add(readable: [GuestPhysicalRange(start: buffer.physicalAddress, length: UInt64(bytes.count))], token: .stats)
        } catch { throw .queue(role: .stats, error) }
        statsOutstanding = true
        counters.statsBuffersSent += 1
        try kick(.stats)
    }
}
