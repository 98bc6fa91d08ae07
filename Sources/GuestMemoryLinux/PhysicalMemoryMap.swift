import PlatformLinux

/// The guest's System RAM, as page frame ranges, from the top-level `System RAM` lines of
/// `/proc/iomem` (`00100000-bfffffff : System RAM`). Scanning /proc/kpageflags only inside
/// these skips the PCI hole and other non-RAM PFNs (which read as `KPF_NOPAGE` anyway).
///
/// As non-root, /proc/iomem shows every address as 0; `read` then returns nil and callers
/// scan from PFN 0 to the end of /proc/kpageflags (its size ends at `max_pfn`).
public struct PhysicalMemoryMap: Hashable, Sendable {
    /// Half-open PFN ranges `[start, end)`, sorted, disjoint, in 4 KiB frames.
    public var ramFrames: [Range<UInt64>]

    public init(ramFrames: [Range<UInt64>]) { self.ramFrames = ramFrames }

    /// Parses /proc/iomem's text (pure). Only unindented (top-level) `System RAM` lines
    /// count; partial pages at either end are dropped. Returns nil when no usable range is
    /// listed (e.g. all addresses read 0 without CAP_SYS_ADMIN).
    public static func parse(iomem text: String) -> PhysicalMemoryMap? {
        var frames: [Range<UInt64>] = []
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            guard let first = line.first, first != " " else { continue }
            let parts = line.split(separator: ":", maxSplits: 1)
            guard parts.count == 2 else { continue }
            let name = parts[1].trimming(" ")
            guard name == "System RAM" else { continue }
            let bounds = parts[0].trimming(" ").split(separator: "-")
            guard bounds.count == 2, let lo = UInt64(bounds[0], radix: 16), let hi = UInt64(bounds[1], radix: 16), hi > lo else { continue }
            let startPFN = (lo + 4095) / 4096
            let endPFN = (hi + 1) / 4096
            if endPFN > startPFN { frames.append(startPFN..<endPFN) }
        }
        frames.sort { $0.lowerBound < $1.lowerBound }
        return frames.isEmpty ? nil : PhysicalMemoryMap(ramFrames: frames)
    }

    /// Reads `/proc/iomem` under `root`; nil when unreadable or without addresses.
    public static func read(root: SysRoot = .host) -> PhysicalMemoryMap? {
        guard let text = try? Sys.readTextFile(root.path("/proc/iomem")) else { return nil }
        return parse(iomem: text)
    }

    /// Total RAM bytes listed.
    public var bytes: UInt64 { ramFrames.reduce(0) { $0 + UInt64($1.count) * 4096 } }
}

extension Substring {
    package func trimming(_ c: Character) -> Substring {
        var s = self
        while s.first == c { s.removeFirst() }
        while s.last == c { s.removeLast() }
        return s
    }
}
