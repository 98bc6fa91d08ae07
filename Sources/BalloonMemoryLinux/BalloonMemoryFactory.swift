import GuestMemoryLinux
import BalloonBlocks
import Logging
import PlatformLinux

/// Why the hugetlb balloon backend cannot be used here, nil when it can: it needs root (to
/// raise `nr_overcommit_hugepages`), 2 MiB hugetlb pages (CONFIG_HUGETLBFS) and the 2 MiB
/// size's `nr_overcommit_hugepages` (see `HugeTLBBalloonMemory.overcommitSetting`).
public func hugeTLBBalloonUnavailableReason(root: SysRoot = .host, effectiveUID: UInt32 = Sys.effectiveUserID) -> String? {
    if effectiveUID != 0 {
        return "balloond is not root (effective uid \(effectiveUID)): raising nr_overcommit_hugepages needs root"
    }
    guard HugePagePool(root: root).isSupported() else {
        return "this kernel has no 2 MiB hugetlb pages (no \(root.path("/sys/kernel/mm/hugepages/hugepages-2048kB")), and /proc/sys/vm/nr_hugepages is missing or Hugepagesize is not 2048 kB): it needs CONFIG_HUGETLBFS"
    }
    guard HugeTLBBalloonMemory.overcommitSetting(root: root) != nil else {
        return "there is no nr_overcommit_hugepages for 2 MiB pages (neither the per-size sysfs file nor /proc/sys/vm/nr_overcommit_hugepages with a 2 MiB default size)"
    }
    return nil
}

/// The balloon's memory on Linux: `TieredBalloonMemory` (hugetlb surplus pages, then locked
/// anonymous memory) when hugetlb can be used, else `LockedAnonymousBalloonMemory` alone,
/// with the reason logged. First puts back any setting a killed balloond left changed
/// (`nr_overcommit_hugepages`, `compact_unevictable_allowed`).
///
/// - Parameters:
///   - pagemap: /proc/self/pagemap, opened while privileged.
///   - limits: the margin, cap and PSI limits (shared by both backends).
///   - compactionHold: balloond's one `CompactionHold` (shared with the DMA pages and the
///     anonymous hint source).
///   - arena: the memfds every page comes from (the guardian holds them too).
public func makeLinuxBalloonMemory(root: SysRoot = .host, pagemap: PagemapResolver, arena: DeviceMemoryArena,
                                   limits: OwnedMemoryLimits = OwnedMemoryLimits(), compactionHold: CompactionHold, holdings: GuestMemoryHoldings,
                                   offlineBlocks: Bool = false,
                                   effectiveUID: UInt32 = Sys.effectiveUserID, logger: Logger = Logger(label: "balloond.balloon")) -> BalloonMemory {
    let pages = LinuxBalloonPages(pagemap: pagemap, arena: arena)
    return makeLinuxBalloonMemory(root: root, hugePages: pages, smallPages: pages, limits: limits, compactionHold: compactionHold,
                                  holdings: holdings, offlineBlocks: offlineBlocks, effectiveUID: effectiveUID, logger: logger)
}

/// The same with the kernel side injected (tests).
public func makeLinuxBalloonMemory(root: SysRoot = .host, hugePages: HugeTLBBalloonPages, smallPages: LockedAnonymousPages,
                                   limits: OwnedMemoryLimits = OwnedMemoryLimits(), oomScoreAdj: Int? = 1000,
                                   compactionHold: CompactionHold? = nil, holdings: GuestMemoryHoldings? = nil,
                                   offlineBlocks: Bool = false, blockControl: MemoryBlockControl? = nil,
                                   effectiveUID: UInt32 = Sys.effectiveUserID, logger: Logger = Logger(label: "balloond.balloon")) -> BalloonMemory {
    let compaction = compactionHold ?? CompactionHold(root: root, logger: logger)
    func recover(_ what: String, _ body: () throws(BalloonMemoryError) -> SysctlRecovery) {
        do {
            let outcome = try body()
            if outcome != .nothingToDo { logger.notice("\(what): \(outcome)") }
        } catch { logger.error("\(what): \(error)") }
    }
    recover("compact_unevictable_allowed") { () throws(BalloonMemoryError) in
        do throws(GuestMemoryError) { return try compaction.recoverAfterCrash() } catch { throw .failed(error) }
    }
    recover("nr_overcommit_hugepages") { () throws(BalloonMemoryError) in
        try HugeTLBBalloonMemory.recoverAfterCrash(root: root, logger: logger)
    }
    if let text = try? Sys.readAttribute(root.path("/proc/sys/kernel/numa_balancing")), let v = Int(text), v != 0 {
        logger.warning("kernel.numa_balancing is \(v): NUMA balancing can migrate locked anonymous balloon pages (hugetlb pages are not affected). balloond re-checks every block's PFNs before sending them; to rule it out, set /proc/sys/kernel/numa_balancing to 0")
    }

    let budget = BalloonMemoryBudget(root: root, limits: limits, oomScoreAdj: oomScoreAdj, holdings: holdings, logger: logger)
    let rest = makePageBalloonMemory(root: root, hugePages: hugePages, smallPages: smallPages, budget: budget, compaction: compaction,
                                     effectiveUID: effectiveUID, logger: logger)
    guard offlineBlocks else { return rest }
    if effectiveUID != 0 {
        logger.notice("balloon memory: no offline memory blocks: balloond is not root (effective uid \(effectiveUID))")
        return rest
    }
    do {
        let offline = try OfflineBalloonMemory(root: root, control: blockControl, budget: budget, logger: logger)
        logger.info("balloon memory: whole free memory blocks taken offline (no zeroing) while an inflate wants one or more, then \(rest.name)")
        return OfflineFirstBalloonMemory(offline: offline, rest: rest, logger: logger)
    } catch {
        logger.notice("balloon memory: no offline memory blocks: \(error)")
        return rest
    }
}

/// Balloon memory from the page allocator: hugetlb surplus pages then locked anonymous pages,
/// or the latter alone (with the reason logged).
private func makePageBalloonMemory(root: SysRoot, hugePages: HugeTLBBalloonPages, smallPages: LockedAnonymousPages, budget: BalloonMemoryBudget,
                                   compaction: CompactionHold, effectiveUID: UInt32, logger: Logger) -> BalloonMemory {
    let small = LockedAnonymousBalloonMemory(root: root, pages: smallPages, budget: budget, compactionHold: compaction, logger: logger)
    if let why = hugeTLBBalloonUnavailableReason(root: root, effectiveUID: effectiveUID) {
        logger.notice("balloon memory: locked anonymous 4 KiB pages only (no 2 MiB blocks for hugepage-backed hosts or free page reporting): \(why)")
        return small
    }
    do {
        let huge = try HugeTLBBalloonMemory(root: root, pages: hugePages, budget: budget, logger: logger)
        logger.info("balloon memory: hugetlb surplus pages through \(huge.overcommitPath), then locked anonymous pages")
        return TieredBalloonMemory(huge: huge, small: small, logger: logger)
    } catch {
        logger.notice("balloon memory: locked anonymous 4 KiB pages only: \(error)")
        return small
    }
}
