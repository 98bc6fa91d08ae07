import GuestMemoryLinux
import BalloonBlocks
import Logging
import PlatformLinux
import VirtioCore

/// Balloon memory from 2 MiB hugetlb pages taken as **surplus** pages (the preferred backing
/// for inflate and for free page reporting): raise `nr_overcommit_hugepages`, map private
/// `MAP_HUGETLB` pages with `MAP_POPULATE`, read each page's PFN from /proc/self/pagemap,
/// check it is 2 MiB aligned, and hand out one huge `BalloonBlock` per page.
///
/// Why surplus pages rather than a grown pool (`nr_hugepages`): a surplus page exists only
/// while it is mapped. When balloond unmaps it, exits or is killed (SIGKILL, the OOM killer)
/// the kernel frees it straight back to the buddy allocator, so the guest gets the memory
/// back at once. Persistent pool pages would stay in the pool, away from the guest, until
/// someone lowered `nr_hugepages`. `nr_overcommit_hugepages` itself does survive a crash:
/// its original value is kept in a `SysctlStateFile` (`/run/balloond/balloon-hugetlb.state`)
/// and `recoverAfterCrash` puts it back on the next start.
///
/// Why the frames stay where `take` found them (docs/virtio-balloon.md §4: QEMU discards a frame
/// as soon as it sees its PFN, so a frame that moved and was reused would lose its new
/// owner's data). An in-use hugetlb page is not on the LRU: reclaim never touches it, it is
/// never swapped, and khugepaged, KSM and NUMA balancing ignore hugetlb mappings. Compaction
/// (kcompactd, direct compaction for other allocations, `compact_memory`) does not migrate
/// in-use hugetlb pages. The mappings are private, never forked (`MADV_DONTFORK`) and never
/// written by balloond, so no copy-on-write gives them new frames. What *can* migrate an
/// in-use hugetlb page: `alloc_contig_range` (CMA allocations, runtime allocation of 1 GiB
/// gigantic pages), memory offlining/hot-unplug, `mbind`/`move_pages`/`migrate_pages` by a
/// privileged process, and memory-failure handling. None of these should happen in a guest
/// that runs balloond — do not hot-unplug guest memory or grow a 1 GiB pool while the
/// balloon is inflated — but balloond cannot prevent them. It detects them: the driver calls
/// `stillInPlace` (a fresh pagemap read) right before it sends a block's PFNs.
///
/// Surplus pages come from the buddy allocator as whole 2 MiB blocks. If the pool has free
/// persistent pages that nobody reserved, the kernel uses those first (they go back to the
/// pool, not the buddy allocator, when released). Growing past free 2 MiB blocks may make
/// the kernel compact or reclaim, like the in-kernel driver's allocations: that is why the
/// allowance is MemAvailable − margin (`memoryAllowance(.availableMemory, …)`), re-read before every step,
/// and why PSI pressure stops taking.
///
/// Not with the hugetlb hint source: while a `HugeTLBPoolSource` holds the pool
/// (`GuestMemoryHoldings.hugeTLBPoolHeldForHints`), `take` takes nothing, because faulting balloon pages could dequeue a free
/// pool page it has hinted. That source refuses rounds while surplus pages exist, so it uses
/// anonymous memory while the balloon holds hugetlb pages.
public final class HugeTLBBalloonMemory: BalloonMemory {
    public let name = "hugetlb"
    public static let pagesPerBlock = balloonPagesPerHugeBlock
    static let blockBytes = balloonHugeBlockSize

    public struct Options: Hashable, Sendable {
        /// Most memory mapped per step; the allowance is re-read between steps.
        public var stepBytes: UInt64
        public init(stepBytes: UInt64 = 64 << 20) { self.stepBytes = stepBytes }
    }

    private struct Held {
        let mapping: BalloonMapping
        let slot: Int
        let address: UInt
        let headPFN: UInt64
    }

    public let root: SysRoot
    public let options: Options
    public let budget: BalloonMemoryBudget
    private let pages: HugeTLBBalloonPages
    private let overcommit: SysctlOverride
    private let logger: Logger
    private var held: [UInt64: Held] = [:]
    private var nextHandle: UInt64 = 1
    /// With vfio and ACCESS_PLATFORM: each 2 MiB page is mapped in the IOMMU at its
    /// guest-physical address when taken (so a report of it is a valid device address) and
    /// unmapped before it is given back. Inflate PFNs are guest-physical and need no mapping.
    public var deviceMapper: DeviceAddressMapper?
    /// Pages whose IOMMU mapping could not be removed: never given back.
    private var keptMapped: [Held] = []

    public var heldBytes: UInt64 { UInt64(held.count) * Self.blockBytes }
    /// `nr_overcommit_hugepages` for the 2 MiB size (absolute guest path).
    public var overcommitPath: String { overcommit.sysctl }

    /// The setting that allows surplus 2 MiB pages: the per-size sysfs file when the kernel
    /// has it, else `/proc/sys/vm/nr_overcommit_hugepages` when the default hugepage size is
    /// 2 MiB (that one applies to the default size only). nil: no 2 MiB hugetlb pages.
    public static func overcommitSetting(root: SysRoot = .host) -> String? {
        let perSize = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_overcommit_hugepages"
        if Sys.exists(root.path(perSize)) { return perSize }
        let global = "/proc/sys/vm/nr_overcommit_hugepages"
        guard Sys.exists(root.path(global)), let info = try? MemInfo.read(root: root),
              info.hugePageSize == UInt64(HugePagePool.pageSize) else { return nil }
        return global
    }

    /// - Parameters:
    ///   - pages: the kernel side (`LinuxBalloonPages`; tests pass a fake).
    ///   - budget: shared with the other backends of this balloond (limits, OOM score).
    ///   - stateFile: where the original `nr_overcommit_hugepages` is kept while raised.
    public init(root: SysRoot = .host, pages: HugeTLBBalloonPages, budget: BalloonMemoryBudget, options: Options = Options(),
                stateFile: SysctlStateFile? = nil, logger: Logger = Logger(label: "balloond.balloon.hugetlb")) throws(BalloonMemoryError) {
        guard let setting = Self.overcommitSetting(root: root) else {
            throw LinuxBalloonMemoryError.noOvercommitSetting(hugePagesDirectory: root.path("/sys/kernel/mm/hugepages/hugepages-2048kB")).balloonError
        }
        self.root = root
        self.pages = pages
        self.budget = budget
        self.options = options
        self.logger = logger
        overcommit = SysctlOverride(root: root, sysctl: setting,
                                    stateFile: stateFile ?? SysctlStateFile(root: root, path: SysctlStateFile.hugeTLBOvercommitPath), logger: logger)
    }

    deinit { releaseAll() }

    /// Puts `nr_overcommit_hugepages` back to what a balloond that was killed found, if it
    /// left a state file. Its surplus pages died with it (they went back to the buddy
    /// allocator); only the setting is left over.
    @discardableResult
    public static func recoverAfterCrash(root: SysRoot = .host, stateFile: SysctlStateFile? = nil,
                                         logger: Logger = Logger(label: "balloond.balloon.hugetlb")) throws(BalloonMemoryError) -> SysctlRecovery {
        try recoverBalloonSysctl(root: root, stateFile: stateFile ?? SysctlStateFile(root: root, path: SysctlStateFile.hugeTLBOvercommitPath), logger: logger)
    }

    // MARK: BalloonMemory

    public func take(maxPages: Int, hugeOnly: Bool) throws(BalloonMemoryError) -> BalloonTake {
        let wanted = max(0, maxPages) / Self.pagesPerBlock
        let remainder = max(0, maxPages) % Self.pagesPerBlock
        let wholeOnly = remainder > 0
            ? "the hugetlb backend takes whole 2 MiB pages (512 4 KiB pages each); the last \(remainder) page(s) asked are less than one"
            : nil
        guard wanted > 0 else { return BalloonTake(blocks: [], limitedBy: wholeOnly) }
        if budget.holdings.hugeTLBPoolHeldForHints {
            return BalloonTake(blocks: [], limitedBy: "the hugetlb hint source holds the hugetlb pool; balloon pages could be faulted from its hinted pages, so none are taken until it is released")
        }

        budget.beginTaking()
        defer {
            settleOvercommit()
            budget.endTaking()
        }
        var blocks: [BalloonBlock] = []
        var limitedBy: String?
        var stepPages = max(1, Int(options.stepBytes / Self.blockBytes))
        var pressureAtStart: MemoryPressure?
        var first = true
        func stop(_ error: LinuxBalloonMemoryError) throws(BalloonMemoryError) -> BalloonTake {
            // Unusable: keep what was taken (the caller owns it), say why it stopped.
            if blocks.isEmpty { throw error.balloonError }
            logger.error("hugetlb balloon memory stops: \(error)")
            return BalloonTake(blocks: blocks, limitedBy: error.description)
        }

        while blocks.count < wanted {
            let now: MemorySnapshot
            do { now = try budget.snapshot() } catch { return try stop(error) }
            if first { pressureAtStart = now.pressure; first = false }
            let allowance = budget.allowance(now: now, pressureAtStart: pressureAtStart)
            let n = min(wanted - blocks.count, stepPages, Int(allowance.bytes / Self.blockBytes))
            guard n > 0 else {
                limitedBy = "allowance \(allowance)"
                break
            }
            // Allow exactly the surplus pages balloond holds and is about to take.
            let setting = root.path(overcommit.sysctl)
            let base: UInt64
            do { base = try overcommit.baseline() } catch { return try stop(.cannotRaiseOvercommit(path: setting, error)) }
            // Checked: the file may hold anything up to ULONG_MAX.
            let (wantedValue, overflow) = base.addingReportingOverflow(UInt64(held.count + n))
            guard !overflow else { return try stop(.overcommitOverflow(path: setting, value: base, raiseBy: held.count + n)) }
            do { try overcommit.set(wantedValue) } catch { return try stop(.cannotRaiseOvercommit(path: setting, error)) }
            let mapping: BalloonMapping
            do { mapping = try pages.mapHugePages(count: n) } catch {
                if error.kind == .noMemory {
                    if n > 1 {
                        stepPages = n / 2
                        continue
                    }
                    limitedBy = "no 2 MiB page to be had: \(error)"
                    break
                }
                return try stop(.mapFailed(error))
            }
            let heads: [UInt64]
            do { heads = try verifiedHeads(of: mapping, count: n) } catch {
                return try stop(error)
            }
            if let deviceMapper {
                var mappedCount = 0
                var failure: VFIOError?
                for (i, head) in heads.enumerated() {
                    do { try deviceMapper.map(virtualAddress: mapping.slotAddress(i), length: Int(Self.blockBytes), at: head * balloonPageSize) } catch {
                        failure = error
                        break
                    }
                    mappedCount += 1
                }
                if let failure {
                    for (i, head) in heads.prefix(mappedCount).enumerated() {
                        try? deviceMapper.unmap(deviceAddress: head * balloonPageSize, length: Int(Self.blockBytes))
                        mapping.release(slot: i)
                    }
                    for i in mappedCount..<heads.count { mapping.release(slot: i) }
                    return try stop(.deviceMappingFailed(failure))
                }
            }
            for (i, head) in heads.enumerated() {
                let handle = nextHandle
                nextHandle += 1
                held[handle] = Held(mapping: mapping, slot: i, address: mapping.slotAddress(i), headPFN: head)
                budget.took(Self.blockBytes)
                blocks.append(BalloonBlock(handle: handle, ranges: [GuestPhysicalRange(start: head * balloonPageSize, length: Self.blockBytes)]))
            }
        }
        if blocks.count == wanted { limitedBy = wholeOnly }
        if let limitedBy, blocks.count < wanted {
            logger.debug("hugetlb balloon memory took \(blocks.count) of \(wanted) 2 MiB pages: \(limitedBy)")
        }
        return BalloonTake(blocks: blocks, limitedBy: limitedBy)
    }

    public func stillInPlace(_ block: BalloonBlock) -> Bool {
        guard let h = held[block.handle],
              block.ranges == [GuestPhysicalRange(start: h.headPFN * balloonPageSize, length: Self.blockBytes)] else { return false }
        guard let entries = try? pages.pagemap(at: h.address, pages: Self.pagesPerBlock) else { return false }
        return Self.problem(entries, expectedHead: h.headPFN) == nil
    }

    /// Removes the page's IOMMU mapping; false (page kept for good) when that fails.
    private func unmapForDevice(_ h: Held) -> Bool {
        guard let deviceMapper else { return true }
        do { try deviceMapper.unmap(deviceAddress: h.headPFN * balloonPageSize, length: Int(Self.blockBytes)) } catch {
            logger.critical("\(error); keeping the 2 MiB page at 0x\(String(h.headPFN * balloonPageSize, radix: 16))")
            keptMapped.append(h)
            return false
        }
        return true
    }

    public func release(_ blocks: [BalloonBlock]) {
        var any = false
        for b in blocks {
            guard let h = held.removeValue(forKey: b.handle) else { continue }
            guard unmapForDevice(h) else { continue }
            h.mapping.release(slot: h.slot)
            budget.released(Self.blockBytes)
            any = true
        }
        if any { settleOvercommit() }
    }

    public func releaseAll() {
        for (_, h) in held where unmapForDevice(h) { h.mapping.release(slot: h.slot) }
        let bytes = heldBytes
        held = [:]
        if bytes > 0 { budget.released(bytes) }
        settleOvercommit()
    }

    // MARK: internals

    /// `nr_overcommit_hugepages` = original + pages held; the original once none are held.
    private func settleOvercommit() {
        guard let original = overcommit.original else { return }
        if held.isEmpty {
            if let problem = overcommit.restore() { logger.warning("\(problem)") }
            return
        }
        let want = original + UInt64(held.count)
        guard overcommit.lastSet != want else { return }
        do { try overcommit.set(want) } catch { logger.warning("cannot lower \(root.path(overcommit.sysctl)) to \(want): \(error)") }
    }

    /// Each page's head PFN, checked: present, a PFN (CAP_SYS_ADMIN), 2 MiB aligned, and its
    /// 512 4 KiB subpages consecutive. Unmaps the whole mapping when any check fails.
    private func verifiedHeads(of mapping: BalloonMapping, count: Int) throws(LinuxBalloonMemoryError) -> [UInt64] {
        let entries: [PagemapEntry]
        do { entries = try pages.pagemap(at: mapping.base, pages: count * Self.pagesPerBlock) } catch {
            throw .cannotReadPFNs(.hugeTLB, error)
        }
        var heads: [UInt64] = []
        for i in 0..<count {
            let page = Array(entries[(i * Self.pagesPerBlock)..<((i + 1) * Self.pagesPerBlock)])
            if let problem = Self.problem(page, expectedHead: nil) {
                throw .badHugePage(index: i, problem)
            }
            heads.append(page[0].pfn)
        }
        return heads
    }

    /// What is wrong with one hugetlb page's 512 pagemap entries, nil when it is a present,
    /// 2 MiB-aligned page (starting at `expectedHead` when given).
    static func problem(_ entries: [PagemapEntry], expectedHead: UInt64?) -> HugeTLBPageProblem? {
        guard entries.count == pagesPerBlock, let first = entries.first else { return .entryCount(expected: pagesPerBlock, got: entries.count) }
        guard first.present, !first.swapped else { return .notPresent(first) }
        guard first.pfn != 0 else { return .pfnsHidden }
        let head = first.pfn
        guard head % UInt64(pagesPerBlock) == 0 else { return .notAligned(pfn: head) }
        if let expectedHead, head != expectedHead { return .moved(from: expectedHead, to: head) }
        for (i, e) in entries.enumerated() where !e.present || e.pfn != head + UInt64(i) {
            return .notContiguous(subpage: i, entry: e, expected: head + UInt64(i))
        }
        return nil
    }
}
