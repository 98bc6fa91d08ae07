#if canImport(Glibc)
import Glibc
#endif
import FreePages
import PlatformLinux
import TestSupport
import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import VirtioCore

/// A memory-block interface that records what was asked and what the state file said at each
/// offline write.
final class FakeMemoryBlocks: MemoryBlockControl {
    let blockBytes: UInt64
    var offline: Set<Int> = []
    var present: [Int]
    var refuse: [Int: MemoryBlockOfflineResult] = [:]
    var offlineCalls: [Int] = []
    var onlineCalls: [Int] = []
    var stateAtOffline: [String?] = []
    var readState: () -> String? = { nil }

    init(blockBytes: UInt64, present: [Int]) {
        self.blockBytes = blockBytes
        self.present = present
    }

    /// Thrown by `offlinableBlocks` when set.
    var listError: GuestMemoryError?

    func offlinableBlocks() throws(GuestMemoryError) -> [Int] {
        if let listError { throw listError }
        return present.filter { !offline.contains($0) }
    }
    func isOffline(_ index: Int) -> Bool? { present.contains(index) ? offline.contains(index) : nil }
    func offline(_ index: Int, timeoutMilliseconds: Int) -> MemoryBlockOfflineResult {
        offlineCalls.append(index)
        stateAtOffline.append(readState())
        if let r = refuse[index] { return r }
        offline.insert(index)
        return .offlined
    }
    func online(_ index: Int) throws(GuestMemoryError) {
        onlineCalls.append(index)
        offline.remove(index)
    }
}

@Suite struct OfflineBlockSourceTests {
    /// 4 MiB blocks (1024 pages) in tests.
    static let blockPages = 1024
    static let blockBytes = UInt64(blockPages) * 4096
    static let free = KPageFlags.buddy.rawValue
    static let used = KPageFlags([.lru, .anon, .mmap]).rawValue
    static let statePath = "/run/balloond/offline-blocks"

    struct Setup {
        let tree = FakeTree()
        let blocks: FakeMemoryBlocks
        var flags: [UInt64]

        /// `blocks` blocks of free pages; `used` PFNs marked in use.
        init(blocks n: Int, used: [Int] = [], memFreeMiB: Int = 4096) {
            blocks = FakeMemoryBlocks(blockBytes: OfflineBlockSourceTests.blockBytes, present: Array(0..<n))
            flags = [UInt64](repeating: OfflineBlockSourceTests.free, count: n * OfflineBlockSourceTests.blockPages)
            for p in used { flags[p] = OfflineBlockSourceTests.used }
            tree.u64File("/proc/kpageflags", flags)
            tree.file("/proc/meminfo", "MemTotal: \(8 << 20) kB\nMemFree: \(memFreeMiB << 10) kB\nMemAvailable: \(memFreeMiB << 10) kB\n")
            tree.directory("/run/balloond")
            _ = chmod(tree.at("/run/balloond"), 0o700)
            let t = tree
            blocks.readState = { t.read(OfflineBlockSourceTests.statePath) }
        }

        func source(protected: [GuestPhysicalRange] = [], options: OfflineBlockSource.Options = .init()) throws -> OfflineBlockSource {
            try OfflineBlockSource(root: tree.root, control: blocks, options: options, protectedRanges: { protected })
        }
    }

    func drain(_ s: OfflineBlockSource) throws -> [GuestPhysicalRange] {
        var all: [GuestPhysicalRange] = []
        while true {
            let b = try s.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20)
            if b.isEmpty { return all }
            all += b
        }
    }

    func range(_ block: Int) -> GuestPhysicalRange { GuestPhysicalRange(start: UInt64(block) * Self.blockBytes, length: Self.blockBytes) }

    @Test func offlinesOnlyBlocksWhosePagesAreAllFreeAndHintsThemWhole() throws {
        // Block 1: one used page between the 2 MiB samples (only the full read finds it).
        // Block 3: a used page at a 2 MiB boundary (the quick look finds it).
        let s = Setup(blocks: 4, used: [Self.blockPages + 5, 3 * Self.blockPages + 512])
        let source = try s.source()
        try source.beginRound(id: 1)
        let hinted = try drain(source)
        #expect(hinted == [range(2), range(0)])
        #expect(s.blocks.offlineCalls == [2, 0], "a block with a page in use is never offlined (its pages would be migrated)")
        #expect(source.heldBytes == 2 * Self.blockBytes)
        #expect(source.lastRound.blocksSkippedNotFree == 2)
        #expect(source.lastRound.firstBlockNanos != nil, "the time to the round's first block is recorded")
    }

    @Test func eachBlockIsInTheStateFileBeforeItsOfflineWrite() throws {
        let s = Setup(blocks: 2)
        let source = try s.source()
        try source.beginRound(id: 1)
        _ = try drain(source)
        #expect(s.blocks.stateAtOffline.count == 2)
        #expect(s.blocks.stateAtOffline[0]?.contains("blocks=1\n") == true, "a SIGKILL right after the write must leave block 1 listed")
        #expect(s.blocks.stateAtOffline[1]?.contains("blocks=0,1\n") == true)
        #expect(s.tree.read(Self.statePath)?.contains("blocks=0,1\n") == true)
    }

    @Test func heldBlocksStayOfflineAcrossRoundsAreRehintedAndComeBackAtDone() throws {
        let s = Setup(blocks: 2)
        let source = try s.source()
        try source.beginRound(id: 1)
        let first = try drain(source)
        source.hintsApplied(first)
        source.endRound()
        #expect(s.blocks.onlineCalls.isEmpty, "STOP is not DONE: the blocks stay offline for the next round")
        try source.beginRound(id: 2)
        let second = try drain(source)
        #expect(second == first, "the next round hints the held blocks again")
        #expect(s.blocks.offlineCalls == [1, 0], "without offlining them again")
        source.endRound()
        source.releaseAll()
        #expect(s.blocks.onlineCalls == [0, 1])
        #expect(source.heldBytes == 0)
        #expect(s.tree.read(Self.statePath) == nil, "nothing left for crash recovery")
    }

    @Test func pressureOnlinesHeldBlocksNoPendingHintRefersToHighestFirst() throws {
        let s = Setup(blocks: 4)
        let source = try s.source()
        try source.beginRound(id: 1)
        let hinted = try drain(source)
        #expect(hinted.count == 4)
        // The device has used blocks 0, 1 and 3; block 2's descriptor is still out.
        source.hintsApplied([range(0), range(1), range(3)])
        let freed = source.releaseUnderPressure(bytes: 2 * Self.blockBytes)
        #expect(freed == 2 * Self.blockBytes)
        #expect(s.blocks.onlineCalls == [3, 1], "highest first, skipping block 2 (its hint may still be applied)")
        #expect(source.held == [0, 2])
        #expect(s.tree.read(Self.statePath)?.contains("blocks=0,2\n") == true)
        // Nothing idle left but block 0.
        #expect(source.releaseUnderPressure(bytes: 8 * Self.blockBytes) == Self.blockBytes)
        #expect(source.held == [2])
    }

    @Test func blocksAKilledBalloondLeftOfflineAreTakenOverHintedAndOnlinedAtDone() throws {
        let s = Setup(blocks: 3)
        s.blocks.offline = [1]
        s.blocks.refuse[0] = .busy
        s.blocks.refuse[2] = .busy
        s.tree.stateFile(Self.statePath, "blocks=1\npid=2147483000\ncomm=balloond\n")
        let source = try s.source()
        try source.beginRound(id: 1)
        #expect(try drain(source) == [range(1)], "the leftover block is offline: hinted without offlining it again")
        #expect(!s.blocks.offlineCalls.contains(1))
        #expect(s.tree.read(Self.statePath)?.contains("blocks=1\n") == true, "still listed, now under this process")
        source.endRound()
        source.releaseAll()
        #expect(s.blocks.onlineCalls == [1])
        #expect(s.tree.read(Self.statePath) == nil)
    }

    @Test func aHeldBlockSomeoneElseOnlinedIsNotHintedAgain() throws {
        let s = Setup(blocks: 2)
        let source = try s.source()
        try source.beginRound(id: 1)
        #expect(try drain(source) == [range(1), range(0)])
        source.endRound()
        s.blocks.offline.remove(1)  // an admin onlined it
        s.blocks.refuse[1] = .busy  // and it is in use now
        try source.beginRound(id: 2)
        #expect(try drain(source) == [range(0)])
        #expect(source.held == [0])
        #expect(s.tree.read(Self.statePath)?.contains("blocks=0\n") == true)
    }

    @Test func startupRecoveryCanLeaveOfflineBlocksForAfterTheDeviceReset() throws {
        let s = Setup(blocks: 2)
        s.tree.stateFile(Self.statePath, "blocks=1\npid=2147483000\ncomm=balloond\n")
        let report = try recoverAfterCrash(root: s.tree.root, logger: .init(label: "test"), offlineBlocks: false)
        #expect(report.offlineBlocks == .nothingToDo)
        #expect(s.tree.read(Self.statePath)?.contains("blocks=1\n") == true, "left for the recovery after the device reset")
    }

    @Test func aBlockThatFailedIsNotTriedAgainForSomeRounds() throws {
        let s = Setup(blocks: 3)
        s.blocks.refuse[1] = .busy
        s.blocks.refuse[2] = .timedOut(milliseconds: 200)
        let source = try s.source(options: .init(skipRoundsAfterFailure: 2))
        try source.beginRound(id: 1)
        #expect(try drain(source) == [range(0)])
        #expect(s.tree.read(Self.statePath)?.contains("blocks=0\n") == true, "failed blocks leave the state file again")
        source.endRound()
        try source.beginRound(id: 2)
        _ = try drain(source)
        source.endRound()
        #expect(s.blocks.offlineCalls == [2, 1, 0], "round 2 skipped the failed blocks")
        try source.beginRound(id: 3)
        _ = try drain(source)
        #expect(s.blocks.offlineCalls == [2, 1, 0, 2, 1], "round 3 tries them again")
    }

    @Test func blocksOverlappingProtectedMemoryAreNeverTouched() throws {
        let s = Setup(blocks: 3)
        let ring = GuestPhysicalRange(start: Self.blockBytes + 8192, length: 4096)
        let source = try s.source(protected: [ring])
        try source.beginRound(id: 1)
        #expect(try drain(source) == [range(2), range(0)])
        #expect(!s.blocks.offlineCalls.contains(1))
    }

    @Test func takesNoBlockBeyondTheOwnedMemoryMargin() throws {
        // 6 MiB free, margin 64 MiB: not even one 4 MiB block.
        let s = Setup(blocks: 2, memFreeMiB: 6)
        let source = try s.source()
        try source.beginRound(id: 1)
        #expect(try drain(source).isEmpty)
        #expect(s.blocks.offlineCalls.isEmpty)
        #expect(source.lastRound.stoppedBecause?.contains("margin") == true)
        #expect(source.lastRound.firstBlockNanos == nil, "no block taken: no time to the first one")
    }

    @Test func recoveryOnlinesOnlyListedBlocksThatAreStillOffline() throws {
        let s = Setup(blocks: 4)
        s.blocks.offline = [1, 2]
        // Block 2 was offlined by an admin (not listed); block 3 is listed but online already.
        s.tree.stateFile(Self.statePath, "blocks=1,3\npid=2147483000\ncomm=balloond\n")
        let outcome = try recoverOfflineBlocks(root: s.tree.root, stateFile: OfflineBlockStateFile(root: s.tree.root), control: s.blocks,
                                               logger: .init(label: "test"))
        #expect(outcome == .onlined([1]))
        #expect(s.blocks.onlineCalls == [1])
        #expect(s.blocks.offline == [2])
        #expect(s.tree.read(Self.statePath) == nil)
    }

    @Test func recoverySetsAMalformedStateFileAsideWithoutActing() throws {
        let s = Setup(blocks: 2)
        s.blocks.offline = [1]
        s.tree.stateFile(Self.statePath, "blocks=1,x\npid=2147483000\n")
        let outcome = try recoverOfflineBlocks(root: s.tree.root, stateFile: OfflineBlockStateFile(root: s.tree.root), control: s.blocks,
                                               logger: .init(label: "test"))
        guard case .setAside = outcome else {
            Issue.record("expected setAside, got \(outcome)")
            return
        }
        #expect(s.blocks.onlineCalls.isEmpty)
    }

    @Test func roundsTakeBlocksFromTheHighestAddressDown() throws {
        // QEMU sends RAM from offset 0 upward: the top blocks are the ones it reaches last.
        let s = Setup(blocks: 4)
        let source = try s.source()
        try source.beginRound(id: 1)
        #expect(try drain(source) == [range(3), range(2), range(1), range(0)])
        #expect(s.blocks.offlineCalls == [3, 2, 1, 0])
        #expect(source.preferredMaxRangeBytes == Self.blockBytes, "a block is one descriptor when the driver allows it")
    }

    static let movable = KPageFlags([.lru, .anon, .mmap, .uptodate]).rawValue
    static let mlockedPage = KPageFlags([.lru, .anon, .mmap, .unevictable, .mlocked]).rawValue
    static let hugePage = KPageFlags([.huge, .compoundHead]).rawValue
    static let slabPage = KPageFlags([.slab]).rawValue

    func reserveSetup(blocks: Int = 4, memFreeMiB: Int = 4096) -> Setup {
        Setup(blocks: blocks, memFreeMiB: memFreeMiB)
    }

    @Test func theReserveFillsBetweenRoundsHighestFirstUpToItsTarget() throws {
        let s = reserveSetup()
        let source = try s.source(options: .init(reserveBytes: 2 * Self.blockBytes, reserveKeepFreeBytes: 0))
        #expect(source.reserveTargetBytes == 2 * Self.blockBytes)
        #expect(source.replenishReserve() == .full)
        #expect(s.blocks.offlineCalls == [3, 2])
        #expect(source.held == [2, 3])
        #expect(s.tree.read(Self.statePath)?.contains("blocks=2,3\n") == true, "listed for crash recovery like a round's blocks")
        #expect(source.replenishReserve() == .full)
        #expect(s.blocks.offlineCalls == [3, 2], "a full reserve takes nothing more")
        // The next round hints the reserve at once (no offlining first), then takes more.
        try source.beginRound(id: 1)
        let first = try source.nextBatch(maxRanges: 2, maxRangeBytes: Self.blockBytes)
        #expect(first == [range(3), range(2)])
        #expect(s.blocks.offlineCalls == [3, 2])
        #expect(try drain(source) == [range(1), range(0)])
    }

    @Test func aReservePassIsBoundedAndReportsWhetherItGrew() throws {
        let s = reserveSetup(blocks: 6)
        let source = try s.source(options: .init(reserveBytes: 6 * Self.blockBytes, reserveKeepFreeBytes: 0, reserveBlocksPerPass: 2))
        #expect(source.replenishReserve() == .grew)
        #expect(s.blocks.offlineCalls == [5, 4])
        s.blocks.refuse = [3: .busy, 2: .busy, 1: .busy, 0: .busy]
        #expect(source.replenishReserve() == .stuck, "nothing could be taken: the driver waits long before the next pass")
        #expect(source.held == [4, 5])
    }

    @Test func aReservePassStartsNoNewBlockOnceItsTimeBudgetIsSpent() throws {
        let s = reserveSetup(blocks: 6)
        let source = try s.source(options: .init(reserveBytes: 6 * Self.blockBytes, reserveKeepFreeBytes: 0, reservePassBudgetMilliseconds: 0))
        #expect(source.replenishReserve() == .grew)
        #expect(s.blocks.offlineCalls == [5], "one block, then the spent budget ends the pass")
    }

    @Test func theReserveLeavesMemFreeAboveItsFloor() throws {
        // MemFree 64 MiB; the floor 62 MiB plus one 4 MiB block does not fit.
        let s = reserveSetup(memFreeMiB: 64)
        let source = try s.source(options: .init(limits: OwnedMemoryLimits(marginBytes: 0, marginFractionOfTotal: 0),
                                                 reserveBytes: 4 * Self.blockBytes, reserveKeepFreeBytes: 62 << 20))
        #expect(source.replenishReserve() == .stuck)
        #expect(s.blocks.offlineCalls.isEmpty)
    }

    @Test func noReservePassWhileARoundIsOpen() throws {
        let s = reserveSetup()
        let source = try s.source(options: .init(reserveBytes: 4 * Self.blockBytes, reserveKeepFreeBytes: 0))
        try source.beginRound(id: 1)
        #expect(source.replenishReserve() == .grew, "asks to be called again after the round")
        #expect(s.blocks.offlineCalls.isEmpty)
    }

    @Test func withoutAReserveNoPassTakesAnything() throws {
        let s = reserveSetup()
        let source = try s.source()
        #expect(source.replenishReserve() == .notWanted)
        #expect(source.reserveTargetBytes == 0)
        #expect(s.blocks.offlineCalls.isEmpty)
    }

    @Test func theReserveTakesBlocksWithAFewMovablePagesButRoundsDoNot() throws {
        var s = reserveSetup()
        let p = Self.blockPages
        // Block 3: two movable LRU pages (one on a 2 MiB sample). Block 2: an mlocked page (like
        // balloond's ring and balloon pages). Block 1: a hugetlb page. Block 0: a slab page.
        for (pfn, flags) in [(3 * p + 5, Self.movable), (3 * p + 512, Self.movable), (2 * p + 7, Self.mlockedPage),
                             (p + 9, Self.hugePage), (11, Self.slabPage)] { s.flags[pfn] = flags }
        s.tree.u64File("/proc/kpageflags", s.flags)
        let round = try s.source()
        try round.beginRound(id: 1)
        #expect(try drain(round).isEmpty, "a round offlines wholly free blocks only")
        round.endRound()
        let reserve = try s.source(options: .init(reserveBytes: 4 * Self.blockBytes, reserveKeepFreeBytes: 0))
        _ = reserve.replenishReserve()
        #expect(s.blocks.offlineCalls == [3], "only the block whose in-use pages are all movable")
        let capped = try s.source(options: .init(reserveBytes: 4 * Self.blockBytes, reserveKeepFreeBytes: 0, reserveMaxMovablePages: 1))
        s.blocks.offline = []
        s.blocks.offlineCalls = []
        _ = capped.replenishReserve()
        #expect(s.blocks.offlineCalls.isEmpty, "more in-use pages than allowed")
    }

    @Test func doneKeepsTheReserveHighestBlocksAndOnlinesTheRest() throws {
        let s = reserveSetup()
        let source = try s.source(options: .init(reserveBytes: 1 * Self.blockBytes, reserveKeepFreeBytes: 0))
        try source.beginRound(id: 1)
        let hinted = try drain(source)
        #expect(hinted.count == 4)
        source.endRound()
        source.hintingDone()
        #expect(source.held == [3])
        #expect(Set(s.blocks.onlineCalls) == [0, 1, 2])
        #expect(s.tree.read(Self.statePath)?.contains("blocks=3\n") == true)
        // A reset or shutdown still gives everything back.
        source.releaseAll()
        #expect(source.held.isEmpty)
        #expect(s.tree.read(Self.statePath) == nil)
    }

    @Test func withoutAReserveDoneOnlinesEverything() throws {
        let s = reserveSetup(blocks: 2)
        let source = try s.source()
        try source.beginRound(id: 1)
        _ = try drain(source)
        source.endRound()
        source.hintingDone()
        #expect(source.held.isEmpty)
        #expect(Set(s.blocks.onlineCalls) == [0, 1])
    }

    @Test func autoPicksOfflineWhenAReserveIsAskedForAndBlocksCanBeOfflined() throws {
        for hv in [Hypervisor.tcg, .kvm] {
            let withReserve = try chooseHintSource(requested: .auto, hypervisor: hv, memoryDebug: GuestMemoryDebugConfig(),
                                                   unsafeHintsOnKVM: false, hugetlbAvailable: true, offlineAvailable: true,
                                                   reserveRequested: true).get()
            #expect(withReserve.source == .offline, "\(hv)")
            #expect(withReserve.reason.contains("--hint-reserve-mib"))
            let without = try chooseHintSource(requested: .auto, hypervisor: hv, memoryDebug: GuestMemoryDebugConfig(),
                                               unsafeHintsOnKVM: false, hugetlbAvailable: true, offlineAvailable: true).get()
            #expect(without.source == (hv == .tcg ? .kpageflags : .offline), "without a reserve auto keeps its usual choice on \(hv)")
            let noBlocks = try chooseHintSource(requested: .auto, hypervisor: hv, memoryDebug: GuestMemoryDebugConfig(),
                                                unsafeHintsOnKVM: false, hugetlbAvailable: true, offlineAvailable: false,
                                                reserveRequested: true).get()
            #expect(noBlocks.source == (hv == .tcg ? .kpageflags : .hugetlb), "no offlinable blocks: the usual choice (the reserve is then ignored)")
        }
        let explicit = try chooseHintSource(requested: .hugetlb, hypervisor: .kvm, memoryDebug: GuestMemoryDebugConfig(),
                                            unsafeHintsOnKVM: false, hugetlbAvailable: true, offlineAvailable: true,
                                            reserveRequested: true).get()
        #expect(explicit.source == .hugetlb, "an explicit source is never overridden")
    }

    @Test func chosenExplicitlyOnAnyHypervisorWithoutTheTCGOwnedSourceWarning() {
        for hv in [Hypervisor.tcg, .kvm] {
            for poison in [false, true] {
                let r = chooseHintSource(requested: .offline, hypervisor: hv, memoryDebug: GuestMemoryDebugConfig(pagePoisoning: poison),
                                         unsafeHintsOnKVM: false, hugetlbAvailable: true, offlineAvailable: true)
                guard case .success(let c) = r else {
                    Issue.record("offline refused on \(hv)")
                    continue
                }
                #expect(c.source == .offline)
                #expect(c.warning == nil)
            }
        }
    }
}

@Suite struct BoundedAttributeWriteTests {
    /// A write the kernel would block forever (a full pipe with a reader that never reads)
    /// comes back with EINTR once the bound runs out: the offline source's protection against
    /// a block whose pages never finish migrating.
    @Test func aBlockedWriteIsInterruptedAtTheTimeout() throws {
        let tree = FakeTree()
        let fifo = tree.at("/fifo")
        #expect(mkfifo(fifo, 0o600) == 0)
        let reader = open(fifo, O_RDONLY | O_NONBLOCK)
        #expect(reader >= 0)
        defer { close(reader) }
        let filler = open(fifo, O_WRONLY | O_NONBLOCK)
        #expect(filler >= 0)
        defer { close(filler) }
        let chunk = [UInt8](repeating: 0x41, count: 4096)
        while chunk.withUnsafeBytes({ write(filler, $0.baseAddress, $0.count) }) > 0 {}
        let t0 = Sys.monotonicNanos()
        var caught: SystemCallError?
        do { try Sys.writeAttribute(fifo, "offline", timeoutMilliseconds: 100) } catch { caught = error }
        let ms = (Sys.monotonicNanos() - t0) / 1_000_000
        #expect(caught?.errno == .interrupted)
        #expect(ms >= 90 && ms < 5000)
    }
}
