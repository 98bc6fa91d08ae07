import TestSupport
import FreePages
import Logging
import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux
import VirtioCore

@Suite struct TieredBalloonMemoryTests {
    static func tiered(_ f: BalloonFixture) throws -> TieredBalloonMemory {
        TieredBalloonMemory(huge: try f.hugeBackend(), small: f.smallBackend())
    }

    @Test func splitsIntoHugeBlocksAndAnonymousPages() throws {
        let f = BalloonFixture()
        let m = try Self.tiered(f)
        #expect(m.name == "hugetlb+anonymous")
        let t = try m.take(maxPages: 1300, hugeOnly: false)
        #expect(t.pageCount == 1300 && t.limitedBy == nil)
        let huge = t.blocks.filter { $0.isHuge }
        #expect(huge.count == 2)
        #expect(t.blocks.count == 3 && t.blocks[2].pageCount == 276 && !t.blocks[2].isHuge)
        #expect(f.huge.mapCalls == [2] && f.small.mapCalls == [276])
        #expect(Set(t.blocks.map(\.handle)).count == 3)
        #expect(m.heldBytes == 1300 * 4096)
    }

    @Test func anonymousTakesWhatHugeTLBCannotGive() throws {
        let f = BalloonFixture(hugeFrames: 100..<101)
        let m = try Self.tiered(f)
        let t = try m.take(maxPages: 4 * 512, hugeOnly: false)
        #expect(t.pageCount == 2048 && t.limitedBy == nil)
        #expect(t.blocks.filter { $0.isHuge }.count == 1)
        #expect(f.small.mapCalls == [1536])
        #expect(m.lastHugeShortfall?.contains("ENOMEM") == true, "the shortfall is kept for status")
    }

    @Test func hugeOnlyUsesOnlyHugeTLB() throws {
        let f = BalloonFixture(hugeFrames: 100..<103)
        let m = try Self.tiered(f)
        let t = try m.take(maxPages: 8 * 512, hugeOnly: true)
        #expect(t.blocks.count == 3 && t.blocks.allSatisfy { $0.isHuge })
        #expect(f.small.mapCalls.isEmpty)
        #expect(t.limitedBy?.contains("ENOMEM") == true)
        let t2 = try m.take(maxPages: 100, hugeOnly: true)
        #expect(t2.blocks.isEmpty && t2.limitedBy?.contains("less than one") == true)
    }

    @Test func whenBothAreShortTheReasonNamesBoth() throws {
        let f = BalloonFixture(availableMiB: 72, hugeFrames: 100..<101)
        let m = try Self.tiered(f)
        let t = try m.take(maxPages: 8 * 512, hugeOnly: false)
        // 8 MiB allowance: one 2 MiB hugetlb page (no more blocks), then 6 MiB anonymous.
        #expect(t.pageCount == 4 * 512)
        let why = try #require(t.limitedBy)
        #expect(why.hasPrefix("hugetlb: no 2 MiB page to be had") && why.contains("; anonymous: allowance"), "\(why)")
    }

    @Test func releaseAndStillInPlaceGoToTheOwner() throws {
        let f = BalloonFixture()
        let m = try Self.tiered(f)
        let t1 = try m.take(maxPages: 2 * 512 + 300, hugeOnly: false)
        let t2 = try m.take(maxPages: 200, hugeOnly: false)
        let blocks = t1.blocks + t2.blocks
        let huge = blocks.filter { $0.isHuge }
        let small = blocks.filter { !$0.isHuge }
        #expect(huge.count == 2 && small.map(\.pageCount) == [300, 200])
        #expect(blocks.allSatisfy { m.stillInPlace($0) })

        // A moved anonymous page is seen through the tiered backend; the huge blocks are fine.
        let va = try #require(f.small.mapped.first { $0.value == small[0].frames[3] }?.key)
        f.small.moves[va] = 5_555_555
        #expect(!m.stillInPlace(small[0]) && m.stillInPlace(small[1]) && m.stillInPlace(huge[0]))

        m.release([huge[0], small[1]])
        #expect(f.huge.unmapCount == 1 && f.small.unmappedSlots == 1)
        #expect(f.huge.mapped.count == 1 && f.small.mapped.count == 300)
        #expect(!m.stillInPlace(huge[0]) && m.stillInPlace(huge[1]))
        m.release([small[0], huge[1]])
        #expect(f.huge.mapped.isEmpty && f.small.mapped.isEmpty && m.heldBytes == 0)
        #expect(f.overcommit == "0\n" && f.compact == "1\n")
    }

    @Test func aBrokenHugeTLBBackendIsDroppedForAnonymous() throws {
        let f = BalloonFixture()
        f.huge.hidePFNs = true
        let m = try Self.tiered(f)
        let t = try m.take(maxPages: 1024, hugeOnly: false)
        #expect(t.pageCount == 1024 && t.blocks.allSatisfy { !$0.isHuge })
        #expect(m.hugeDisabledBecause?.reason(as: LinuxBalloonMemoryError.self) == .badHugePage(index: 0, .pfnsHidden))
        _ = try m.take(maxPages: 1024, hugeOnly: false)
        #expect(f.huge.mapCalls.count == 1, "not asked again")
        let h = try m.take(maxPages: 1024, hugeOnly: true)
        #expect(h.blocks.isEmpty && h.limitedBy?.contains("hugetlb is not used") == true)
    }

    @Test func oomScoreStaysRaisedUntilBothBackendsHoldNothing() throws {
        let f = BalloonFixture()
        let m = try Self.tiered(f)
        let t = try m.take(maxPages: 1300, hugeOnly: false)
        #expect(f.oomScore == "1000\n")
        m.release(t.blocks.filter { $0.isHuge })
        #expect(f.oomScore == "1000\n", "anonymous memory is still held")
        m.release(t.blocks.filter { !$0.isHuge })
        #expect(f.oomScore == "0\n")
        _ = try m.take(maxPages: 512, hugeOnly: false)
        #expect(f.oomScore == "1000\n")
        m.releaseAll()
        #expect(f.oomScore == "0\n" && f.overcommit == "0\n" && f.compact == "1\n")
    }

    @Test func oomScoreHoldersAreCountedAcrossSources() {
        // The anonymous hint source and the balloon each hold their own adjustment, on the
        // one GuestMemoryHoldings balloond shares between them.
        let tree = FakeTree()
        tree.file("/proc/self/oom_score_adj", "-100\n")
        let holdings = GuestMemoryHoldings(root: tree.root)
        let a = OOMScoreAdjustment(holdings: holdings), b = OOMScoreAdjustment(holdings: holdings)
        #expect(a.raise() == nil && b.raise() == nil)
        #expect(tree.read("/proc/self/oom_score_adj") == "1000\n")
        #expect(a.restore() == nil)
        #expect(tree.read("/proc/self/oom_score_adj") == "1000\n", "b still holds memory")
        #expect(b.restore() == nil)
        #expect(tree.read("/proc/self/oom_score_adj") == "-100\n")
    }

    // MARK: factory

    @Test func factoryBuildsTheTieredBackendWhenHugeTLBCanBeUsed() throws {
        let f = BalloonFixture()
        let m = makeLinuxBalloonMemory(root: f.tree.root, hugePages: f.huge, smallPages: f.small, effectiveUID: 0)
        #expect(m.name == "hugetlb+anonymous")
        let t = try m.take(maxPages: 1300, hugeOnly: false)
        #expect(t.blocks.filter { $0.isHuge }.count == 2 && t.pageCount == 1300)
        #expect(f.oomScore == "1000\n")
        m.releaseAll()
        #expect(f.oomScore == "0\n")
    }

    @Test func factoryFallsBackToAnonymousWithAReason() throws {
        let f = BalloonFixture()
        #expect(hugeTLBBalloonUnavailableReason(root: f.tree.root, effectiveUID: 1000)?.contains("not root") == true)
        #expect(makeLinuxBalloonMemory(root: f.tree.root, hugePages: f.huge, smallPages: f.small, effectiveUID: 1000).name == "locked-anonymous")

        f.tree.remove("/proc/sys/vm/nr_hugepages")
        #expect(hugeTLBBalloonUnavailableReason(root: f.tree.root, effectiveUID: 0)?.contains("CONFIG_HUGETLBFS") == true)
        #expect(makeLinuxBalloonMemory(root: f.tree.root, hugePages: f.huge, smallPages: f.small, effectiveUID: 0).name == "locked-anonymous")

        f.tree.file("/proc/sys/vm/nr_hugepages", "0\n")
        f.tree.remove("/proc/sys/vm/nr_overcommit_hugepages")
        #expect(hugeTLBBalloonUnavailableReason(root: f.tree.root, effectiveUID: 0)?.contains("nr_overcommit_hugepages") == true)
        #expect(makeLinuxBalloonMemory(root: f.tree.root, hugePages: f.huge, smallPages: f.small, effectiveUID: 0).name == "locked-anonymous")
    }

    @Test func factoryRestoresWhatAKilledBalloondLeft() throws {
        let f = BalloonFixture()
        f.tree.file("/proc/sys/vm/nr_overcommit_hugepages", "12\n")
        f.tree.file("/proc/sys/vm/compact_unevictable_allowed", "0\n")
        try SysctlStateFile(root: f.tree.root, path: SysctlStateFile.hugeTLBOvercommitPath)
            .write(.init(sysctl: "/proc/sys/vm/nr_overcommit_hugepages", original: 0, set: 12, previous: 8, pid: 999_999, comm: "balloond"))
        try SysctlStateFile(root: f.tree.root, path: SysctlStateFile.compactUnevictablePath)
            .write(.init(sysctl: "/proc/sys/vm/compact_unevictable_allowed", original: 1, set: 0, previous: 1, pid: 999_999, comm: "balloond"))
        _ = makeLinuxBalloonMemory(root: f.tree.root, hugePages: f.huge, smallPages: f.small, effectiveUID: 0)
        #expect(f.overcommit == "0\n" && f.compact == "1\n")
        #expect(f.hugeState == nil && f.compactState == nil)
    }
}
