import TestSupport
import FreePages
import Testing
import Logging
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux
import VirtioCore

@Suite struct HugeTLBPoolSourceTests {
    static let frameBytes: UInt64 = 2 << 20
    /// 64 MiB of RAM (32 frames); frames 8..<32 free in the buddy allocator (48 MiB);
    /// balloond's DMA hugepage is frame 3.
    static let dmaFrame = 3

    struct Setup {
        let tree: FakeTree
        let kernel: FakeHugeTLBKernel
        let source: HugeTLBPoolSource
    }

    static func limits(marginMiB: UInt64 = 8, capMiB: UInt64? = nil) -> OwnedMemoryLimits {
        OwnedMemoryLimits(marginBytes: marginMiB << 20, marginFractionOfTotal: 0, maxHeldBytes: capMiB.map { $0 << 20 })
    }

    static func setup(withDMA: Bool = true, limits: OwnedMemoryLimits = limits(), holdings: GuestMemoryHoldings? = nil,
                      logger: Logger = Logger(label: "test"), prepare: (FakeHugeTLBKernel) -> Void = { _ in }) throws -> Setup {
        let tree = FakeTree()
        let kernel = FakeHugeTLBKernel(tree: tree, ramMiB: 64, buddyFrames: Array(8..<32))
        if withDMA { kernel.addInUse(frame: dmaFrame) }
        prepare(kernel)
        let own = withDMA ? [GuestPhysicalRange(start: kernel.pfn(frame: dmaFrame) * 4096, length: frameBytes)] : []
        let source = try HugeTLBPoolSource(root: tree.root, control: kernel, ownHugePages: own,
                                           options: .init(limits: limits, firstStepBytes: 4 << 20, maxStepBytes: 8 << 20), holdings: holdings,
                                           logger: logger)
        return Setup(tree: tree, kernel: kernel, source: source)
    }

    /// The 2 MiB frames a list of ranges covers.
    static func frames(_ ranges: [GuestPhysicalRange]) -> Set<Int> {
        var f: Set<Int> = []
        for r in ranges {
            #expect(r.start.value % frameBytes == 0 && r.length % frameBytes == 0, "hugetlb hints are whole 2 MiB pages: \(r)")
            for a in stride(from: r.start.value, to: r.end, by: Int(frameBytes)) { f.insert(Int(a / frameBytes)) }
        }
        return f
    }

    @Test func growsInStepsReservesEverythingAndHintsOnlyFreePoolPages() throws {
        let s = try Self.setup()
        #expect(s.source.name == "hugetlb" && s.source.ownership == .owned)
        try s.source.beginRound(id: 0x8000_0001)
        #expect(s.tree.read("/run/balloond/hugetlb-pool")?.hasPrefix("nr_hugepages_before=1\n") == true,
                "the original size is saved before the pool grows")
        let first = try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20)
        #expect(Self.frames(first).count == 2, "the first step is small, so the first hint leaves early")
        let ranges = first + (try drainHints(s.source))
        let hinted = Self.frames(ranges)
        // 48 MiB free in ≥2 MiB blocks − 8 MiB margin, re-read before every step.
        #expect(hinted.count == 20)
        #expect(hinted == Set(s.kernel.freePool), "exactly the free pool pages")
        #expect(!hinted.contains(Self.dmaFrame), "never balloond's own ring page")
        #expect(Array(s.kernel.setPoolSizeCalls.prefix(3)) == [3, 7, 11], "grows 2, then 4, 4… pages (steps double up to 8 MiB)")
        // Every free pool page is reserved by balloond.
        let c = try s.kernel.counters()
        #expect(c.free == 20 && c.reserved == 20 && c.total == 21)
        #expect(s.source.heldBytes == 40 << 20)
        #expect(s.source.lastRound.stoppedBecause?.contains("margin") == true)
    }

    @Test func keepsEverythingUntilEveryDescriptorIsBack() throws {
        let s = try Self.setup()
        try s.source.beginRound(id: 5)
        let ranges = try drainHints(s.source)
        #expect(ranges.count > 2)
        // The driver posted STOP and ended the round, but QEMU has not used every hint yet.
        s.source.endRound()
        #expect(s.kernel.total == 21 && s.kernel.reserved == 20, "nothing is released while hints are outstanding")
        s.source.hintsApplied(Array(ranges.dropLast()))
        #expect(s.kernel.total == 21 && s.kernel.reserved == 20)
        s.source.hintsApplied([ranges.last!])
        #expect(s.kernel.total == 1, "shrunk back to the original size (the DMA page)")
        #expect(s.kernel.reserved == 0)
        #expect(!s.tree.exists("/run/balloond/hugetlb-pool"))
        #expect(s.source.heldBytes == 0)
        #expect(s.source.framesLostBeforeRelease == 0)
    }

    @Test func releasesAtEndRoundWhenAllHintsWereApplied() throws {
        let s = try Self.setup()
        try s.source.beginRound(id: 5)
        let ranges = try drainHints(s.source)
        s.source.hintsApplied(ranges)
        #expect(s.kernel.total == 21, "still the round: kept")
        s.source.endRound()
        #expect(s.kernel.total == 1)
    }

    @Test("a release whose reservations stayed reserved says why in an error (the arena's failure), not a bare warning about nr_hugepages")
    func releaseNamesReservationsThatStayed() throws {
        let lines = LockedLines()
        let s = try Self.setup(logger: Logger(label: "test") { _ in CallbackLogHandler(lines.append) })
        try s.source.beginRound(id: 5)
        let ranges = try drainHints(s.source)
        s.kernel.reservationReleaseError = "ftruncate: Device or resource busy"
        s.source.hintsApplied(ranges)
        s.source.endRound()
        #expect(s.kernel.total > 1, "the pool could not shrink: its pages stayed reserved")
        let line = try #require(lines.all.first { $0.message.contains("after restoring") })
        #expect(line.level == .error)
        #expect(line.message.contains("ftruncate: Device or resource busy") && line.message.contains("could not give back its pool reservations"))
        // The same round with reservations given back restores the pool and says nothing of it.
        let quiet = LockedLines()
        let t = try Self.setup(logger: Logger(label: "test") { _ in CallbackLogHandler(quiet.append) })
        try t.source.beginRound(id: 6)
        t.source.hintsApplied(try drainHints(t.source))
        t.source.endRound()
        #expect(t.kernel.total == 1)
        #expect(quiet.all.allSatisfy { !$0.message.contains("after restoring") })
    }

    enum Precondition: String, CaseIterable { case reserved, surplus, overcommit, foreignInUse, foreignUnmappedFilePage }

    @Test(arguments: Precondition.allCases)
    func refusesAPoolOthersUse(_ p: Precondition) throws {
        let s = try Self.setup { k in
            switch p {
            case .reserved: k.freePool = [30]; k.buddyFrames.removeAll { $0 == 30 }; k.reserved = 1; k.sync()
            case .surplus: k.surplus = 1
            case .overcommit: k.overcommit = 2
            case .foreignInUse: k.addInUse(frame: 5)
            case .foreignUnmappedFilePage: k.addInUse(frame: 5, mapcount: 0)
            }
        }
        #expect {
            try s.source.beginRound(id: 9)
        } throws: { e in
            reason(e, as: HugeTLBRefusal.self) == s.source.lastRefusal && "\(e)".contains("anonymous memory for this round")
        }
        switch (p, s.source.lastRefusal) {
        case (.reserved, .reservedByOthers(reserved: 1)?), (.surplus, .surplusPages(1)?), (.overcommit, .overcommitEnabled(2)?),
             (.foreignInUse, .foreignPagesInUse(1)?), (.foreignUnmappedFilePage, .foreignPagesInUse(1)?):
            break
        default:
            Issue.record("unexpected refusal \(String(describing: s.source.lastRefusal)) for \(p)")
        }
        #expect(s.kernel.setPoolSizeCalls.isEmpty, "the pool is not touched")
        #expect(!s.tree.exists("/run/balloond/hugetlb-pool"))
        #expect(try s.source.nextBatch(maxRanges: 8, maxRangeBytes: 4 << 20).isEmpty)
    }

    @Test func withoutTheOwnPageParameterTheDMAPageIsForeign() throws {
        let tree = FakeTree()
        let k = FakeHugeTLBKernel(tree: tree, ramMiB: 64, buddyFrames: Array(8..<32))
        k.addInUse(frame: Self.dmaFrame)
        let source = try HugeTLBPoolSource(root: tree.root, control: k)
        #expect(throws: FreePageSourceError.self) { try source.beginRound(id: 1) }
        #expect(source.lastRefusal == .foreignPagesInUse(1))
    }

    @Test func stopsWhenThePoolChangesUnderIt() throws {
        let s = try Self.setup()
        try s.source.beginRound(id: 5)
        let first = try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20)
        #expect(!first.isEmpty)
        // An administrator grows the pool during the round.
        try s.kernel.setPoolSize(s.kernel.total + 1)
        var thrown: FreePageSourceError?
        do { _ = try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20) } catch { thrown = error }
        guard case .poolChanged? = thrown?.reason(as: HugeTLBRefusal.self) else { Issue.record("expected poolChanged, got \(String(describing: thrown))"); return }
        guard case .poolChanged? = s.source.lastRefusal else { Issue.record("expected poolChanged"); return }
        #expect(try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20).isEmpty, "no more pool pages this round")
        // What was handed out stays reserved until its hints are used.
        #expect(s.source.heldBytes == 4 << 20)
        s.source.endRound()
        #expect(s.kernel.reserved == 2)
        s.source.hintsApplied(first)
        #expect(s.kernel.total == 1 && s.kernel.reserved == 0)
    }

    @Test func stopsWhenTheScanDisagreesWithTheCounters() throws {
        let s = try Self.setup()
        try s.source.beginRound(id: 5)
        let first = try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20)
        // A frame in the buddy allocator suddenly looks like an unmapped hugetlb head.
        s.kernel.flagOverrides[Int(s.kernel.pfn(frame: 8))] = KPageFlags([.huge, .compoundHead]).rawValue
        s.kernel.sync()
        #expect(throws: FreePageSourceError.self) { _ = try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20) }
        guard case .scanMismatch? = s.source.lastRefusal else { Issue.record("expected scanMismatch"); return }
        s.source.endRound()
        s.source.hintsApplied(first)
        #expect(s.kernel.total == 1)
    }

    @Test func takesAnIdleAdminPoolAndRestoresItsSize() throws {
        let s = try Self.setup(withDMA: false) { k in
            k.buddyFrames.removeAll { (4..<8).contains($0) }
            k.freePool = [4, 5, 6, 7]
            k.sync()
        }
        try s.source.beginRound(id: 5)
        let ranges = try drainHints(s.source)
        let hinted = Self.frames(ranges)
        #expect(hinted.isSuperset(of: [4, 5, 6, 7]))
        #expect(hinted == Set(s.kernel.freePool))
        s.source.endRound()
        s.source.hintsApplied(ranges)
        #expect(s.kernel.total == 4, "the administrator's pool size is restored")
        #expect(s.kernel.reserved == 0)
    }

    @Test func respectsTheCap() throws {
        let s = try Self.setup(limits: Self.limits(capMiB: 10))
        try s.source.beginRound(id: 5)
        let hinted = Self.frames(try drainHints(s.source))
        #expect(hinted.count == 5)
        #expect(s.source.heldBytes == 10 << 20)
    }

    @Test func aNewRoundWhileHeldRehintsAndContinues() throws {
        let s = try Self.setup(limits: Self.limits(capMiB: 8))
        try s.source.beginRound(id: 5)
        let round1 = try drainHints(s.source)
        s.source.endRound()   // descriptors still out
        try s.source.beginRound(id: 6)
        let round2 = try drainHints(s.source)
        #expect(Self.frames(round2) == Self.frames(round1), "the held pages are hinted again, nothing new within the cap")
        s.source.endRound()
        s.source.hintsApplied(round1)
        #expect(s.kernel.total == 5, "round 2's descriptors are still out")
        s.source.hintsApplied(round2)
        #expect(s.kernel.total == 1)
    }

    /// After DONE, the old round's descriptors come back late. They must not count against the
    /// next session, which may hand out the very same frames.
    @Test func lateDescriptorsAfterReleaseAllDoNotReleaseTheNextSession() throws {
        let s = try Self.setup(limits: Self.limits(capMiB: 8))
        try s.source.beginRound(id: 5)
        let old = try drainHints(s.source)
        s.source.endRound()
        s.source.releaseAll()          // DONE
        #expect(s.kernel.total == 1)
        try s.source.beginRound(id: 7)
        let new = try drainHints(s.source)
        #expect(Self.frames(new) == Self.frames(old), "the fake kernel hands out the same frames again")
        s.source.endRound()
        s.source.hintsApplied(old)     // the late ones from before DONE
        #expect(s.kernel.total == 5, "still held: the new descriptors are out")
        s.source.hintsApplied(new)
        #expect(s.kernel.total == 1)
    }

    @Test("the shared holdings say the pool is grown from the round's start until it is put back (every descriptor back after STOP, or DONE), so the balloon takes no surplus pages meanwhile")
    func holdingsTellTheBalloonWhileThePoolIsGrown() throws {
        let tree = FakeTree()
        let holdings = GuestMemoryHoldings(root: tree.root)
        let s = try Self.setup(holdings: holdings)
        #expect(!holdings.hugeTLBPoolGrownByHintSource)
        try s.source.beginRound(id: 5)
        #expect(holdings.hugeTLBPoolGrownByHintSource, "set before the pool grows")
        let hints = try drainHints(s.source)
        s.source.endRound()
        #expect(holdings.hugeTLBPoolGrownByHintSource, "STOP with descriptors still out: the pool stays grown")
        s.source.hintsApplied(hints)
        #expect(s.kernel.total == 1)
        #expect(!holdings.hugeTLBPoolGrownByHintSource, "every descriptor back: the pool is back to its size")
        try s.source.beginRound(id: 7)
        _ = try drainHints(s.source)
        #expect(holdings.hugeTLBPoolGrownByHintSource)
        s.source.releaseAll()
        #expect(s.kernel.total == 1)
        #expect(!holdings.hugeTLBPoolGrownByHintSource, "DONE: the pool is back to its size")
    }

    @Test("a release that could not restore the pool keeps the balloon out until a later start restores it, even when that start then refuses a session")
    func holdingsClearedWhenALaterStartRestoresThePool() throws {
        let tree = FakeTree()
        let holdings = GuestMemoryHoldings(root: tree.root)
        let s = try Self.setup(holdings: holdings)
        try s.source.beginRound(id: 5)
        let hints = try drainHints(s.source)
        s.source.endRound()
        s.kernel.setPoolSizeFailure = .cannotSetPoolSize(path: "/proc/sys/vm/nr_hugepages", pages: 1,
                                                          .system(SystemCallError(call: "write", path: nil, errno: .ioError)))
        s.source.hintsApplied(hints)
        #expect(s.tree.read("/run/balloond/hugetlb-pool") != nil, "kept so the pool is restored later")
        #expect(holdings.hugeTLBPoolGrownByHintSource, "the pool is still grown")
        s.kernel.setPoolSizeFailure = nil
        s.kernel.overcommit = 1   // someone else now allows surplus pages: the next session is refused
        #expect(throws: FreePageSourceError.self) { try s.source.beginRound(id: 7) }
        #expect(s.kernel.total == 1, "the start restored the pool first")
        #expect(!holdings.hugeTLBPoolGrownByHintSource, "restored: the balloon may take surplus pages again")
    }

    @Test func recoversAfterACrash() throws {
        let s = try Self.setup()
        try s.source.beginRound(id: 5)
        _ = try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20)
        #expect(s.kernel.total == 3)
        // SIGKILL: the reservation dies with the process, the pool stays grown.
        s.kernel.reserved = 0
        let outcome = try HugeTLBPoolSource.recoverAfterCrash(root: s.tree.root, control: s.kernel)
        #expect(outcome == .restored(from: 3, to: 1))
        #expect(s.kernel.total == 1)
        #expect(!s.tree.exists("/run/balloond/hugetlb-pool"))
        #expect(try HugeTLBPoolSource.recoverAfterCrash(root: s.tree.root, control: s.kernel) == .nothingToDo)
    }

    @Test func leavesAnotherRunningInstanceAlone() throws {
        let s = try Self.setup()
        s.tree.stateFile("/run/balloond/hugetlb-pool", "nr_hugepages_before=0\nnr_hugepages_set=1\nnr_hugepages_previous=1\npid=4242\ncomm=balloond\n")
        s.tree.file("/proc/4242/comm", "balloond\n")
        #expect(try HugeTLBPoolSource.recoverAfterCrash(root: s.tree.root, control: s.kernel) == .otherInstanceRunning(pid: 4242))
        #expect(throws: FreePageSourceError.self) { try s.source.beginRound(id: 1) }
        #expect(s.source.lastRefusal == .otherInstance(pid: 4242))
        // A reused PID running something else is not balloond.
        s.tree.file("/proc/4242/comm", "bash\n")
        #expect(try HugeTLBPoolSource.recoverAfterCrash(root: s.tree.root, control: s.kernel) == .restored(from: 1, to: 1))
    }

    @Test func aStaleStateFileIsRecoveredBeforeANewSession() throws {
        let s = try Self.setup { k in
            // A dead balloond grew the pool by 2 pages (free, unreserved) and left its file.
            try! k.setPoolSize(3)
        }
        s.tree.stateFile("/run/balloond/hugetlb-pool", "nr_hugepages_before=1\nnr_hugepages_set=3\nnr_hugepages_previous=1\npid=999999\n")
        try s.source.beginRound(id: 1)
        #expect(s.kernel.setPoolSizeCalls.dropFirst().first == 1, "restored first")
        #expect(s.tree.read("/run/balloond/hugetlb-pool")?.hasPrefix("nr_hugepages_before=1\n") == true)
        let r = try drainHints(s.source)
        s.source.endRound()
        s.source.hintsApplied(r)
        #expect(s.kernel.total == 1)
    }

    @Test func gigantic1GPagesAreNotPoolPages() throws {
        let tree = FakeTree()
        let k = FakeHugeTLBKernel(tree: tree, ramMiB: 64, buddyFrames: Array(8..<32))
        k.freePool = [2]   // a genuine 2 MiB pool page
        // Frames 10–11 stand for a gigantic page: head, then tails in the next 2 MiB frame.
        k.buddyFrames.removeAll { $0 == 10 || $0 == 11 || $0 == 2 }
        k.flagOverrides[Int(k.pfn(frame: 10))] = KPageFlags([.huge, .compoundHead]).rawValue
        for i in 1..<1024 { k.flagOverrides[Int(k.pfn(frame: 10)) + i] = KPageFlags([.huge, .compoundTail]).rawValue }
        k.sync()
        let scanner = try HugeTLBFrameScanner(root: tree.root, memoryMap: nil)
        #expect(try scanner.unmappedPoolFrames(excluding: []) == [k.pfn(frame: 2)])
        #expect(try scanner.unmappedPoolFrames(excluding: [k.pfn(frame: 2)]) == [])
        #expect(scanner.lastReads == 32, "one read per 2 MiB frame of RAM")
    }
}

/// Log lines a test looks at.
final class LockedLines: @unchecked Sendable {
    private(set) var all: [(level: Logger.Level, message: String)] = []
    func append(_ level: Logger.Level, _ message: String) { all.append((level, message)) }
}
