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
///   So a block is offlined only when a full `/proc/kpageflags` read of it, right before,
///   finds *every* page a free buddy page (balloond's pages are allocated, so never), and
///   balloond takes no memory between the read and the offline (the driver's one event-loop
///   thread runs both, and inflating, reporting and DMA allocation run on it too). Blocks
///   overlapping `protectedRanges` (the ring's hugepage) are never considered.
/// - *Bounded.* The kernel retries migration until a signal arrives; the write is interrupted
///   by a timer after `offlineTimeoutMilliseconds` (EINTR: the kernel undoes the isolation and
///   the block stays online). Blocks that failed are skipped for `skipRoundsAfterFailure` rounds.
/// - *Killed.* Each block is listed in `OfflineBlockStateFile` before it is offlined and removed
///   after it is online again; the next start onlines what a killed balloond left offline.
///   Until then the memory is missing, never reused while the device may act on it.
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
        public init(limits: OwnedMemoryLimits = OwnedMemoryLimits(), offlineTimeoutMilliseconds: Int = 200, skipRoundsAfterFailure: Int = 8) {
            self.limits = limits
            self.offlineTimeoutMilliseconds = offlineTimeoutMilliseconds
            self.skipRoundsAfterFailure = skipRoundsAfterFailure
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
        public var stoppedBecause: String?
    }

    public let root: SysRoot
    public let options: Options
    public let stateFile: OfflineBlockStateFile
    private let blocks: MemoryBlockControl
    private let kpageflags: KPageFile
    private let protectedRanges: () -> [GuestPhysicalRange]
    private let logger: Logger

    /// Blocks balloond holds offline (ascending).
    public private(set) var held: [Int] = []
    private var candidates: [Int] = []
    /// Held blocks to hint again this round (split when handed out).
    private var rehint: [Int] = []
    private var leftoversAdopted = false
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
        self.stateFile = stateFile ?? OfflineBlockStateFile(root: root)
        self.protectedRanges = protectedRanges
        self.logger = logger
        do throws(GuestMemoryError) {
            if let control { blocks = control } else { blocks = try LinuxMemoryBlocks(root: root) }
            kpageflags = try KPageFile(path: root.path("/proc/kpageflags"), chunkEntries: 4096)
        } catch { throw error.sourceError }
        guard blocks.blockBytes % balloonPageSize == 0, blocks.blockBytes >= 2 << 20 else {
            throw .failed(LinuxHintSourceError.blockSizeNotHugeMultiple(blocks.blockBytes))
        }
    }

    // MARK: FreePageSource

    public func beginRound(id: UInt32) throws(FreePageSourceError) {
        rounds += 1
        roundOpen = true
        lastRound = RoundStatistics()
        pressureAtRoundStart = (try? MemorySnapshot.read(root: root, withBuddyInfo: false))?.pressure
        adoptLeftovers()
        // A held block someone else onlined is no longer ours to hint.
        let lost = held.filter { blocks.isOffline($0) != true }
        if !lost.isEmpty {
            logger.warning("memory blocks \(lost.map(String.init).joined(separator: ",")) were onlined by someone else while balloond held them offline; not hinting them again")
            held.removeAll { lost.contains($0) }
            do { try stateFile.write(blocks: held) } catch { logger.error("cannot update \(stateFile.path): \(error)") }
        }
        if !held.isEmpty, let allowance = allowance(), allowance.bytes == 0 {
            // The guest is short of memory: give back what no descriptor still refers to.
            let idle = held.filter { outstanding.outstanding($0) == 0 }
            logger.info("offline source: the guest is short of memory at the start of a round (\(allowance)); onlining \(idle.count) held block(s)")
            online(idle)
        }
        // Held blocks first: re-hinted at once, nothing to take.
        pending = []
        rehint = held
        lastRound.blocksRehinted = held.count
        let all: [Int]
        let t0 = Sys.monotonicNanos()
        do { all = try blocks.offlinableBlocks() } catch {
            roundOpen = false
            throw error.sourceError
        }
        lastRound.listNanos = Sys.monotonicNanos() - t0
        let protected = protectedRanges()
        candidates = all.filter { b in
            if held.contains(b) { return false }
            if let until = skipUntilRound[b], rounds < until { return false }
            let r = blocks.range(of: b)
            return !protected.contains { $0.start.value < r.end && r.start.value < $0.end }
        }
    }

    public func nextBatch(maxRanges: Int, maxRangeBytes: UInt64) throws(FreePageSourceError) -> [GuestPhysicalRange] {
        guard roundOpen, maxRanges > 0 else { return [] }
        lastMaxRangeBytes = max(balloonPageSize, maxRangeBytes)
        if pending.isEmpty, !rehint.isEmpty {
            pending = rehint.flatMap { splitBlock($0) }
            rehint = []
        }
        while pending.isEmpty, !candidates.isEmpty {
            let b = candidates.removeFirst()
            if Sys.terminationSignalReceived {
                lastRound.stoppedBecause = "a termination signal arrived"
                candidates = []
                break
            }
            if let why = allowanceStop() {
                lastRound.stoppedBecause = why
                candidates = []
                logger.debug("offline source stops taking blocks this round: \(why)")
                break
            }
            try take(b)
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
                "offline_ms": "\(lastRound.offlineNanos / 1_000_000)", "stopped": "\(lastRound.stoppedBecause ?? "-")",
            ])
        }
        roundOpen = false
        pending = []
        rehint = []
        candidates = []
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

    /// Onlines `which` of the held blocks; a block that fails stays held (and listed).
    private func online(_ which: [Int]) {
        var failed: Set<Int> = []
        for b in which {
            do { try blocks.online(b) } catch {
                logger.error("\(error); it stays offline and listed in \(stateFile.path) for the next start")
                failed.insert(b)
            }
        }
        let gone = Set(which).subtracting(failed)
        held.removeAll { gone.contains($0) }
        do { try stateFile.write(blocks: held) } catch { logger.error("cannot update \(stateFile.path): \(error)") }
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
    private func allowance() -> MemoryAllowance? {
        guard let now = try? MemorySnapshot.read(root: root, withBuddyInfo: false) else { return nil }
        return memoryAllowance(.freeMemory, limits: options.limits, now: now, pressureAtStart: pressureAtRoundStart, heldBytes: heldBytes)
    }

    /// Why no further block may be taken now (the owned-memory limits), or nil.
    private func allowanceStop() -> String? {
        guard let a = allowance() else { return "cannot read /proc/meminfo" }
        return a.bytes >= blocks.blockBytes ? nil : "\(a)"
    }

    /// Blocks a killed balloond left offline and listed, which crash recovery could not online:
    /// taken over as held (offline, so nobody uses them; this session's device was reset
    /// before any round began, so no old hint can be applied), hinted and onlined at DONE.
    private func adoptLeftovers() {
        guard !leftoversAdopted else { return }
        leftoversAdopted = true
        guard let c = try? stateFile.read(), c.pid != Sys.processID,
              !stateWriterIsAlive(root: root, pid: c.pid, comm: c.comm) else { return }
        let adopted = c.blocks.filter { blocks.isOffline($0) == true && !held.contains($0) }
        guard !adopted.isEmpty else { return }
        held = (held + adopted).sorted()
        logger.notice("offline source: took over memory blocks \(adopted.map(String.init).joined(separator: ",")) left offline by pid \(c.pid)")
        do { try stateFile.write(blocks: held) } catch { logger.error("cannot update \(stateFile.path): \(error)") }
    }

    /// Offlines block `b` if every page of it is free, and queues its ranges.
    private func take(_ b: Int) throws(FreePageSourceError) {
        let t0 = Sys.monotonicNanos()
        let free: Bool
        do { free = try wholeBlockFree(b) } catch { throw error.sourceError }
        let t1 = Sys.monotonicNanos()
        lastRound.scanNanos += t1 - t0
        guard free else {
            lastRound.blocksSkippedNotFree += 1
            return
        }
        do { try stateFile.write(blocks: held + [b]) } catch { throw error.sourceError }
        let result = blocks.offline(b, timeoutMilliseconds: options.offlineTimeoutMilliseconds)
        lastRound.offlineNanos += Sys.monotonicNanos() - t1
        guard result == .offlined else {
            lastRound.blocksFailed += 1
            skipUntilRound[b] = rounds + max(1, options.skipRoundsAfterFailure)
            logger.debug("memory block \(b) not taken: \(result)")
            do { try stateFile.write(blocks: held) } catch { throw error.sourceError }
            return
        }
        held.append(b)
        held.sort()
        lastRound.blocksOfflined += 1
        pending += splitBlock(b)
    }

    /// The longest range the driver takes (from its latest `nextBatch`).
    private var lastMaxRangeBytes: UInt64 = 4 << 20

    private func splitBlock(_ b: Int) -> [GuestPhysicalRange] {
        coalesce([blocks.range(of: b)], maxLength: lastMaxRangeBytes)
    }

    /// Whether every page of block `b` is a free buddy page: a quick look at one page per
    /// 2 MiB first (most used blocks fail it), then every page.
    private func wholeBlockFree(_ b: Int) throws(GuestMemoryError) -> Bool {
        let pages = blocks.blockBytes / balloonPageSize
        let first = UInt64(b) * pages
        for pfn in stride(from: first, to: first + pages, by: 512) {
            guard let e = try kpageflags.entry(pfn: pfn), KPageFlags(rawValue: e).isFreeBuddy else { return false }
        }
        var pfn = first
        while pfn < first + pages {
            let want = Int(min(UInt64(kpageflags.chunkEntries), first + pages - pfn))
            let (n, allFree) = try kpageflags.read(startPFN: pfn, count: want) { entries in
                for i in entries.indices where !KPageFlags(rawValue: UInt64(littleEndian: entries[i])).isFreeBuddy { return false }
                return true
            }
            if n == 0 || !allFree { return false }
            pfn += UInt64(n)
        }
        return true
    }
}
