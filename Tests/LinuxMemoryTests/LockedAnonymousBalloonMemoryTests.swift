import TestSupport
import FreePages
import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux
import VirtioCore

@Suite struct LockedAnonymousBalloonMemoryTests {
    /// Blocks are well formed: ranges 4 KiB-aligned, ascending, disjoint, coalesced.
    static func checkWellFormed(_ b: BalloonBlock) {
        for (i, r) in b.ranges.enumerated() {
            #expect(r.start.value % 4096 == 0 && r.length % 4096 == 0 && r.length > 0)
            if i > 0 { #expect(b.ranges[i - 1].end < r.start.value, "ascending, disjoint and not touching (coalesced)") }
        }
    }

    @Test func takesBlocksOfUpTo512PagesAndFewerAtTheEnd() throws {
        let f = BalloonFixture()
        let m = f.smallBackend()
        #expect(m.name == "locked-anonymous")
        let t = try m.take(maxPages: 1300, hugeOnly: false)
        #expect(t.blocks.map(\.pageCount) == [512, 512, 276] && t.limitedBy == nil)
        #expect(f.small.mapCalls == [1300], "one mapping, three 2 MiB slots")
        t.blocks.forEach(Self.checkWellFormed)
        let frames = t.blocks.flatMap(\.frames)
        #expect(Set(frames).count == 1300 && Set(frames) == f.small.heldFrames, "exactly the frames held, each once")
        #expect(t.blocks.contains { $0.ranges.count > 1 }, "any physical order: several ranges per block")
        #expect(t.blocks.allSatisfy { !$0.isHuge })
        #expect(m.heldBytes == 1300 * 4096)
    }

    @Test func takesFewerThan512Pages() throws {
        let f = BalloonFixture()
        let t = try f.smallBackend().take(maxPages: 100, hugeOnly: false)
        #expect(t.blocks.count == 1 && t.pageCount == 100 && t.limitedBy == nil)
    }

    @Test func hugeOnlyTakesNothing() throws {
        let f = BalloonFixture()
        let t = try f.smallBackend().take(maxPages: 4096, hugeOnly: true)
        #expect(t.blocks.isEmpty && f.small.mapCalls.isEmpty)
        #expect(t.limitedBy?.contains("cannot provide the 2 MiB-aligned contiguous blocks") == true)
        #expect(f.compact == "1\n", "nothing changed")
    }

    @Test func compactUnevictableIsZeroWhileHeldAndRestoredAfter() throws {
        let f = BalloonFixture()
        let m = f.smallBackend()
        let t = try m.take(maxPages: 1024, hugeOnly: false)
        #expect(f.small.compactAtMap == ["0\n"], "set to 0 before the pages are mapped")
        #expect(f.compact == "0\n")
        let state = try #require(f.compactState)
        #expect(state.contains("sysctl=/proc/sys/vm/compact_unevictable_allowed\n") && state.contains("original=1\n") && state.contains("set=0\n"))
        m.release([t.blocks[0]])
        #expect(f.compact == "0\n", "still holding a block")
        m.release([t.blocks[1]])
        #expect(f.compact == "1\n" && f.compactState == nil)
        #expect(f.small.mapped.isEmpty && m.heldBytes == 0)
    }

    @Test func releaseAllRestoresCompaction() throws {
        let f = BalloonFixture()
        let m = f.smallBackend()
        _ = try m.take(maxPages: 2000, hugeOnly: false)
        m.releaseAll()
        #expect(f.compact == "1\n" && f.compactState == nil && f.small.mapped.isEmpty)
    }

    @Test func leavesCompactionAloneWhenAlreadyOffOrAbsent() throws {
        let f = BalloonFixture()
        f.tree.file("/proc/sys/vm/compact_unevictable_allowed", "0\n")
        let m = f.smallBackend()
        _ = try m.take(maxPages: 10, hugeOnly: false)
        #expect(f.compactState == nil)
        m.releaseAll()
        #expect(f.compact == "0\n")

        f.tree.remove("/proc/sys/vm/compact_unevictable_allowed")  // CONFIG_COMPACTION=n
        let t = try f.smallBackend().take(maxPages: 10, hugeOnly: false)
        #expect(t.pageCount == 10 && f.compactState == nil)
    }

    @Test func refusesWhenCompactionCannotBeTurnedOff() throws {
        let f = BalloonFixture()
        f.tree.remove("/proc/sys/vm/compact_unevictable_allowed")
        try Sys.makeDirectories(f.tree.at("/proc/sys/vm/compact_unevictable_allowed"))  // unreadable, unwritable
        let m = f.smallBackend()
        #expect {
            _ = try m.take(maxPages: 10, hugeOnly: false)
        } throws: { e in
            guard case .compactionNotPrevented(let path, _)? = reason(e, as: LinuxBalloonMemoryError.self) else { return false }
            return path == f.tree.at("/proc/sys/vm/compact_unevictable_allowed")
        }
        #expect(f.small.mapCalls.isEmpty && f.oomScore == "0\n")
    }

    @Test func setsCompactionAgainIfSomeoneTurnedItBackOn() throws {
        let f = BalloonFixture()
        let m = f.smallBackend()
        _ = try m.take(maxPages: 10, hugeOnly: false)
        f.tree.file("/proc/sys/vm/compact_unevictable_allowed", "1\n")
        _ = try m.take(maxPages: 10, hugeOnly: false)
        #expect(f.small.compactAtMap == ["0\n", "0\n"])
        m.releaseAll()
        #expect(f.compact == "1\n" && f.compactState == nil)
    }

    @Test func crashRecoveryRestoresCompaction() throws {
        let f = BalloonFixture()
        f.tree.file("/proc/sys/vm/compact_unevictable_allowed", "0\n")
        try SysctlStateFile(root: f.tree.root, path: SysctlStateFile.compactUnevictablePath)
            .write(.init(sysctl: "/proc/sys/vm/compact_unevictable_allowed", original: 1, set: 0, previous: 1, pid: 999_999, comm: "balloond"))
        #expect(try LockedAnonymousBalloonMemory.recoverAfterCrash(root: f.tree.root) == .restored(sysctl: "/proc/sys/vm/compact_unevictable_allowed", from: 0, to: 1))
        #expect(f.compact == "1\n" && f.compactState == nil)
    }

    @Test func takeAfterACrashKeepsTheTrueOriginal() throws {
        let f = BalloonFixture()
        f.tree.file("/proc/sys/vm/compact_unevictable_allowed", "0\n")
        try SysctlStateFile(root: f.tree.root, path: SysctlStateFile.compactUnevictablePath)
            .write(.init(sysctl: "/proc/sys/vm/compact_unevictable_allowed", original: 1, set: 0, previous: 1, pid: 999_999, comm: "balloond"))
        let m = f.smallBackend()
        _ = try m.take(maxPages: 10, hugeOnly: false)
        #expect(f.compact == "0\n" && f.compactState?.contains("original=1\n") == true)
        m.releaseAll()
        #expect(f.compact == "1\n", "not the dead process's 0")
    }

    @Test func stepsStopAtTheAllowance() throws {
        // 100 MiB available − 64 MiB margin = 36 MiB = 9216 pages, in 8 MiB steps of whole blocks.
        let f = BalloonFixture(availableMiB: 100)
        let m = f.smallBackend(stepMiB: 8)
        let t = try m.take(maxPages: 20_000, hugeOnly: false)
        #expect(f.small.mapCalls == [2048, 2048, 2048, 2048, 1024])
        #expect(t.pageCount == 9216)
        #expect(t.blocks.allSatisfy { $0.pageCount == 512 }, "whole blocks while more is asked")
        #expect(t.limitedBy?.contains("MemAvailable 64 MiB − margin 64 MiB") == true)
    }

    @Test func pressureStallsStopTakingMidWay() throws {
        let f = BalloonFixture()
        f.tree.file("/proc/pressure/memory", "some avg10=0.00 avg60=0.00 avg300=0.00 total=1000000\n")
        final class Stall: LockedAnonymousPages {
            let inner: FakeLockedPages
            let tree: FakeTree
            init(_ inner: FakeLockedPages, _ tree: FakeTree) { self.inner = inner; self.tree = tree }
            func mapLocked(pages: Int) throws(BalloonMapFailure) -> BalloonMapping {
                // Taking memory makes tasks stall 200 ms.
                tree.file("/proc/pressure/memory", "some avg10=0.50 avg60=0.00 avg300=0.00 total=1200000\n")
                return try inner.mapLocked(pages: pages)
            }
            func pagemap(at address: UInt, pages: Int) throws(GuestMemoryError) -> [PagemapEntry] { try inner.pagemap(at: address, pages: pages) }
        }
        let m = LockedAnonymousBalloonMemory(root: f.tree.root, pages: Stall(f.small, f.tree), budget: f.budget, options: .init(stepBytes: 4 << 20))
        let t = try m.take(maxPages: 10_000, hugeOnly: false)
        #expect(t.pageCount == 1024, "one step, then the stall stops it")
        #expect(t.limitedBy?.contains("stalled 200 ms") == true)
    }

    @Test func enomemHalvesTheStepThenStops() throws {
        let f = BalloonFixture()
        f.small.maxPagesPerMap = 1024
        let m = f.smallBackend(stepMiB: 16)
        let t = try m.take(maxPages: 3000, hugeOnly: false)
        // 3000 fails; steps of 1024 (whole blocks) work; the last 952 too.
        #expect(f.small.mapCalls == [3000, 1024, 1024, 952])
        #expect(t.pageCount == 3000 && t.limitedBy == nil)

        f.small.maxPagesPerMap = 0
        let t2 = try m.take(maxPages: 2000, hugeOnly: false)
        #expect(t2.blocks.isEmpty)
        #expect(t2.limitedBy?.hasPrefix("no memory to be had: populating") == true && t2.limitedBy?.contains("errno 12") == true, "ENOMEM")
    }

    @Test func unusableMappingThrowsOrKeepsWhatWasTaken() throws {
        let f = BalloonFixture()
        let m = f.smallBackend()
        let failure = BalloonMapFailure(.lockedAnonymous, count: 100, step: .lock, SystemCallError(call: "mlock", path: nil, errno: .notPermitted))
        f.small.failNext = failure
        #expect {
            _ = try m.take(maxPages: 100, hugeOnly: false)
        } throws: { reason($0, as: LinuxBalloonMemoryError.self) == .mapFailed(failure) }
        #expect(f.compact == "1\n" && f.compactState == nil, "nothing held: compaction restored")
        #expect(f.oomScore == "0\n")
    }

    @Test func hiddenPFNsAreRefused() throws {
        let f = BalloonFixture()
        f.small.hidePFNs = true
        #expect {
            _ = try f.smallBackend().take(maxPages: 100, hugeOnly: false)
        } throws: { reason($0, as: LinuxBalloonMemoryError.self) == .pfnsHidden }
        #expect(f.small.mapped.isEmpty, "unmapped again")
    }

    @Test func stillInPlaceRereadsThePagemap() throws {
        let f = BalloonFixture()
        let m = f.smallBackend()
        let t = try m.take(maxPages: 1024, hugeOnly: false)
        #expect(t.blocks.allSatisfy { m.stillInPlace($0) })
        let frame = t.blocks[1].frames[100]
        let va = try #require(f.small.mapped.first { $0.value == frame }?.key)
        f.small.moves[va] = 7_777_777
        #expect(m.stillInPlace(t.blocks[0]))
        #expect(!m.stillInPlace(t.blocks[1]), "a page of the block moved")
        m.release([t.blocks[0]])
        #expect(!m.stillInPlace(t.blocks[0]), "released")
    }

    @Test func oomScoreIsRaisedWhileHeld() throws {
        let f = BalloonFixture()
        let m = f.smallBackend()
        let t = try m.take(maxPages: 600, hugeOnly: false)
        #expect(f.oomScore == "1000\n")
        m.release(t.blocks)
        #expect(f.oomScore == "0\n")
    }
}
