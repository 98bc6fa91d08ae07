#if canImport(Glibc)
import Glibc
#endif
import TestSupport
import FreePages
import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux
import VirtioCore

@Suite struct HugeTLBBalloonMemoryTests {
    static let mib: UInt64 = 1 << 20

    @Test func takesSurplusPagesAsAligned2MiBBlocks() throws {
        let f = BalloonFixture()
        let m = try f.hugeBackend()
        #expect(m.name == "hugetlb")
        #expect(m.overcommitPath == "/proc/sys/vm/nr_overcommit_hugepages")
        let t = try m.take(maxPages: 4 * 512, hugeOnly: false)
        #expect(t.blocks.count == 4 && t.pageCount == 2048 && t.limitedBy == nil)
        #expect(t.blocks.allSatisfy { $0.isHuge }, "one 2 MiB-aligned 2 MiB range per block")
        #expect(Set(t.blocks.map(\.handle)).count == 4)
        #expect(Set(t.blocks.map { $0.ranges[0].start.value }) == Set((100..<104).map { UInt64($0) * (2 * Self.mib) }))
        #expect(f.huge.overcommitAtMap == [4], "overcommit raised by exactly the pages being taken before the mmap")
        #expect(f.overcommit == "4\n", "original 0 + 4 held")
        #expect(m.heldBytes == 8 * Self.mib)
        let state = try #require(f.hugeState)
        #expect(state.contains("sysctl=/proc/sys/vm/nr_overcommit_hugepages\n") && state.contains("original=0\n") && state.contains("set=4\n"))
        #expect(state.contains("pid=\(getpid())\n"))
    }

    @Test func lowersOvercommitWithEachReleaseAndRestoresItWhenNothingIsHeld() throws {
        let f = BalloonFixture(overcommit: 3)
        let m = try f.hugeBackend()
        let t = try m.take(maxPages: 5 * 512, hugeOnly: true)
        #expect(t.blocks.count == 5)
        #expect(f.overcommit == "8\n", "original 3 + 5 held")
        m.release(Array(t.blocks.prefix(2)))
        #expect(f.overcommit == "6\n")
        #expect(f.huge.surplus == 3 && f.huge.unmapCount == 2)
        #expect(f.hugeState != nil)
        m.release(Array(t.blocks.suffix(3)))
        #expect(f.overcommit == "3\n", "the original value is back")
        #expect(f.hugeState == nil, "and the state file is gone")
        #expect(m.heldBytes == 0 && f.huge.mapped.isEmpty)
        m.release(t.blocks)  // unknown handles are ignored
        #expect(f.overcommit == "3\n")
    }

    @Test func releaseAllUnmapsEverythingAndRestoresOvercommit() throws {
        let f = BalloonFixture(overcommit: 2)
        let m = try f.hugeBackend(stepMiB: 4)
        let t = try m.take(maxPages: 6 * 512, hugeOnly: true)
        #expect(t.blocks.count == 6 && f.huge.mapCalls == [2, 2, 2], "three steps of 4 MiB")
        m.releaseAll()
        #expect(f.overcommit == "2\n" && f.hugeState == nil)
        #expect(f.huge.mapped.isEmpty && f.huge.surplus == 0 && m.heldBytes == 0)
        #expect(!m.stillInPlace(t.blocks[0]), "released blocks are not held")
    }

    @Test func stepsStopAtMemAvailableMinusTheMargin() throws {
        // 200 MiB available − 64 MiB margin = 136 MiB = 68 pages, in 32 MiB steps re-checked each time.
        let f = BalloonFixture(availableMiB: 200)
        let m = try f.hugeBackend(stepMiB: 32)
        let t = try m.take(maxPages: 100 * 512, hugeOnly: false)
        #expect(f.huge.mapCalls == [16, 16, 16, 16, 4])
        #expect(t.blocks.count == 68)
        let why = try #require(t.limitedBy)
        #expect(why.contains("MemAvailable 64 MiB − margin 64 MiB"), "\(why)")
        #expect(f.memory.available == 64 * Self.mib)
        #expect(f.overcommit == "68\n")
    }

    @Test func usesMemAvailableNotMemFree() throws {
        // MemFree is low, but page cache makes MemAvailable high: the balloon may make the
        // kernel reclaim it, like the in-kernel driver.
        let f = BalloonFixture(availableMiB: 300)
        f.memory.free = 10 * Self.mib
        f.memory.write()
        let t = try f.hugeBackend().take(maxPages: 10 * 512, hugeOnly: false)
        #expect(t.blocks.count == 10 && t.limitedBy == nil)
    }

    @Test func theCapCountsMemoryHeldByEveryBackend() throws {
        let f = BalloonFixture(capMiB: 16)
        let small = f.smallBackend()
        _ = try small.take(maxPages: 1024, hugeOnly: false)  // 4 MiB anonymous
        let t = try f.hugeBackend().take(maxPages: 20 * 512, hugeOnly: false)
        #expect(t.blocks.count == 6, "16 MiB cap − 4 MiB held elsewhere")
        #expect(t.limitedBy?.contains("cap of 16 MiB") == true)
    }

    @Test func memoryPressureStopsTakingBeforeAnythingIsChanged() throws {
        let f = BalloonFixture()
        f.tree.file("/proc/pressure/memory", "some avg10=12.00 avg60=3.00 avg300=1.00 total=99999\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=100\n")
        let t = try f.hugeBackend().take(maxPages: 4 * 512, hugeOnly: false)
        #expect(t.blocks.isEmpty)
        #expect(t.limitedBy?.contains("PSI some avg10=12.0%") == true)
        #expect(f.huge.mapCalls.isEmpty)
        #expect(f.overcommit == "0\n" && f.hugeState == nil, "nr_overcommit_hugepages untouched")
        #expect(f.oomScore == "0\n", "nothing held: the OOM score is back")
    }

    @Test func enomemReturnsWhatWasTakenWithTheReason() throws {
        let f = BalloonFixture(hugeFrames: 100..<105)
        let m = try f.hugeBackend(stepMiB: 32)
        let t = try m.take(maxPages: 16 * 512, hugeOnly: false)
        // 16 fails, 8 fails, 4 works; 4 fails, 2 fails, 1 works; 1 fails: stop.
        #expect(f.huge.mapCalls == [16, 8, 4, 4, 2, 1, 1])
        #expect(t.blocks.count == 5)
        let why = try #require(t.limitedBy)
        #expect(why.hasPrefix("no 2 MiB page to be had: mmap of 1 private 2 MiB hugetlb page(s) failed with ENOMEM"), "\(why)")
        #expect(f.overcommit == "5\n", "settled to what is held")
    }

    @Test func overcommitBoundsTheSurplusPages() throws {
        // If nr_overcommit_hugepages were not raised, the (fake) kernel would refuse.
        let f = BalloonFixture()
        let m = try f.hugeBackend()
        _ = try m.take(maxPages: 3 * 512, hugeOnly: false)
        _ = try m.take(maxPages: 2 * 512, hugeOnly: false)
        #expect(f.huge.overcommitAtMap == [3, 5], "second take: 3 held + 2 new")
        #expect(f.overcommit == "5\n")
        let state = try #require(f.hugeState)
        #expect(state.contains("original=0\n") && state.contains("set=5\n") && state.contains("previous=3\n"))
    }

    @Test func lessThanOneHugePageTakesNothing() throws {
        let f = BalloonFixture()
        let m = try f.hugeBackend()
        let t = try m.take(maxPages: 300, hugeOnly: false)
        #expect(t.blocks.isEmpty && f.huge.mapCalls.isEmpty)
        #expect(t.limitedBy?.contains("whole 2 MiB pages") == true)
        let t2 = try m.take(maxPages: 1300, hugeOnly: false)
        #expect(t2.blocks.count == 2)
        #expect(t2.limitedBy?.contains("the last 276 page(s)") == true)
    }

    @Test func refusesUnalignedFramesAndGivesThemBack() throws {
        let f = BalloonFixture()
        f.huge.freeHeads = [512 * 10 + 1] + f.huge.freeHeads
        let m = try f.hugeBackend()
        #expect {
            _ = try m.take(maxPages: 2 * 512, hugeOnly: false)
        } throws: { e in
            guard case .badHugePage(_, .notAligned(let pfn))? = reason(e, as: LinuxBalloonMemoryError.self) else { return false }
            return pfn == 512 * 10 + 1
        }
        #expect(f.huge.mapped.isEmpty, "the whole mapping was unmapped")
        #expect(m.heldBytes == 0 && f.overcommit == "0\n" && f.hugeState == nil)
        #expect(f.oomScore == "0\n")
    }

    @Test func hiddenPFNsMakeTheBackendUnusable() throws {
        let f = BalloonFixture()
        f.huge.hidePFNs = true
        let m = try f.hugeBackend()
        #expect {
            _ = try m.take(maxPages: 512, hugeOnly: false)
        } throws: { reason($0, as: LinuxBalloonMemoryError.self) == .badHugePage(index: 0, .pfnsHidden) }
        #expect(f.huge.mapped.isEmpty && f.overcommit == "0\n")
    }

    @Test func stillInPlaceRereadsThePagemap() throws {
        let f = BalloonFixture()
        let m = try f.hugeBackend()
        let t = try m.take(maxPages: 2 * 512, hugeOnly: false)
        #expect(t.blocks.allSatisfy { m.stillInPlace($0) })
        // One 4 KiB subpage of the second block now reports another frame.
        let va = try #require(f.huge.mapped.first { $0.value == t.blocks[1].ranges[0].start.value / 4096 }?.key)
        f.huge.moves[va + 4096 * 7] = 42
        #expect(m.stillInPlace(t.blocks[0]))
        #expect(!m.stillInPlace(t.blocks[1]))
        #expect(!m.stillInPlace(BalloonBlock(handle: 999, ranges: t.blocks[0].ranges)), "unknown handle")
        #expect(!m.stillInPlace(BalloonBlock(handle: t.blocks[0].handle, ranges: t.blocks[1].ranges)), "ranges that are not the block's")
    }

    @Test func takesNothingWhileTheHugeTLBHintSourceHoldsThePool() throws {
        let f = BalloonFixture()
        let m = try f.hugeBackend()
        f.holdings.setHugeTLBPoolGrownByHintSource(true)
        let t = try m.take(maxPages: 512, hugeOnly: true)
        #expect(t.blocks.isEmpty && f.huge.mapCalls.isEmpty)
        #expect(t.limitedBy?.contains("hint source holds the hugetlb pool") == true)
        f.holdings.setHugeTLBPoolGrownByHintSource(false)
        #expect(try m.take(maxPages: 512, hugeOnly: true).blocks.count == 1, "the pool is back: surplus pages are taken again")
    }

    @Test("another running balloond's hugetlb hint source (its pool state file names a live balloond) also keeps surplus pages from being taken; a stale file does not")
    func takesNothingWhileAnotherBalloondHoldsThePool() throws {
        let f = BalloonFixture()
        let m = try f.hugeBackend()
        f.tree.stateFile("/run/balloond/hugetlb-pool", "nr_hugepages_before=0\nnr_hugepages_set=1\nnr_hugepages_previous=1\npid=4242\ncomm=balloond\n")
        f.tree.file("/proc/4242/comm", "balloond\n")
        let t = try m.take(maxPages: 512, hugeOnly: true)
        #expect(t.blocks.isEmpty && f.huge.mapCalls.isEmpty)
        #expect(t.limitedBy?.contains("hint source holds the hugetlb pool") == true)
        f.tree.file("/proc/4242/comm", "bash\n")   // the pid now runs something else: the file is stale
        #expect(try m.take(maxPages: 512, hugeOnly: true).blocks.count == 1)
    }

    @Test func prefersThePerSizeSysfsSetting() throws {
        let f = BalloonFixture()
        let perSize = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_overcommit_hugepages"
        f.tree.file(perSize, "0\n")
        #expect(HugeTLBBalloonMemory.overcommitSetting(root: f.tree.root) == perSize)
        let pages = FakeHugeTLBPages(tree: f.tree, memory: f.memory, overcommitFile: perSize, freeHeads: [512 * 50])
        let m = try HugeTLBBalloonMemory(root: f.tree.root, pages: pages, budget: f.budget)
        _ = try m.take(maxPages: 512, hugeOnly: true)
        #expect(f.tree.read(perSize) == "1\n" && f.overcommit == "0\n")
        m.releaseAll()
        #expect(f.tree.read(perSize) == "0\n")
    }

    @Test func noOvercommitSettingMeansNoBackend() {
        let tree = FakeTree()
        tree.meminfo(total: 1 << 30, free: 1 << 29, available: 1 << 29)
        #expect(HugeTLBBalloonMemory.overcommitSetting(root: tree.root) == nil)
        let memory = FakeGuestMemory(tree: tree, availableMiB: 512)
        #expect(throws: BalloonMemoryError.self) {
            _ = try HugeTLBBalloonMemory(root: tree.root, pages: FakeHugeTLBPages(tree: tree, memory: memory, freeHeads: []),
                                         budget: BalloonMemoryBudget(root: tree.root))
        }
    }

    // MARK: crash recovery

    /// What a balloond killed with SIGKILL while holding pages leaves: the raised setting and
    /// the state file (its surplus pages died with it).
    static func leaveCrashState(_ f: BalloonFixture, original: UInt64, set: UInt64, previous: UInt64, pid: Int32 = 999_999, comm: String = "balloond") throws {
        f.tree.file("/proc/sys/vm/nr_overcommit_hugepages", "\(set)\n")
        try SysctlStateFile(root: f.tree.root, path: SysctlStateFile.hugeTLBOvercommitPath)
            .write(.init(sysctl: "/proc/sys/vm/nr_overcommit_hugepages", original: original, set: set, previous: previous, pid: pid, comm: comm))
    }

    @Test func recoverAfterCrashRestoresTheOriginal() throws {
        let f = BalloonFixture()
        try Self.leaveCrashState(f, original: 2, set: 40, previous: 24)
        let outcome = try HugeTLBBalloonMemory.recoverAfterCrash(root: f.tree.root)
        #expect(outcome == .restored(sysctl: "/proc/sys/vm/nr_overcommit_hugepages", from: 40, to: 2))
        #expect(f.overcommit == "2\n" && f.hugeState == nil)
        #expect(try HugeTLBBalloonMemory.recoverAfterCrash(root: f.tree.root) == .nothingToDo)
    }

    @Test func recoverAfterCrashBetweenStateFileAndSettingWrite() throws {
        // Killed after writing set=40 to the state file but before writing the setting (24).
        let f = BalloonFixture()
        try Self.leaveCrashState(f, original: 2, set: 40, previous: 24)
        f.tree.file("/proc/sys/vm/nr_overcommit_hugepages", "24\n")
        #expect(try HugeTLBBalloonMemory.recoverAfterCrash(root: f.tree.root) == .restored(sysctl: "/proc/sys/vm/nr_overcommit_hugepages", from: 24, to: 2))
        #expect(f.overcommit == "2\n")
    }

    @Test func recoverAfterCrashLeavesOthersValuesAndRunningInstancesAlone() throws {
        let f = BalloonFixture()
        try Self.leaveCrashState(f, original: 2, set: 40, previous: 24)
        f.tree.file("/proc/sys/vm/nr_overcommit_hugepages", "7\n")  // an admin changed it since
        #expect(try HugeTLBBalloonMemory.recoverAfterCrash(root: f.tree.root) == .changedByOthers(sysctl: "/proc/sys/vm/nr_overcommit_hugepages", value: 7, original: 2))
        #expect(f.overcommit == "7\n" && f.hugeState == nil)

        try Self.leaveCrashState(f, original: 0, set: 4, previous: 0, pid: 4242)
        f.tree.file("/proc/4242/comm", "balloond\n")
        #expect(try HugeTLBBalloonMemory.recoverAfterCrash(root: f.tree.root) == .otherInstanceRunning(pid: 4242))
        #expect(f.overcommit == "4\n" && f.hugeState != nil)
        #expect(throws: BalloonMemoryError.self, "a running balloond's setting is not taken over") {
            _ = try f.hugeBackend().take(maxPages: 512, hugeOnly: true)
        }
    }

    @Test func takeAfterACrashRestoresFirstAndKeepsTheTrueOriginal() throws {
        let f = BalloonFixture()
        try Self.leaveCrashState(f, original: 1, set: 9, previous: 5)
        let m = try f.hugeBackend()
        let t = try m.take(maxPages: 2 * 512, hugeOnly: true)
        #expect(t.blocks.count == 2)
        #expect(f.huge.overcommitAtMap == [3], "1 (the true original) + 2, not 9 + 2")
        #expect(f.hugeState?.contains("original=1\n") == true)
        m.releaseAll()
        #expect(f.overcommit == "1\n")
    }

    @Test func restoreLeavesAValueSomeoneElseWrote() throws {
        let f = BalloonFixture()
        let m = try f.hugeBackend()
        _ = try m.take(maxPages: 2 * 512, hugeOnly: true)
        f.tree.file("/proc/sys/vm/nr_overcommit_hugepages", "50\n")
        m.releaseAll()
        #expect(f.overcommit == "50\n" && f.hugeState == nil)
    }

    // MARK: OOM score

    @Test func oomScoreIsRaisedWhileHeld() throws {
        let f = BalloonFixture()
        let m = try f.hugeBackend()
        let t = try m.take(maxPages: 2 * 512, hugeOnly: true)
        #expect(f.oomScore == "1000\n" && f.budget.oomScoreRaised)
        m.release([t.blocks[0]])
        #expect(f.oomScore == "1000\n")
        m.release([t.blocks[1]])
        #expect(f.oomScore == "0\n" && !f.budget.oomScoreRaised)
    }
}
