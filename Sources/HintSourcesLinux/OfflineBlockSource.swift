import GuestMemoryLinux
import FreePages
import Logging
import PlatformLinux
import VirtioCore

/// Owned free memory by the block (`--hint-source offline`): memory blocks (128 MiB on x86-64)
/// whose pages are all free are taken offline through `/sys/devices/system/memory`, hinted as
/// whole blocks, and onlined again at DONE.
///
/// Why: the other owned sources take memory from the page allocator, which zeroes every page
/// it hands out under `init_on_alloc=1` (Debian's default), at 50–100 MB/s under TCG. An
/// offlined block is taken out of the allocator's free lists and never written. Measured on
/// a 4 GiB Debian 6.1 guest under QEMU 10.0 TCG after memhog freed 3 GiB: 26 of 31 blocks
/// went offline in 30–40 ms each; the others failed fast (unmovable pages, holes).
///
/// Safety argument (docs/virtio-balloon.md §9: nobody may write a hinted page between balloond's
/// decision and QEMU applying the hint):
/// - *Nobody can write an offline page.* Offline memory has no free-list entry and no owner;
///   the kernel hands none of it out until it is onlined. Hints go out only for blocks that
///   are offline at that moment, and the block stays offline until every descriptor for it has
///   come back or the device can apply no hint any more (DONE, reset): `OutstandingHints`.
///   Held blocks stay offline across rounds (QEMU starts a round after every bitmap sync), so a
///   later round re-hints them at no cost: still nobody wrote them.
/// - *Offlining moves pages, never loses them.* If a block still holds movable pages the
///   kernel migrates them (a copy, written after the round's bitmap sync, so dirty-logged)
///   or fails and leaves the block online. Pages nobody may move are the exception:
///   balloond's own (the ring's hugepage, the balloon's pages: the device knows their PFNs).
///   So a round offlines a block only when a full `/proc/kpageflags` read of it, right before,
///   finds *every* page a free buddy page (balloond's pages are allocated, so never), and
///   balloond takes no memory between the read and the offline (the driver's one event-loop
///   thread runs both, and inflating, reporting and DMA allocation run on it too). Blocks
///   overlapping `protectedRanges` (the ring's hugepage) are never considered.
/// - *Bounded.* The kernel retries migration until a signal arrives; the write is interrupted
///   by a timer after `offlineTimeoutMilliseconds` (EINTR: the kernel undoes the isolation and
///   the block stays online). Blocks that failed are skipped for `skipRoundsAfterFailure` rounds.
/// - *Killed.* Each block is listed in `OfflineBlockStateFile` before it is offlined and removed
///   after it is online again (`OfflineBlockLedger`); the next start onlines what a killed balloond left offline.
///   Until then the memory is missing, never reused while the device may act on it.
/// - *The reserve* (`Options.reserveBytes`, `--hint-reserve-mib`): between migrations blocks are
///   taken offline ahead of time and kept at DONE, so a round hints them the moment its cmd id
///   arrives. Hinting a block that went offline before the round's bitmap sync is as safe as
///   one offlined during the round: what matters is that nobody can write it between the hint
///   and DONE, and nobody can write an offline page. A reserve pass may also take a block
///   holding a few in-use pages when every one is a movable LRU page (page cache, a process's
///   unlocked memory): offlining copies each to a new frame, its owner keeps the contents,
///   and all of it happens before any round uses the block. Pages balloond itself gave the
///   device (ring, balloon and report pages) are locked or hugetlb pages, never movable LRU
///   pages, so they are never moved; nor is kernel memory. Pressure onlines reserve blocks
///   first (`releaseUnderPressure`), and the driver waits a minute before refilling.
/// - *Poisoning.* Onlining frees the pages through the allocator, which poisons them again
///   under page_poison=1 (and zeroes them under init_on_free): writes after the hint, logged
///   and sent, so the destination holds what the kernel expects.
/// - *Residual risk.* Another program in the guest that hands PFNs of unpinned memory to a
///   device (as balloond does) would see such pages migrated. The kernel's own users pin them.
public final class OfflineBlockSource: FreePageSource {
    public let name = "offline"
    public let ownership = FreePageOwnership.owned

    public struct Options: Hashable, Sendable {
        public var limits: OwnedMemoryLimits
        /// The longest one block's offlining may take before it is interrupted.
        public var offlineTimeoutMilliseconds: Int
        /// A block that failed to go offline is not tried again for this many rounds.
        public var skipRoundsAfterFailure: Int
        /// The reserve (`--hint-reserve-mib`): up to this many bytes of wholly free blocks are
        /// taken offline between migrations and kept at DONE, so the next round hints them the
        /// moment its cmd id arrives instead of offlining blocks while QEMU already sends.
        /// 0: no reserve (blocks are taken only during rounds and all onlined at DONE).
        public var reserveBytes: UInt64
        /// The reserve takes a block only while MemFree stays at least this high after it
        /// (besides `limits`): the guest keeps room for its page cache.
        public var reserveKeepFreeBytes: UInt64
        /// Most blocks one `replenishReserve` call offlines, and how long it goes on starting
        /// new ones (each can take up to `reserveOfflineTimeoutMilliseconds`), so the event
        /// loop stays responsive to interrupts and memory pressure.
        public var reserveBlocksPerPass: Int
        public var reservePassBudgetMilliseconds: Int
        /// Between migrations the reserve also takes blocks with up to this many in-use pages,
        /// if every one is a movable LRU page (`KPageFlags.isMovableLRU`: page cache or a
        /// process's unlocked memory, which offlining copies elsewhere). Rounds take wholly free
        /// blocks only (no copying while QEMU sends).
        public var reserveMaxMovablePages: Int
        /// The longest one block's offlining may take in a reserve pass (it may copy pages).
        public var reserveOfflineTimeoutMilliseconds: Int
        public init(limits: OwnedMemoryLimits = OwnedMemoryLimits(), offlineTimeoutMilliseconds: Int = 200, skipRoundsAfterFailure: Int = 8,
                    reserveBytes: UInt64 = 0, reserveKeepFreeBytes: UInt64 = 128 << 20, reserveBlocksPerPass: Int = 8,
                    reservePassBudgetMilliseconds: Int = 300, reserveMaxMovablePages: Int = 2048,
                    reserveOfflineTimeoutMilliseconds: Int = 500) {
            self.limits = limits
            self.offlineTimeoutMilliseconds = offlineTimeoutMilliseconds
            self.skipRoundsAfterFailure = skipRoundsAfterFailure
            self.reserveBytes = reserveBytes
            self.reserveKeepFreeBytes = reserveKeepFreeBytes
            self.reserveBlocksPerPass = reserveBlocksPerPass
            self.reservePassBudgetMilliseconds = reservePassBudgetMilliseconds
            self.reserveMaxMovablePages = reserveMaxMovablePages
            self.reserveOfflineTimeoutMilliseconds = reserveOfflineTimeoutMilliseconds
        }
    }

    /// One round's numbers, for logs and the benchmark.
    public struct RoundStatistics: Hashable, Sendable {
        public var blocksOfflined = 0
        public var blocksRehinted = 0
        public var blocksSkippedNotFree = 0
        public var blocksFailed = 0
        public var offlineNanos: UInt64 = 0
        public var scanNanos: UInt64 = 0
        /// Listing the blocks at the start of the round.
        public var listNanos: UInt64 = 0
        /// `beginRound` itself; from its start until the first block taken this round was
        /// queued (nil: none); the owned-memory checks before each block; state file writes.
        public var beginNanos: UInt64 = 0
        public var firstBlockNanos: UInt64?
        public var stopCheckNanos: UInt64 = 0
        public var stateNanos: UInt64 = 0
        public var stoppedBecause: String?
    }

    public let root: SysRoot
    public let options: Options
    public var stateFile: OfflineBlockStateFile { ledger.stateFile }
    private let blocks: MemoryBlockControl
    /// The state file and the blocks it records: the held blocks.
    private let ledger: OfflineBlockLedger
    private let kpageflags: KPageFile
    private let protectedRanges: () -> [GuestPhysicalRange]
    private let logger: Logger

    /// Blocks balloond holds offline (ascending).
    public var held: [Int] { ledger.blocks }
    private var candidates: [Int] = []
    /// Held blocks to hint again this round (split when handed out).
    private var rehint: [Int] = []
    private var skipUntilRound: [Int: Int] = [:]
    private var rounds = 0
    private var pending: [GuestPhysicalRange] = []
    private var outstanding = OutstandingHints<Int>()
    private var roundOpen = false
    private var pressureAtRoundStart: MemoryPressure?
    public private(set) var lastRound = RoundStatistics()

    public var heldBytes: UInt64 { UInt64(held.count) * blocks.blockBytes }

    /// - Parameters:
    ///   - control: the memory blocks (default: `/sys/devices/system/memory` under `root`).
    ///   - protectedRanges: memory the device knows by PFN that balloond holds (its ring and
    ///     DMA hugepage, the balloon's pages); read at every round.
    public init(root: SysRoot = .host, control: MemoryBlockControl? = nil, options: Options = Options(),
                stateFile: OfflineBlockStateFile? = nil, protectedRanges: @escaping () -> [GuestPhysicalRange] = { [] },
                logger: Logger = Logger(label: "balloond.hint.offline")) throws(FreePageSourceError) {
        self.root = root
        self.options = options
        self.protectedRanges = protectedRanges
        self.logger = logger
        do throws(GuestMemoryError) {
            if let control { blocks = control } else { blocks = try LinuxMemoryBlocks(root: root) }
            kpageflags = try KPageFile(path: root.path("/proc/kpageflags"), chunkEntries: 4096)
        } catch { throw error.sourceError }
        ledger = OfflineBlockLedger(stateFile: stateFile ?? OfflineBlockStateFile(root: root), control: blocks, logger: logger)
        guard blocks.blockBytes % balloonPageSize == 0, blocks.blockBytes >= 2 << 20 else {
            throw .failed(LinuxHintSourceError.blockSizeNotHugeMultiple(blocks.blockBytes))
        }
    }

    // MARK: FreePageSource

    public func beginRound(id: UInt32) throws(FreePageSourceError) {
        let t0 = Sys.monotonicNanos()
        defer { lastRound.beginNanos = Sys.monotonicNanos() - t0 }
        roundStartNanos = t0
        rounds += 1
        roundOpen = true
        lastRound = RoundStatistics()
        // The round's first hints are the held blocks, and at a high migration bandwidth only
        // hints QEMU applies in its first ~100 ms count: nothing here but what deciding on them
        // needs (one /proc/meminfo read, one state read per held block). The other blocks are
        // listed once those hints are out.
        let snapshot = try? MemorySnapshot.read(root: root, withBuddyInfo: false)
        pressureAtRoundStart = snapshot?.pressure
        adoptLeftovers()
        // A held block someone else onlined is no longer ours to hint.
        let lost = held.filter { blocks.isOffline($0) != true }
        if !lost.isEmpty {
            logger.warning("memory blocks \(lost.map(String.init).joined(separator: ",")) were onlined by someone else while balloond held them offline; not hinting them again")
            ledger.record(forgetting: lost)
        }
        if !held.isEmpty, let snapshot, case let allowance = allowance(now: snapshot), allowance.bytes == 0 {
            // The guest is short of memory: give back what no descriptor still refers to.
            let idle = held.filter { outstanding.outstanding($0) == 0 }
            logger.info("offline source: the guest is short of memory at the start of a round (\(allowance)); onlining \(idle.count) held block(s)")
            online(idle)
        }
        // Held blocks first: re-hinted at once, nothing to take.
        pending = []
        rehint = held.sorted(by: >)
        lastRound.blocksRehinted = held.count
        candidates = []
        candidatesListed = false
    }

    /// Whether this round's candidate blocks were listed (after the held blocks went out).
    private var candidatesListed = false
    private var roundStartNanos: UInt64 = 0

    private func listCandidates() throws(FreePageSourceError) {
        candidatesListed = true
        let t0 = Sys.monotonicNanos()
        let all: [Int]
        do { all = try blocks.offlinableBlocks() } catch { throw error.sourceError }
        lastRound.listNanos = Sys.monotonicNanos() - t0
        candidates = eligible(all)
    }

    /// The blocks of `all` this source may try to take now, highest address first. QEMU's
    /// migration thread walks guest RAM upward from offset 0 (on q35 the RAM above 4 GiB
    /// follows the RAM below), and a hint for a page it has already sent saves nothing: from the
    /// top down, every block offlined before the sender reaches it is skipped.
    private func eligible(_ all: [Int]) -> [Int] {
        let protected = protectedRanges()
        return all.filter { b in
            if held.contains(b) { return false }
            if let until = skipUntilRound[b], rounds < until { return false }
            let r = blocks.range(of: b)
            return !protected.contains { $0.start.value < r.end && r.start.value < $0.end }
        }.sorted(by: >)
    }

    public var preferredMaxRangeBytes: UInt64? { blocks.blockBytes }
    public var reserveTargetBytes: UInt64 { options.reserveBytes }

    public func nextBatch(maxRanges: Int, maxRangeBytes: UInt64) throws(FreePageSourceError) -> [GuestPhysicalRange] {
        guard roundOpen, maxRanges > 0 else { return [] }
        lastMaxRangeBytes = max(balloonPageSize, maxRangeBytes)
        if pending.isEmpty, !rehint.isEmpty {
            pending = rehint.flatMap { splitBlock($0) }
            rehint = []
        }
        if pending.isEmpty, !candidatesListed { try listCandidates() }
        while pending.isEmpty, !candidates.isEmpty {
            let b = candidates.removeFirst()
            if Sys.terminationSignalReceived {
                lastRound.stoppedBecause = "a termination signal arrived"
                candidates = []
                break
            }
            let c0 = Sys.monotonicNanos()
            let stop = takeStop(reserve: false)
            lastRound.stopCheckNanos += Sys.monotonicNanos() - c0
            if let why = stop {
                lastRound.stoppedBecause = why
                candidates = []
                logger.debug("offline source stops taking blocks this round: \(why)")
                break
            }
            try take(b, movablePages: 0, timeoutMilliseconds: options.offlineTimeoutMilliseconds)
        }
        let n = min(maxRanges, pending.count)
        let out = Array(pending.prefix(n))
        pending.removeFirst(n)
        for r in out { outstanding.handedOut(r, tag: Int(r.start.value / blocks.blockBytes)) }
        return out
    }

    public func hintsApplied(_ ranges: [GuestPhysicalRange]) {
        for r in ranges { outstanding.applied(r) }
    }

    public func endRound() {
        if roundOpen {
            logger.info("offline source round ended", metadata: [
                "held_mib": "\(heldBytes >> 20)", "offlined": "\(lastRound.blocksOfflined)", "rehinted": "\(lastRound.blocksRehinted)",
                "not_free": "\(lastRound.blocksSkippedNotFree)", "failed": "\(lastRound.blocksFailed)", "left": "\(candidates.count)",
                "list_ms": "\(lastRound.listNanos / 1_000_000)", "scan_ms": "\(lastRound.scanNanos / 1_000_000)",
                "begin_ms": "\(lastRound.beginNanos / 1_000_000)", "first_block_ms": "\(lastRound.firstBlockNanos.map { String($0 / 1_000_000) } ?? "-")",
                "check_ms": "\(lastRound.stopCheckNanos / 1_000_000)", "state_ms": "\(lastRound.stateNanos / 1_000_000)",
                "offline_ms": "\(lastRound.offlineNanos / 1_000_000)", "stopped": "\(lastRound.stoppedBecause ?? "-")",
            ])
        }
        roundOpen = false
        pending = []
        rehint = []
        candidates = []
    }

    /// DONE: no hint can be applied any more. The reserve stays offline (the highest blocks,
    /// the ones QEMU reaches last), the rest goes online.
    public func hintingDone() {
        guard options.reserveBytes > 0 else { return releaseAll() }
        roundOpen = false
        pending = []
        rehint = []
        candidates = []
        outstanding.retireAll()
        let keep = Int(options.reserveBytes / blocks.blockBytes)
        let extra = held.sorted(by: >).dropFirst(keep)
        if !extra.isEmpty { online(Array(extra)) }
        logger.info("offline source: hinting done; keeping \(held.count) block(s) (\(heldBytes >> 20) MiB) offline as the reserve, onlined \(extra.count)")
    }

    /// Between rounds: offlines free blocks (up to `reserveMaxMovablePages` movable LRU pages
    /// in use, which offlining copies away), highest first, until the reserve holds
    /// `reserveBytes`, within `reserveBlocksPerPass` blocks and `reservePassBudgetMilliseconds`
    /// per call, and only while the owned-memory limits allow and MemFree stays above
    /// `reserveKeepFreeBytes`. Safety: the type's argument (nobody can write an offline block).
    public func replenishReserve() -> ReserveProgress {
        guard options.reserveBytes > 0 else { return .notWanted }
        guard !roundOpen else { return .grew }
        guard reserveHasRoom else { return .full }
        rounds += 1
        lastRound = RoundStatistics()
        pressureAtRoundStart = (try? MemorySnapshot.read(root: root, withBuddyInfo: false))?.pressure
        adoptLeftovers()
        let all: [Int]
        do { all = try blocks.offlinableBlocks() } catch {
            logger.warning("offline source: cannot list memory blocks for the reserve: \(error)")
            return .stuck
        }
        var took = 0
        var tried = 0
        let start = Sys.monotonicNanos()
        let budget = UInt64(max(0, options.reservePassBudgetMilliseconds)) * 1_000_000
        for b in eligible(all) {
            guard reserveHasRoom, tried < max(1, options.reserveBlocksPerPass) else { break }
            if tried > 0, Sys.monotonicNanos() - start >= budget { break }
            if Sys.terminationSignalReceived { break }
            if let why = takeStop(reserve: true) {
                lastRound.stoppedBecause = why
                break
            }
            tried += 1
            let before = held.count
            do { try take(b, movablePages: options.reserveMaxMovablePages, timeoutMilliseconds: options.reserveOfflineTimeoutMilliseconds) } catch {
                logger.warning("offline source: reserve pass stopped: \(error)")
                break
            }
            if held.count > before { took += 1 }
        }
        pending = []
        if took > 0 {
            logger.info("offline source: reserve holds \(held.count) block(s), \(heldBytes >> 20) MiB (target \(options.reserveBytes >> 20) MiB)", metadata: [
                "offlined": "\(took)", "offline_ms": "\(lastRound.offlineNanos / 1_000_000)", "scan_ms": "\(lastRound.scanNanos / 1_000_000)",
            ])
        }
        if !reserveHasRoom { return .full }
        return took > 0 ? .grew : .stuck
    }

    /// DONE, reset or shutdown: no hint can be applied any more; every held block goes online.
    public func releaseAll() {
        roundOpen = false
        pending = []
        rehint = []
        candidates = []
        online(held)
        outstanding.retireAll()
    }

    /// Onlines `which` of the held blocks; a block that fails stays held (and listed:
    /// `OfflineBlockLedger.online`). The state file is rewritten even when `which` is empty.
    private func online(_ which: [Int]) {
        ledger.online(which)
    }

    /// Memory pressure: onlines held blocks that no pending hint refers to, highest first,
    /// until about `bytes` are back (a block with a descriptor still out stays offline: the
    /// device may still apply that hint).
    public func releaseUnderPressure(bytes: UInt64) -> UInt64 {
        var chosen: [Int] = []
        var freed: UInt64 = 0
        for b in held.reversed() where freed < max(bytes, 1) && outstanding.outstanding(b) == 0 {
            chosen.append(b)
            freed += blocks.blockBytes
        }
        guard !chosen.isEmpty else { return 0 }
        let before = held.count
        online(chosen)
        let gone = Set(chosen).subtracting(held)
        pending.removeAll { gone.contains(Int($0.start.value / blocks.blockBytes)) }
        rehint.removeAll { gone.contains($0) }
        logger.info("offline source: onlined \(gone.count) held block(s) under memory pressure")
        return UInt64(before - held.count) * blocks.blockBytes
    }

    // MARK: taking blocks

    /// What the owned-memory limits allow now (nil: /proc/meminfo unreadable).
    private func allowance(now: MemorySnapshot) -> MemoryAllowance {
        memoryAllowance(.freeMemory, limits: options.limits, now: now, pressureAtStart: pressureAtRoundStart, heldBytes: heldBytes)
    }

    /// Why no further block may be taken now (the owned-memory limits; for the reserve also its
    /// MemFree floor), or nil. One /proc/meminfo read.
    private func takeStop(reserve: Bool) -> String? {
        guard let now = try? MemorySnapshot.read(root: root, withBuddyInfo: false) else { return "cannot read /proc/meminfo" }
        let a = allowance(now: now)
        if a.bytes < blocks.blockBytes { return "\(a)" }
        if reserve, now.memFree < options.reserveKeepFreeBytes + blocks.blockBytes {
            return "MemFree \(now.memFree >> 20) MiB leaves no block above the reserve's \(options.reserveKeepFreeBytes >> 20) MiB"
        }
        return nil
    }

    /// Whether the reserve has room for one more block.
    private var reserveHasRoom: Bool { heldBytes + blocks.blockBytes <= options.reserveBytes }

    /// Blocks a killed balloond left offline and listed, which crash recovery could not online:
    /// taken over as held (offline, so nobody uses them; this session's device was reset
    /// before any round began, so no old hint can be applied), hinted and onlined at DONE.
    /// Looked at once; the file is rewritten at once, so it names this process.
    private func adoptLeftovers() {
        guard let (adopted, pid) = ledger.adoptLeftovers() else { return }
        logger.notice("offline source: took over memory blocks \(adopted.map(String.init).joined(separator: ",")) left offline by pid \(pid)")
        ledger.record()
    }

    /// Offlines block `b` if it `qualifiesForOffline` (every page free, or up to `movablePages` movable
    /// LRU pages in use), and queues its ranges.
    private func take(_ b: Int, movablePages: Int, timeoutMilliseconds: Int) throws(FreePageSourceError) {
        let t0 = Sys.monotonicNanos()
        let free: Bool
        do { free = try blocks.qualifiesForOffline(b, kpageflags: kpageflags, movablePages: movablePages) } catch { throw error.sourceError }
        lastRound.scanNanos += Sys.monotonicNanos() - t0
        guard free else {
            lastRound.blocksSkippedNotFree += 1
            return
        }
        // The ledger's state file writes and offline write, also when it throws.
        let (state0, offline0) = (ledger.stateNanos, ledger.offlineNanos)
        defer {
            lastRound.stateNanos += ledger.stateNanos - state0
            lastRound.offlineNanos += ledger.offlineNanos - offline0
        }
        let result: MemoryBlockOfflineResult
        do {
            result = try ledger.offline(b, timeoutMilliseconds: timeoutMilliseconds) { result in
                lastRound.blocksFailed += 1
                skipUntilRound[b] = rounds + max(1, options.skipRoundsAfterFailure)
                logger.debug("memory block \(b) not taken: \(result)")
            }
        } catch { throw error.sourceError }
        guard result == .offlined else { return }
        lastRound.blocksOfflined += 1
        if roundOpen, lastRound.firstBlockNanos == nil { lastRound.firstBlockNanos = Sys.monotonicNanos() - roundStartNanos }
        pending += splitBlock(b)
    }

    /// The longest range the driver takes (from its latest `nextBatch`).
    private var lastMaxRangeBytes: UInt64 = 4 << 20

    private func splitBlock(_ b: Int) -> [GuestPhysicalRange] {
        coalesce([blocks.range(of: b)], maxLength: lastMaxRangeBytes)
    }
}
