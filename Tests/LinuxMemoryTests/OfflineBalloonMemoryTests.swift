#if canImport(Glibc)
import Glibc
#endif
import PlatformLinux
import TestSupport
import Testing
@testable import GuestMemoryLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import VirtioCore

/// Inflating with whole offline memory blocks (`OfflineBalloonMemory`) and its place in front
/// of the page-allocator memory (`OfflineFirstBalloonMemory`).
@Suite struct OfflineBalloonMemoryTests {
    /// 8 MiB blocks in tests: 2048 pages, four 2 MiB pieces.
    static let blockPages = 2048
    static let blockBytes = UInt64(blockPages) * 4096
    static let free = KPageFlags.buddy.rawValue
    static let statePath = OfflineBlockStateFile.balloonPath

    struct Setup {
        let tree = FakeTree()
        let blocks: FakeMemoryBlocks
        let budget: BalloonMemoryBudget

        /// `n` blocks of free pages; `flags` overrides single PFNs.
        init(blocks n: Int, flags: [Int: UInt64] = [:], availableMiB: Int = 4096) {
            blocks = FakeMemoryBlocks(blockBytes: OfflineBalloonMemoryTests.blockBytes, present: Array(0..<n))
            var all = [UInt64](repeating: OfflineBalloonMemoryTests.free, count: n * OfflineBalloonMemoryTests.blockPages)
            for (pfn, f) in flags { all[pfn] = f }
            tree.u64File("/proc/kpageflags", all)
            tree.file("/proc/meminfo", "MemTotal: \(8 << 20) kB\nMemFree: \(availableMiB << 10) kB\nMemAvailable: \(availableMiB << 10) kB\n")
            tree.file("/proc/self/oom_score_adj", "0\n")
            tree.directory("/run/balloond")
            _ = chmod(tree.at("/run/balloond"), 0o700)
            let t = tree
            blocks.readState = { t.read(OfflineBalloonMemoryTests.statePath) }
            budget = BalloonMemoryBudget(root: tree.root, limits: OwnedMemoryLimits(marginBytes: 64 << 20, marginFractionOfTotal: 0))
        }

        func memory(_ options: OfflineBalloonMemory.Options = .init()) throws -> OfflineBalloonMemory {
            try OfflineBalloonMemory(root: tree.root, control: blocks, budget: budget, options: options)
        }
    }

    func piece(_ block: Int, _ p: Int) -> GuestPhysicalRange {
        GuestPhysicalRange(start: UInt64(block) * Self.blockBytes + UInt64(p) * (2 << 20), length: 2 << 20)
    }

    @Test func takesABlockOnlyWhileTheInflateStillWantsAllOfIt() throws {
        let s = Setup(blocks: 3)
        let m = try s.memory()
        m.planInflate(pages: Self.blockPages - 1)
        let none = try m.take(maxPages: 1024, hugeOnly: false)
        #expect(none.blocks.isEmpty && s.blocks.offlineCalls.isEmpty, "a block the inflate cannot use whole would be left offline")
        m.planInflate(pages: Self.blockPages)
        let first = try m.take(maxPages: 1024, hugeOnly: false)
        #expect(s.blocks.offlineCalls == [0], "the lowest block first")
        #expect(first.blocks.map(\.ranges) == [[piece(0, 0)], [piece(0, 1)]], "2 MiB pieces, in address order, as many as asked")
        #expect(first.blocks.allSatisfy { $0.isHuge })
        let second = try m.take(maxPages: 4096, hugeOnly: false)
        #expect(second.blocks.map(\.ranges) == [[piece(0, 2)], [piece(0, 3)]], "the rest of the block, no second block: the plan is used up")
        #expect(s.blocks.offlineCalls == [0])
        #expect(m.heldBytes == Self.blockBytes && m.spareBytes == 0)
        #expect(s.budget.heldBytes == Self.blockBytes, "counted against the shared owned-memory cap")
    }

    @Test func neverOfflinesABlockWithAnUnmovablePageButCopiesAFewMovableOnes() throws {
        // Block 0: one slab page (kernel memory). Block 1: a locked page. Block 2: two
        // page-cache pages (movable).
        let slab = KPageFlags.slab.rawValue
        let cache = KPageFlags([.lru, .uptodate]).rawValue
        let mlocked = KPageFlags([.lru, .mlocked]).rawValue
        let s = Setup(blocks: 4, flags: [7: slab, 2 * Self.blockPages + 3: cache, 2 * Self.blockPages + 900: cache,
                                         Self.blockPages + 11: mlocked])
        let m = try s.memory()
        m.planInflate(pages: 2 * Self.blockPages)
        let t = try m.take(maxPages: 2 * Self.blockPages, hugeOnly: false)
        #expect(s.blocks.offlineCalls == [2, 3], "block 1 holds a locked page (like balloond's own) and block 0 kernel memory: never offered to the kernel")
        #expect(t.pageCount == 2 * Self.blockPages)
        let strict = Setup(blocks: 2, flags: [Self.blockPages + 3: cache])
        let none = try strict.memory(.init(maxMovablePages: 0))
        none.planInflate(pages: Self.blockPages)
        _ = try none.take(maxPages: Self.blockPages, hugeOnly: false)
        #expect(strict.blocks.offlineCalls == [0], "with no movable pages allowed, only wholly free blocks")
    }

    @Test func aBlockIsListedBeforeItsOfflineWriteAndUnlistedOnceOnline() throws {
        let s = Setup(blocks: 2)
        let m = try s.memory()
        m.planInflate(pages: Self.blockPages)
        let t = try m.take(maxPages: Self.blockPages, hugeOnly: false)
        #expect(s.blocks.stateAtOffline == [s.tree.read(Self.statePath)], "a SIGKILL right after the write must leave the block listed")
        #expect(s.tree.read(Self.statePath)?.contains("blocks=0\n") == true)
        #expect(s.tree.read(OfflineBlockStateFile.defaultPath) == nil, "the hint source's list is not touched")
        m.release(t.blocks)
        #expect(s.blocks.onlineCalls == [0])
        #expect(s.tree.read(Self.statePath) == nil)
    }

    @Test func aBlockComesBackOnlineOnlyWhenEveryPieceIsDeflated() throws {
        let s = Setup(blocks: 2)
        let m = try s.memory()
        m.planInflate(pages: Self.blockPages)
        let t = try m.take(maxPages: Self.blockPages, hugeOnly: false)
        let groups = Set(t.blocks.compactMap { m.releaseGroup(of: $0) })
        #expect(groups == [0], "every piece names its block as its group")
        m.release(Array(t.blocks.prefix(3)))
        #expect(s.blocks.onlineCalls.isEmpty, "the device may still hold the fourth piece as inflated")
        #expect(m.spareBytes == 3 * (2 << 20))
        #expect(m.stillInPlace(t.blocks[3]) && !m.stillInPlace(t.blocks[0]))
        m.release([t.blocks[3]])
        #expect(s.blocks.onlineCalls == [0])
        #expect(m.heldBytes == 0 && s.budget.heldBytes == 0)
        #expect(m.releaseGroup(of: t.blocks[0]) == nil)
    }

    @Test func sparePiecesAreReusedFirstAndABlockThePlanNoLongerCoversGoesBackOnline() throws {
        let s = Setup(blocks: 3)
        let m = try s.memory()
        m.planInflate(pages: Self.blockPages)
        let t = try m.take(maxPages: 1024, hugeOnly: false)
        #expect(t.pageCount == 1024)
        #expect(m.strandedGroups() == [0], "half the block is the driver's, half was never handed out")
        // The target fell: the rest of the block is spare; the next inflate gets it first.
        m.planInflate(pages: 512)
        let again = try m.take(maxPages: 512, hugeOnly: false)
        #expect(again.blocks.map(\.ranges) == [[piece(0, 2)]])
        #expect(s.blocks.offlineCalls == [0])
        // A block none of whose pieces the driver has goes online once the plan drops below it.
        m.release(t.blocks + again.blocks)
        #expect(s.blocks.onlineCalls == [0])
        m.planInflate(pages: Self.blockPages)
        _ = try m.take(maxPages: 0, hugeOnly: false)
        m.planInflate(pages: 0)
        #expect(m.heldBytes == 0)
    }

    @Test func freePageReportingNeverGetsOfflineMemory() throws {
        let s = Setup(blocks: 2)
        let m = try s.memory()
        m.planInflate(pages: 10 * Self.blockPages)
        let t = try m.take(maxPages: 512, hugeOnly: true)
        #expect(t.blocks.isEmpty && s.blocks.offlineCalls.isEmpty)
    }

    @Test func aBlockThatFailsToGoOfflineIsSkippedAndUnlisted() throws {
        let s = Setup(blocks: 3)
        s.blocks.refuse[0] = .busy
        s.blocks.refuse[1] = .timedOut(milliseconds: 500)
        let m = try s.memory()
        m.planInflate(pages: Self.blockPages)
        let t = try m.take(maxPages: Self.blockPages, hugeOnly: false)
        #expect(s.blocks.offlineCalls == [0, 1, 2])
        #expect(t.pageCount == Self.blockPages)
        #expect(s.tree.read(Self.statePath)?.contains("blocks=2\n") == true, "blocks that stayed online are not listed")
        m.release(t.blocks)
        m.planInflate(pages: Self.blockPages)
        _ = try m.take(maxPages: Self.blockPages, hugeOnly: false)
        #expect(s.blocks.offlineCalls == [0, 1, 2, 2], "the failed blocks wait before they are tried again")
    }

    @Test func aBlockThatKeepsFailingIsTriedLessAndLessOftenButNotGivenUp() throws {
        let s = Setup(blocks: 2)
        s.blocks.refuse = [0: .busy, 1: .busy]
        var clock: UInt64 = 1_000_000_000
        let m = try OfflineBalloonMemory(root: s.tree.root, control: s.blocks, budget: s.budget, now: { clock })
        m.planInflate(pages: 4 * Self.blockPages)
        // The driver retries its target every 10 s for an hour (a balloon short of its target
        // after memory pressure); every try of a block reads all its page flags.
        for _ in 0..<360 {
            _ = try m.take(maxPages: 4 * Self.blockPages, hugeOnly: false)
            clock += 10_000_000_000
        }
        let tries = s.blocks.offlineCalls.filter { $0 == 0 }.count
        #expect(tries >= 4, "the block is still tried now and then (it may become free)")
        #expect(tries <= 8, "backing off: \(tries) tries in an hour (every minute would be 60)")
        // Once a block goes offline, the next failure of another starts the backoff over.
        s.blocks.refuse = [1: .busy]
        clock += 3_600_000_000_000
        let t = try m.take(maxPages: 4 * Self.blockPages, hugeOnly: false)
        #expect(t.pageCount == Self.blockPages, "block 0 went offline at its next try")
    }

    @Test func noBlockAtAllLeavesTheInflateToTheOtherMemoryAndDoesNotSearchAgainAtOnce() throws {
        let s = Setup(blocks: 2)
        s.blocks.refuse = [0: .busy, 1: .invalid]
        let m = try s.memory()
        m.planInflate(pages: 4 * Self.blockPages)
        let t = try m.take(maxPages: 1024, hugeOnly: false)
        #expect(t.blocks.isEmpty && t.limitedBy != nil)
        _ = try m.take(maxPages: 1024, hugeOnly: false)
        #expect(s.blocks.offlineCalls == [0, 1], "one search, then a pause: each take step would otherwise re-read every block")
    }

    @Test func theOwnedMemoryMarginStopsOfflining() throws {
        let s = Setup(blocks: 4, availableMiB: 70)  // 64 MiB margin: less than one 8 MiB block left
        let m = try s.memory()
        m.planInflate(pages: 4 * Self.blockPages)
        let t = try m.take(maxPages: 4 * Self.blockPages, hugeOnly: false)
        #expect(t.blocks.isEmpty && s.blocks.offlineCalls.isEmpty)
        #expect(t.limitedBy?.contains("allowance") == true)
    }

    @Test func releaseAllOnlinesEverythingAndBlocksAKilledBalloondLeftBehind() throws {
        let s = Setup(blocks: 3)
        s.blocks.offline = [0]
        s.tree.file(Self.statePath, "blocks=0\npid=999999\ncomm=balloond\n")
        let m = try s.memory()
        m.planInflate(pages: Self.blockPages)
        _ = try m.take(maxPages: 1024, hugeOnly: false)
        #expect(s.blocks.offlineCalls == [1], "the leftover block is not taken again")
        #expect(s.tree.read(Self.statePath)?.contains("blocks=0,1\n") == true, "the leftover stays listed")
        m.releaseAll()
        #expect(Set(s.blocks.onlineCalls) == [0, 1])
        #expect(s.tree.read(Self.statePath) == nil)
    }

    @Test func recoveryOnlinesTheBalloonsBlocksToo() throws {
        let s = Setup(blocks: 3)
        s.blocks.offline = [1, 2]
        s.tree.file(OfflineBlockStateFile.defaultPath, "blocks=2\npid=999999\ncomm=balloond\n")
        s.tree.file(Self.statePath, "blocks=1\npid=999998\ncomm=balloond\n")
        let outcome = try recoverAllOfflineBlocks(root: s.tree.root, control: s.blocks, logger: .init(label: "test"))
        #expect(outcome == .onlined([1, 2]))
        #expect(s.blocks.offline.isEmpty)
        #expect(s.tree.read(Self.statePath) == nil && s.tree.read(OfflineBlockStateFile.defaultPath) == nil)
    }

    // MARK: OfflineFirstBalloonMemory

    @Test func offlineFirstServesWholeBlocksFromOfflineAndTheRestFromPageMemory() throws {
        let s = Setup(blocks: 2)
        let rest = SimulatedBalloonMemory(base: 1 << 30, bytes: 64 << 20)
        let m = OfflineFirstBalloonMemory(offline: try s.memory(), rest: rest)
        m.planInflate(pages: Self.blockPages + 600)
        let a = try m.take(maxPages: Self.blockPages, hugeOnly: false)
        #expect(a.pageCount == Self.blockPages && rest.heldBytes == 0)
        let b = try m.take(maxPages: 600, hugeOnly: false)
        #expect(b.pageCount == 600 && rest.heldBytes == 600 * 4096, "less than a block: page memory")
        let reported = try m.take(maxPages: 512, hugeOnly: true)
        #expect(reported.blocks.allSatisfy { rest.held[$0.handle] != nil }, "reporting's 2 MiB blocks come from page memory")
        #expect(m.stillInPlace(a.blocks[0]) && m.stillInPlace(b.blocks[0]))
        #expect(m.releaseGroup(of: a.blocks[0]) != nil && m.releaseGroup(of: b.blocks[0]) == nil)
        #expect(Set(a.blocks.compactMap { m.releaseGroup(of: $0) }).count == 1)
        #expect(m.strandedGroups().isEmpty, "the block went out whole")
        m.release(a.blocks + b.blocks)
        #expect(s.blocks.onlineCalls == [0] && rest.heldBytes == 512 * 4096)
        m.releaseAll()
        #expect(m.heldBytes == 0)
    }

    @Test func anErrorAfterPiecesWereHandedOutReturnsThemAndThrowsNextTime() throws {
        let s = Setup(blocks: 2)
        let m = try s.memory()
        m.planInflate(pages: 2 * Self.blockPages)
        _ = try m.take(maxPages: 1024, hugeOnly: false)
        s.blocks.listError = .malformedFile(path: "/sys/devices/system/memory", reason: "test")
        let rest = try m.take(maxPages: 4096, hugeOnly: false)
        #expect(rest.pageCount == 1024, "the block's last two pieces were already the caller's when listing failed")
        #expect(rest.limitedBy != nil)
        #expect(throws: BalloonMemoryError.self) { try m.take(maxPages: 4096, hugeOnly: false) }
    }

    @Test func offlineFirstKeepsGivingBackOfflinePiecesAfterTheOfflineMemoryFailed() throws {
        let s = Setup(blocks: 2)
        let rest = SimulatedBalloonMemory(base: 1 << 30, bytes: 64 << 20)
        let m = OfflineFirstBalloonMemory(offline: try s.memory(), rest: rest)
        m.planInflate(pages: 2 * Self.blockPages)
        let a = try m.take(maxPages: Self.blockPages, hugeOnly: false)
        s.blocks.listError = .malformedFile(path: "/sys/devices/system/memory", reason: "test")
        let b = try m.take(maxPages: Self.blockPages, hugeOnly: false)
        #expect(m.offlineDisabledBecause != nil)
        #expect(b.pageCount == Self.blockPages && rest.heldBytes == Self.blockBytes, "the rest of the inflate came from page memory")
        #expect(s.blocks.onlineCalls.isEmpty, "the inflated block stays offline: the device may hold its PFNs")
        m.release(a.blocks)
        #expect(s.blocks.onlineCalls == [0], "and comes back online when the driver deflates it")
    }
}
