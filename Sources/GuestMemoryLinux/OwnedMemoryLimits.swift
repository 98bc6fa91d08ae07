import PlatformLinux

/// How much free memory an owned source (hugetlb, anonymous) may take, and when it must stop
/// (docs/virtio-balloon.md §9 "Memory pressure"). Owning most free memory starves the guest for
/// the length of a round, so every step re-reads the guest's state and takes at most what
/// `allowance` says.
public struct OwnedMemoryLimits: Hashable, Sendable {
    /// Free memory always left to the guest, at least this many bytes…
    public var marginBytes: UInt64
    /// …and at least this share of MemTotal.
    public var marginFractionOfTotal: Double
    /// Most bytes a source holds at once (nil: no cap besides the margin).
    public var maxHeldBytes: UInt64?
    /// Stop taking memory when PSI memory `some avg10` (percent) reaches this.
    public var maxPressureSomeAvg10: Double
    /// Stop taking memory when tasks stalled on memory for this long in total (PSI `some
    /// total`, microseconds) since the round began: reacts within one step, where avg10 lags.
    public var maxStallMicrosecondsPerRound: UInt64

    public init(marginBytes: UInt64 = 64 << 20, marginFractionOfTotal: Double = 0.02, maxHeldBytes: UInt64? = nil,
                maxPressureSomeAvg10: Double = 5.0, maxStallMicrosecondsPerRound: UInt64 = 100_000) {
        self.marginBytes = marginBytes
        self.marginFractionOfTotal = marginFractionOfTotal
        self.maxHeldBytes = maxHeldBytes
        self.maxPressureSomeAvg10 = maxPressureSomeAvg10
        self.maxStallMicrosecondsPerRound = maxStallMicrosecondsPerRound
    }

    /// The margin for a guest with `memTotal` bytes of RAM.
    public func margin(memTotal: UInt64) -> UInt64 {
        max(marginBytes, UInt64(Double(memTotal) * max(0, marginFractionOfTotal)))
    }
}

/// What the guest's memory looks like now: the inputs to `memoryAllowance`.
public struct MemorySnapshot: Hashable, Sendable {
    public var memTotal: UInt64
    public var memFree: UInt64
    public var memAvailable: UInt64
    /// nil when /proc/buddyinfo was not read (the anonymous source does not need it).
    public var buddy: BuddyInfo?
    /// nil when PSI is off (CONFIG_PSI=n or `psi=0`).
    public var pressure: MemoryPressure?

    public init(memTotal: UInt64, memFree: UInt64, memAvailable: UInt64, buddy: BuddyInfo? = nil, pressure: MemoryPressure? = nil) {
        self.memTotal = memTotal
        self.memFree = memFree
        self.memAvailable = memAvailable
        self.buddy = buddy
        self.pressure = pressure
    }

    /// Reads /proc/meminfo, /proc/pressure/memory and (when `withBuddyInfo`) /proc/buddyinfo.
    public static func read(root: SysRoot = .host, withBuddyInfo: Bool) throws(GuestMemoryError) -> MemorySnapshot {
        let info: MemInfo
        do { info = try MemInfo.read(root: root) } catch { throw .platform(error) }
        guard let total = info.memTotal, let free = info.memFree, let available = info.memAvailable else {
            throw .malformedFile(path: root.path("/proc/meminfo"), reason: "no MemTotal, MemFree or MemAvailable line")
        }
        var buddy: BuddyInfo?
        if withBuddyInfo {
            let path = root.path("/proc/buddyinfo")
            let text: String
            do { text = try Sys.readTextFile(path) } catch { throw .cannotRead(path: path, error) }
            buddy = try BuddyInfo(parsing: text)
        }
        var pressure: MemoryPressure?
        if let text = try? Sys.readTextFile(root.path("/proc/pressure/memory")) {
            pressure = try MemoryPressure(parsing: text)
        }
        return MemorySnapshot(memTotal: total, memFree: free, memAvailable: available, buddy: buddy, pressure: pressure)
    }
}

/// How many more bytes a source may take now, and what limits it (for the log line that
/// says why a source stopped).
public struct MemoryAllowance: Hashable, Sendable, CustomStringConvertible {
    public var bytes: UInt64
    public var limitedBy: String
    public init(bytes: UInt64, limitedBy: String) {
        self.bytes = bytes
        self.limitedBy = limitedBy
    }
    public var description: String { "\(bytes >> 20) MiB (limited by \(limitedBy))" }
}

/// What an allowance is measured against.
public enum MemoryAllowanceBasis: Hashable, Sendable {
    /// Hint sources: MemFree and MemAvailable (no reclaim of page cache, like the in-kernel
    /// driver's `__GFP_NORETRY` allocations), and with buddy info (hugetlb growth) the free
    /// bytes in ≥2 MiB blocks outside ZONE_DMA, so growing the pool needs no compaction.
    case freeMemory
    /// The balloon: MemAvailable only. Like the in-kernel driver, inflating may make the
    /// kernel reclaim page cache (and compact, for a 2 MiB page); MemAvailable says how much
    /// it can give without swapping.
    case availableMemory

    /// Where the stall time is counted from, for the log line.
    var stallSince: String {
        switch self {
        case .freeMemory: return "since the round began"
        case .availableMemory: return "while the balloon was taking memory"
        }
    }
}

/// How much more memory balloond may take now (pure): the least of
/// - what `basis` says the guest can give, each figure less the margin;
/// - `maxHeldBytes − heldBytes` (everything held by the sources sharing the cap);
///
/// and zero when PSI says tasks are stalling on memory (`some avg10`, or stall time since
/// `pressureAtStart`: the round's start, or the start of this `take`). Memory already held
/// is not counted again: it has left MemFree/MemAvailable. The one allowance rule for the
/// hint sources and the balloon backends.
public func memoryAllowance(_ basis: MemoryAllowanceBasis, limits: OwnedMemoryLimits, now: MemorySnapshot,
                            pressureAtStart: MemoryPressure?, heldBytes: UInt64) -> MemoryAllowance {
    let margin = limits.margin(memTotal: now.memTotal)
    if let p = now.pressure {
        if p.some.avg10 >= limits.maxPressureSomeAvg10 {
            return MemoryAllowance(bytes: 0, limitedBy: "memory pressure: PSI some avg10=\(p.some.avg10)% ≥ \(limits.maxPressureSomeAvg10)%")
        }
        if let start = pressureAtStart, p.some.totalMicroseconds >= start.some.totalMicroseconds {
            let stalled = p.some.totalMicroseconds - start.some.totalMicroseconds
            if stalled >= limits.maxStallMicrosecondsPerRound {
                return MemoryAllowance(bytes: 0, limitedBy: "memory pressure: tasks stalled \(stalled / 1000) ms on memory \(basis.stallSince) (limit \(limits.maxStallMicrosecondsPerRound / 1000) ms)")
            }
        }
    }
    func minus(_ a: UInt64, _ b: UInt64) -> UInt64 { a > b ? a - b : 0 }
    let available = MemoryAllowance(bytes: minus(now.memAvailable, margin), limitedBy: "MemAvailable \(now.memAvailable >> 20) MiB − margin \(margin >> 20) MiB")
    var best = available
    func consider(_ bytes: UInt64, _ why: @autoclosure () -> String) {
        if bytes < best.bytes { best = MemoryAllowance(bytes: bytes, limitedBy: why()) }
    }
    if basis == .freeMemory {
        best = MemoryAllowance(bytes: minus(now.memFree, margin), limitedBy: "MemFree \(now.memFree >> 20) MiB − margin \(margin >> 20) MiB")
        consider(available.bytes, available.limitedBy)
        if let buddy = now.buddy {
            let big = buddy.freeBytes(inBlocksOfAtLeast: 2 << 20)
            consider(minus(big, margin), "free ≥2 MiB blocks \(big >> 20) MiB − margin \(margin >> 20) MiB")
        }
    }
    if let cap = limits.maxHeldBytes {
        consider(minus(cap, heldBytes), "the cap of \(cap >> 20) MiB held")
    }
    return best
}
