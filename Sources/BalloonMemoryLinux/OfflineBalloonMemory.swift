import GuestMemoryLinux
import BalloonBlocks
import Logging
import PlatformLinux
import VirtioCore

/// Balloon memory by the memory block: to inflate by a block or more, a block (128 MiB on
/// x86-64) whose pages are free is taken offline through `/sys/devices/system/memory` and goes
/// to the device as 2 MiB pieces; it is onlined again once every piece is deflated.
///
/// Why: every other way to take memory from the guest goes through the page allocator, which
/// zeroes each page it hands out under `init_on_alloc=1` (Debian's default), and hugetlb pages
/// are zeroed a second time when faulted. Under TCG that is 50–100 MB/s: inflating 512 MiB of
/// a 1 GiB guest took 4.2 s of taking memory (hugetlb) against the in-kernel driver's 3.2 s. An
/// offlined block is taken off the free lists and never written.
///
/// Safety (docs/virtio-balloon.md §4: a frame whose PFN went to the device must not be used by
/// anyone until it is deflated):
/// - *Nobody can use an offline page.* Offline memory has no free-list entry and no owner; the
///   kernel hands none of it out until it is onlined, and a block is onlined only when none of
///   its pieces is inflated or in flight (`release` of the last one). So the host can discard
///   every piece the moment it sees its PFNs.
/// - *Offlining moves pages, never loses them.* A block is tried only when a `/proc/kpageflags`
///   read of every page, right before, finds free pages and at most `maxMovablePages` in-use
///   movable LRU pages (page cache, a process's unlocked memory), which the kernel copies to new
///   frames (their owners keep the contents). balloond's own pages (ring, DMA, balloon and
///   report pages) are mlocked or hugetlb pages, never movable LRU pages, so a block holding
///   one is never tried; nor is one holding kernel memory.
/// - *Bounded.* The kernel retries migration until a signal arrives; the write is interrupted
///   after `offlineTimeoutMilliseconds` and the block stays online.
/// - *Deflating gives whole blocks back.* A block can only be onlined whole: `releaseGroup`
///   tells the driver that its pieces go back together, so a deflate (also under memory
///   pressure) that touches one piece deflates the block's others too, and the memory really
///   returns to the guest.
/// - *Nothing left over.* A block is taken only while the driver's plan (`planInflate`) still
///   wants all of it. If the target falls during an inflate, pieces never sent stay offline as
///   spares: reused first by the next inflate, onlined with the rest of the block.
/// - *Killed.* Each block is listed in its state file (`OfflineBlockStateFile.balloonPath`)
///   before it is offlined and removed after it is online again (`OfflineBlockLedger`); the guardian (after its device
///   reset) or the next start onlines what a killed balloond left offline. The guest then reuses
///   memory the host discarded, which it may: MUST_TELL_HOST is never negotiated.
public final class OfflineBalloonMemory: BalloonMemory {
    public let name = "offline"

    public struct Options: Hashable, Sendable {
        /// A block may hold up to this many in-use movable LRU pages (copied away by offlining).
        public var maxMovablePages: Int
        /// The longest one block's offlining may take before it is interrupted.
        public var offlineTimeoutMilliseconds: Int
        /// The longest one `take` goes on trying blocks (it may try several).
        public var takeBudgetMilliseconds: Int
        /// A block that failed to go offline, or did not qualify, is not tried again for this
        /// long; each further failure of the same block doubles the wait, up to
        /// `maxRetryBlockAfterSeconds` (a block that went offline starts over). Each try reads
        /// the block's page flags, so a guest whose blocks stay unsuitable (while the balloon
        /// is short of its target after memory pressure) is not re-read every minute.
        public var retryBlockAfterSeconds: Int
        public var maxRetryBlockAfterSeconds: Int
        /// After no block could be taken, none is looked for again for this long (the other
        /// balloon memory serves meanwhile), doubling while searches keep finding none, up to
        /// `maxRetryAfterNoBlockSeconds`.
        public var retryAfterNoBlockSeconds: Int
        public var maxRetryAfterNoBlockSeconds: Int
        public init(maxMovablePages: Int = 2048, offlineTimeoutMilliseconds: Int = 500, takeBudgetMilliseconds: Int = 300,
                    retryBlockAfterSeconds: Int = 60, maxRetryBlockAfterSeconds: Int = 1800,
                    retryAfterNoBlockSeconds: Int = 30, maxRetryAfterNoBlockSeconds: Int = 600) {
            self.maxMovablePages = maxMovablePages
            self.offlineTimeoutMilliseconds = offlineTimeoutMilliseconds
            self.takeBudgetMilliseconds = takeBudgetMilliseconds
            self.retryBlockAfterSeconds = retryBlockAfterSeconds
            self.maxRetryBlockAfterSeconds = maxRetryBlockAfterSeconds
            self.retryAfterNoBlockSeconds = retryAfterNoBlockSeconds
            self.maxRetryAfterNoBlockSeconds = maxRetryAfterNoBlockSeconds
        }
    }

    public let root: SysRoot
    public let options: Options
    public var stateFile: OfflineBlockStateFile { ledger.stateFile }
    private let blocks: MemoryBlockControl
    /// The state file and the blocks it records: every held block and every leftover.
    private let ledger: OfflineBlockLedger
    private let kpageflags: KPageFile
    private let budget: BalloonMemoryBudget
    private let logger: Logger
    /// Monotonic nanoseconds (injected by tests, which run in virtual time).
    private let now: () -> UInt64

    /// One offline block: its 2 MiB pieces handed to the driver, and the others (spares).
    private struct Held {
        var handedOut: Set<Int> = []
        var spares: [Int]
    }
    private var held: [Int: Held] = [:]
    /// See `adoptLeftovers`.
    private var leftovers: [Int] = []
    /// Pages the driver still wants in this inflate (`planInflate`).
    private var planned = 0
    /// When each block that failed may be tried again, and its waits (`backOff(block:now:)`).
    private var retryBlockAt: [Int: UInt64] = [:]
    private var retryBlockWait: [Int: Backoff] = [:]
    /// When a search for a block is next made after one found none, and its waits.
    private var retrySearchAt: UInt64 = 0
    private var retrySearchWait: Backoff
    /// Blocks offlined since start, and their offlining time (for status and the benchmark).
    public private(set) var blocksOfflined = 0
    public var offlineNanos: UInt64 { ledger.offlineNanos }

    private var piecesPerBlock: Int { Int(blocks.blockBytes / balloonHugeBlockSize) }
    private var pagesPerBlock: Int { Int(blocks.blockBytes / balloonPageSize) }

    /// Bytes of the blocks held offline (pieces inflated, in flight, or spare).
    public var heldBytes: UInt64 { UInt64(held.count) * blocks.blockBytes }
    /// Bytes held offline but not given to the driver.
    public var spareBytes: UInt64 { UInt64(held.values.reduce(0) { $0 + $1.spares.count }) * balloonHugeBlockSize }

    /// - Parameters:
    ///   - control: the memory blocks (default: `/sys/devices/system/memory` under `root`).
    ///   - budget: the limits and held bytes shared with the other balloon memory.
    public init(root: SysRoot = .host, control: MemoryBlockControl? = nil, budget: BalloonMemoryBudget, options: Options = Options(),
                stateFile: OfflineBlockStateFile? = nil, logger: Logger = Logger(label: "balloond.balloon.offline"),
                now: @escaping () -> UInt64 = { Sys.monotonicNanos() }) throws(BalloonMemoryError) {
        self.root = root
        self.now = now
        self.budget = budget
        self.options = options
        self.retrySearchWait = Self.backoff(firstSeconds: options.retryAfterNoBlockSeconds, maxSeconds: options.maxRetryAfterNoBlockSeconds)
        self.logger = logger
        do throws(GuestMemoryError) {
            if let control { blocks = control } else { blocks = try LinuxMemoryBlocks(root: root) }
            kpageflags = try KPageFile(path: root.path("/proc/kpageflags"), chunkEntries: 4096)
        } catch { throw .failed(error) }
        ledger = OfflineBlockLedger(stateFile: stateFile ?? OfflineBlockStateFile(root: root, path: OfflineBlockStateFile.balloonPath),
                                    control: blocks, logger: logger)
        guard blocks.blockBytes % balloonHugeBlockSize == 0, blocks.blockBytes >= balloonHugeBlockSize,
              blocks.blockBytes / balloonHugeBlockSize <= 1 << 16 else {
            throw .failed(GuestMemoryError.malformedFile(path: root.path("/sys/devices/system/memory/block_size_bytes"),
                                                         reason: "a block of \(blocks.blockBytes) bytes is not a whole number of 2 MiB pieces"))
        }
    }

    /// Blocks a killed balloond left listed and offline, which crash recovery (after the device
    /// reset, so after this object was made) could not online: kept listed, never taken, and
    /// tried again at `releaseAll`. Looked at once, when this memory first offlines a block.
    /// The file is not rewritten now: it lists them already, and the next write keeps them.
    private func adoptLeftovers() {
        leftovers = ledger.adoptLeftovers()?.blocks ?? []
    }

    deinit { releaseAll() }

    // MARK: BalloonMemory

    public func planInflate(pages: Int) {
        planned = max(0, pages)
        // Blocks none of whose pieces the driver has, and which the plan no longer covers.
        let unused = held.filter { $0.value.handedOut.isEmpty && $0.value.spares.count * balloonPagesPerHugeBlock > planned }.map(\.key)
        if !unused.isEmpty { online(unused) }
    }

    public func take(maxPages: Int, hugeOnly: Bool) throws(BalloonMemoryError) -> BalloonTake {
        // Free page reporting holds 2 MiB blocks one by one: not this memory's unit.
        guard !hugeOnly else { return BalloonTake(blocks: [], limitedBy: "offline memory blocks only inflate") }
        var room = max(0, maxPages) / balloonPagesPerHugeBlock
        var out: [BalloonBlock] = []
        func handOut() {
            for b in held.keys.sorted(by: >) where room > 0 {
                while room > 0, let p = held[b]?.spares.popLast() {
                    held[b]?.handedOut.insert(p)
                    out.append(piece(p, of: b))
                    room -= 1
                    planned -= min(planned, balloonPagesPerHugeBlock)
                }
            }
        }
        handOut()
        var limitedBy: String?
        if room > 0, planned >= pagesPerBlock {
            budget.beginTaking()
            defer { budget.endTaking() }
            let start = now()
            let pressureAtStart = (try? budget.snapshot())?.pressure
            while room > 0, planned >= pagesPerBlock {
                let stop: String?
                do { stop = try offlineOneBlock(startedAt: start, pressureAtStart: pressureAtStart) } catch {
                    // Pieces already handed out are the caller's: return them, throw next time.
                    if out.isEmpty { throw error }
                    logger.error("offline balloon memory: \(error)")
                    limitedBy = error.description
                    break
                }
                if let why = stop {
                    limitedBy = why
                    break
                }
                handOut()
            }
        } else if room > 0 {
            limitedBy = "offline memory blocks are taken only while the inflate still wants a whole block (\(pagesPerBlock) pages); \(planned) planned"
        }
        return BalloonTake(blocks: out, limitedBy: room > 0 ? limitedBy : nil)
    }

    public func stillInPlace(_ block: BalloonBlock) -> Bool {
        guard let (b, p) = decode(block.handle), held[b]?.handedOut.contains(p) == true,
              block.ranges == piece(p, of: b).ranges else { return false }
        return blocks.isOffline(b) == true
    }

    public func release(_ released: [BalloonBlock]) {
        var touched: Set<Int> = []
        for block in released {
            guard let (b, p) = decode(block.handle), held[b]?.handedOut.remove(p) != nil else { continue }
            held[b]?.spares.append(p)
            touched.insert(b)
        }
        let whole = touched.filter { held[$0]?.handedOut.isEmpty == true }
        if !whole.isEmpty { online(Array(whole)) }
    }

    public func releaseAll() {
        online(Array(held.keys) + leftovers.filter { blocks.isOffline($0) == true })
        planned = 0
    }

    public func releaseGroup(of block: BalloonBlock) -> UInt64? {
        guard let (b, _) = decode(block.handle), held[b] != nil else { return nil }
        return UInt64(b)
    }

    public func strandedGroups() -> [UInt64] {
        held.filter { !$0.value.handedOut.isEmpty && !$0.value.spares.isEmpty }.keys.sorted().map { UInt64($0) }
    }

    // MARK: blocks

    private func piece(_ p: Int, of b: Int) -> BalloonBlock {
        let start = blocks.range(of: b).start.value + UInt64(p) * balloonHugeBlockSize
        return BalloonBlock(handle: UInt64(b) << 16 | UInt64(p), ranges: [GuestPhysicalRange(start: start, length: balloonHugeBlockSize)])
    }

    private func decode(_ handle: UInt64) -> (Int, Int)? {
        guard handle >> 48 == 0 else { return nil }
        let p = Int(handle & 0xffff)
        guard p < piecesPerBlock else { return nil }
        return (Int(handle >> 16), p)
    }

    /// Takes one more block offline, lowest address first; nil when it did, else why not. Low
    /// first: the page allocator hands out boot memory from the bottom up, so low blocks are
    /// the ones the guest has used (resident on the host: an inflate there gives the host
    /// memory back at once, where a never-touched block gives it nothing now), and the hint
    /// reserve keeps the top blocks, which QEMU's migration sends last.
    private func offlineOneBlock(startedAt start: UInt64, pressureAtStart: MemoryPressure?) throws(BalloonMemoryError) -> String? {
        let now = self.now()
        if now < retrySearchAt { return "no memory block could be taken offline a moment ago" }
        adoptLeftovers()
        let snapshot: MemorySnapshot
        do { snapshot = try budget.snapshot() } catch { throw error.balloonError }
        let allowance = budget.allowance(now: snapshot, pressureAtStart: pressureAtStart)
        guard allowance.bytes >= blocks.blockBytes else { return "allowance \(allowance) is less than a memory block" }
        let candidates: [Int]
        do { candidates = try blocks.offlinableBlocks() } catch { throw .failed(error) }
        let budgetNanos = UInt64(max(0, options.takeBudgetMilliseconds)) * 1_000_000
        for b in candidates.sorted() where held[b] == nil && !leftovers.contains(b) && (retryBlockAt[b] ?? 0) <= now {
            if self.now() - start >= budgetNanos { return "out of time for offlining memory blocks in this step" }
            if Sys.terminationSignalReceived { return "a termination signal arrived" }
            let qualifies: Bool
            do { qualifies = try blocks.qualifiesForOffline(b, kpageflags: kpageflags, movablePages: options.maxMovablePages) } catch { throw .failed(error) }
            guard qualifies else {
                backOff(block: b, now: now)
                continue
            }
            let result: MemoryBlockOfflineResult
            do {
                result = try ledger.offline(b, timeoutMilliseconds: options.offlineTimeoutMilliseconds) { result in
                    logger.debug("memory block \(b) not taken for the balloon: \(result)")
                    backOff(block: b, now: now)
                }
            } catch { throw .failed(error) }
            guard result == .offlined else { continue }
            held[b] = Held(spares: Array((0..<piecesPerBlock).reversed()))
            budget.took(blocks.blockBytes)
            blocksOfflined += 1
            retryBlockAt[b] = nil
            retryBlockWait[b] = nil
            retrySearchWait.reset()
            return nil
        }
        retrySearchAt = now + Self.nanoseconds(retrySearchWait.next())
        return "no memory block has only free and at most \(options.maxMovablePages) movable pages and goes offline"
    }

    /// Block `b` failed (did not qualify, or did not go offline): not tried again for
    /// `retryBlockAfterSeconds`, twice as long after each further failure, up to
    /// `maxRetryBlockAfterSeconds`.
    private func backOff(block b: Int, now: UInt64) {
        let fresh = Self.backoff(firstSeconds: options.retryBlockAfterSeconds, maxSeconds: options.maxRetryBlockAfterSeconds)
        retryBlockAt[b] = now + Self.nanoseconds(retryBlockWait[b, default: fresh].next())
    }

    /// Waits of `firstSeconds` doubling up to `maxSeconds` (negative options count as 0).
    private static func backoff(firstSeconds: Int, maxSeconds: Int) -> Backoff {
        Backoff(first: .seconds(max(0, firstSeconds)), cap: .seconds(max(0, maxSeconds)))
    }

    /// `wait` on this memory's clock (monotonic nanoseconds).
    private static func nanoseconds(_ wait: Duration) -> UInt64 {
        UInt64(wait.whole(.nanoseconds(1)))
    }

    /// Onlines `which` (held blocks or leftovers); a block that fails stays offline and listed
    /// (`OfflineBlockLedger.online`), and stays held.
    private func online(_ which: [Int]) {
        guard !which.isEmpty else { return }
        ledger.online(which) { b in
            if held.removeValue(forKey: b) != nil { budget.released(blocks.blockBytes) }
            leftovers.removeAll { $0 == b }
        }
    }
}

/// Offline memory blocks first, the other balloon memory for the rest (`offline+...`): an
/// inflate that still wants a whole block or more gets it from `offline`; the remainder, free
/// page reporting's 2 MiB blocks, and everything once `offline` throws come from `rest`.
///
/// Each block's handle says which backend owns it (bit 62 set: `offline`), so `release`,
/// `stillInPlace` and `releaseGroup` go to that backend with its own handle. Safety: it adds
/// nothing of its own; each backend keeps its rules for its blocks, and the two hold disjoint
/// frames (an offline block is no allocator's, so `rest` can never take its frames).
public final class OfflineFirstBalloonMemory: BalloonMemory {
    public let offline: BalloonMemory
    public let rest: BalloonMemory
    private let logger: Logger
    /// Why `offline` is no longer used, once it threw.
    public private(set) var offlineDisabledBecause: BalloonMemoryError?

    static let offlineTag: UInt64 = 1 << 62

    public init(offline: BalloonMemory, rest: BalloonMemory, logger: Logger = Logger(label: "balloond.balloon")) {
        self.offline = offline
        self.rest = rest
        self.logger = logger
    }

    public var name: String { "\(offline.name)+\(rest.name)" }
    public var heldBytes: UInt64 { offline.heldBytes + rest.heldBytes }

    public func planInflate(pages: Int) {
        // Even once it failed: a block none of whose pieces went out goes back online.
        offline.planInflate(pages: pages)
        rest.planInflate(pages: pages)
    }

    public func take(maxPages: Int, hugeOnly: Bool) throws(BalloonMemoryError) -> BalloonTake {
        var blocks: [BalloonBlock] = []
        if !hugeOnly, offlineDisabledBecause == nil {
            do { blocks = try offline.take(maxPages: maxPages, hugeOnly: false).blocks.map(Self.tagOffline) } catch {
                // Blocks it already gave stay the driver's (the device may hold their PFNs):
                // they go back through `release` as usual; only new takes stop.
                offlineDisabledBecause = error
                logger.error("offline balloon memory cannot be used, using \(rest.name) only from now on: \(error)")
            }
        }
        let got = blocks.reduce(0) { $0 + $1.pageCount }
        guard got < maxPages else { return BalloonTake(blocks: blocks) }
        let t: BalloonTake
        do { t = try rest.take(maxPages: maxPages - got, hugeOnly: hugeOnly) } catch {
            if blocks.isEmpty { throw error }
            return BalloonTake(blocks: blocks, limitedBy: "\(rest.name): \(error)")
        }
        return BalloonTake(blocks: blocks + t.blocks, limitedBy: t.limitedBy)
    }

    public func stillInPlace(_ block: BalloonBlock) -> Bool {
        if let own = Self.untagOffline(block) { return offline.stillInPlace(own) }
        return rest.stillInPlace(block)
    }

    public func release(_ blocks: [BalloonBlock]) {
        let mine = blocks.compactMap(Self.untagOffline)
        if !mine.isEmpty { offline.release(mine) }
        let others = blocks.filter { $0.handle & Self.offlineTag == 0 }
        if !others.isEmpty { rest.release(others) }
    }

    public func releaseAll() {
        offline.releaseAll()
        rest.releaseAll()
    }

    public func releaseGroup(of block: BalloonBlock) -> UInt64? {
        // Groups of `offline` only (bit 62 set, like its handles); `rest`'s never collide.
        if let own = Self.untagOffline(block) { return offline.releaseGroup(of: own).map { $0 | Self.offlineTag } }
        return rest.releaseGroup(of: block)
    }

    public func strandedGroups() -> [UInt64] {
        offline.strandedGroups().map { $0 | Self.offlineTag } + rest.strandedGroups()
    }

    private static func tagOffline(_ b: BalloonBlock) -> BalloonBlock { BalloonBlock(handle: b.handle | offlineTag, ranges: b.ranges) }
    private static func untagOffline(_ b: BalloonBlock) -> BalloonBlock? {
        b.handle & offlineTag == 0 ? nil : BalloonBlock(handle: b.handle & ~offlineTag, ranges: b.ranges)
    }
}
