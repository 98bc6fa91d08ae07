import Testing
@testable import VirtioCore

@Suite("QEMU's balloon queue numbering (docs/virtio-balloon.md §3.2)")
struct QueueNumberingTests {
    struct Case: Sendable, CustomStringConvertible {
        let hint: Bool
        let reporting: Bool
        let expectedHint: UInt16?
        let expectedReporting: UInt16?
        let count: UInt16
        var description: String { "hint=\(hint) reporting=\(reporting)" }
    }

    @Test("queues follow the offered features, not the negotiated ones", arguments: [
        Case(hint: false, reporting: false, expectedHint: nil, expectedReporting: nil, count: 3),
        Case(hint: true, reporting: false, expectedHint: 3, expectedReporting: nil, count: 4),
        Case(hint: false, reporting: true, expectedHint: nil, expectedReporting: 3, count: 4),
        Case(hint: true, reporting: true, expectedHint: 3, expectedReporting: 4, count: 5),
    ])
    func numbering(_ c: Case) {
        var offered: FeatureBits = [.statsVQ, .version1]
        if c.hint { offered.insert(.freePageHint) }
        if c.reporting { offered.insert(.reporting) }
        let idx = BalloonQueueIndices(offered: offered)
        #expect(idx.inflate == 0)
        #expect(idx.deflate == 1)
        #expect(idx.stats == 2)
        #expect(idx.freePageHint == c.expectedHint)
        #expect(idx.reporting == c.expectedReporting)
        #expect(idx.count == c.count)
    }

    @Test("stats is index 2 even when STATS_VQ is not offered")
    func statsAlwaysTwo() {
        let idx = BalloonQueueIndices(offered: [.version1, .reporting])
        #expect(idx.stats == 2)
        #expect(idx.reporting == 3)
    }
}
