import GuestMemoryLinux
import FreePages
import Logging
import PlatformLinux
import VirtioCore

/// What the Linux sources need from the driver.
public struct LinuxHintSourceEnvironment {
    public var root: SysRoot
    /// /proc/self/pagemap, opened while privileged (needed by anonymous and hugetlb's fallback).
    public var pagemap: PagemapResolver?
    /// balloond's own hugetlb pages (the ring/DMA hugepage), never hinted.
    public var ownHugePages: [GuestPhysicalRange]
    public var limits: OwnedMemoryLimits
    /// Memory the device knows by PFN that balloond holds (the balloon's pages), read at every
    /// round by the offline source, which never offlines a block overlapping it.
    public var protectedRanges: () -> [GuestPhysicalRange] = { [] }
    /// The memfds owned hint memory comes from (the guardian holds them too).
    public var arena: DeviceMemoryArena?
    /// balloond's one `CompactionHold` (the anonymous source holds it while it holds memory).
    public var compactionHold: CompactionHold?
    /// balloond's one record of what it holds (OOM score holders, the grown hugetlb pool),
    /// shared with the balloon memory.
    public var holdings: GuestMemoryHoldings
    /// The offline source's reserve (`OfflineBlockSource.Options.reserveBytes`; 0: none).
    public var offlineReserveBytes: UInt64 = 0
    public var logger: Logger

    public init(root: SysRoot = .host, pagemap: PagemapResolver?, ownHugePages: [GuestPhysicalRange] = [],
                limits: OwnedMemoryLimits = OwnedMemoryLimits(), arena: DeviceMemoryArena? = nil, compactionHold: CompactionHold? = nil,
                holdings: GuestMemoryHoldings, logger: Logger = Logger(label: "balloond.hint")) {
        self.root = root
        self.holdings = holdings
        self.arena = arena
        self.compactionHold = compactionHold
        self.pagemap = pagemap
        self.ownHugePages = ownHugePages
        self.limits = limits
        self.logger = logger
    }
}

/// Whether the hugetlb source can work here: a 2 MiB pool, and /proc/kpageflags and
/// /proc/kpagecount readable (root). For `chooseHintSource(hugetlbAvailable:)`.
public func hugetlbHintSourceUsable(root: SysRoot = .host) -> Bool {
    guard HugePagePool(root: root).isSupported() else { return false }
    guard (try? KPageFile(path: root.path("/proc/kpageflags"), chunkEntries: 1)) != nil,
          (try? KPageFile(path: root.path("/proc/kpagecount"), chunkEntries: 1)) != nil else { return false }
    return true
}

/// Whether the offline source can work here: memory hotplug in sysfs and /proc/kpageflags
/// readable (root). For `chooseHintSource(offlineAvailable:)`.
public func offlineHintSourceUsable(root: SysRoot = .host) -> Bool {
    guard (try? LinuxMemoryBlocks(root: root)) != nil else { return false }
    return (try? KPageFile(path: root.path("/proc/kpageflags"), chunkEntries: 1)) != nil
}

/// Builds the source `chooseHintSource` picked (`hugetlb`, `anonymous`, `offline`, `kpageflags`;
/// `simulated` is the FreePages `SimulatedBuddyAllocator`, built by the caller). `hugetlb` is a
/// `RoundFallbackSource` over hugetlb and anonymous.
public func makeLinuxFreePageSource(_ source: HintSource, environment env: LinuxHintSourceEnvironment) throws(FreePageSourceError) -> FreePageSource {
    func anonymous() throws(FreePageSourceError) -> AnonymousSource {
        guard let pagemap = env.pagemap else {
            throw .failed(LinuxHintSourceError.noPagemap)
        }
        guard let arena = env.arena else { throw .failed(LinuxHintSourceError.noArena(source: .anonymous)) }
        return AnonymousSource(root: env.root, pagemap: pagemap, arena: arena, options: AnonymousSource.Options(limits: env.limits),
                               compactionHold: env.compactionHold, holdings: env.holdings, logger: env.logger.withLabel("anonymous"))
    }
    switch source {
    case .hugetlb:
        guard env.arena != nil else { throw .failed(LinuxHintSourceError.noArena(source: .hugetlb)) }
        let huge = try HugeTLBPoolSource(root: env.root, arena: env.arena, ownHugePages: env.ownHugePages,
                                         options: HugeTLBPoolSource.Options(limits: env.limits), holdings: env.holdings,
                                         logger: env.logger.withLabel("hugetlb"))
        return RoundFallbackSource(primary: huge, fallback: try anonymous(), logger: env.logger)
    case .anonymous:
        return try anonymous()
    case .offline:
        let own = env.ownHugePages, more = env.protectedRanges
        return try OfflineBlockSource(root: env.root, options: OfflineBlockSource.Options(limits: env.limits, reserveBytes: env.offlineReserveBytes),
                                      protectedRanges: { own + more() }, logger: env.logger.withLabel("offline"))
    case .kpageflags:
        return try KPageFlagsSource(root: env.root, logger: env.logger.withLabel("kpageflags"))
    case .auto, .simulated:
        throw .failed(LinuxHintSourceError.notALinuxSource(source))
    }
}

extension Logger {
    fileprivate func withLabel(_ suffix: String) -> Logger {
        var l = Logger(label: label + "." + suffix)
        l.logLevel = logLevel
        return l
    }
}
