import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import VirtioCore

@Suite struct OutstandingHintsTests {
    let a = GuestPhysicalRange(start: 0x20_0000, length: 0x20_0000)
    let b = GuestPhysicalRange(start: 0x40_0000, length: 0x20_0000)

    @Test func countsPerRangeAndTag() {
        var o = OutstandingHints<Int>()
        o.handedOut(a, tag: 1)
        o.handedOut(a, tag: 1)   // the same range in two rounds
        o.handedOut(b, tag: 2)
        #expect(o.total == 3)
        #expect(o.applied(a) == 1)
        #expect(o.outstanding(1) == 1)
        #expect(o.applied(a) == 1)
        #expect(o.outstanding(1) == 0)
        #expect(o.applied(a) == nil)   // not ours any more
        #expect(o.applied(b) == 2)
        #expect(o.total == 0)
    }

    @Test func ignoresForeignRanges() {
        var o = OutstandingHints<Int>()
        o.handedOut(a, tag: 0)
        #expect(o.applied(b) == nil)
        #expect(o.total == 1)
    }

    /// After DONE, old descriptors come back before any new one (the queue is used in
    /// order): a returning range matching a ghost must not count against the new session.
    @Test func ghostsAreConsumedFirst() {
        var o = OutstandingHints<Int>()
        o.handedOut(a, tag: 1)
        o.retireAll()
        #expect(o.ghostCount == 1)
        o.handedOut(a, tag: 2)
        #expect(o.applied(a) == nil)          // the old descriptor
        #expect(o.outstanding(2) == 1)        // the new one is still out
        #expect(o.applied(a) == 2)
        #expect(o.outstanding(2) == 0)
    }

    /// After a reset the old descriptors never come back; the first non-ghost completion
    /// proves it and clears the ghosts.
    @Test func nonGhostCompletionClearsGhosts() {
        var o = OutstandingHints<Int>()
        o.handedOut(a, tag: 1)
        o.retireAll()
        o.handedOut(b, tag: 2)
        #expect(o.applied(b) == 2)
        #expect(o.ghostCount == 0)
    }
}
