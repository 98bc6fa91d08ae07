import Testing
@testable import VirtioCore

@Suite("Feature negotiation (virtio-balloon.md §1.5)")
struct FeatureNegotiationTests {
    struct Case: Sendable, CustomStringConvertible {
        let name: String
        let offered: FeatureBits
        let wanted: FeatureBits
        let expected: FeatureBits?
        var description: String { name }
    }

    static let qemuDefault = FeatureBits(low: 0x3000_0012, high: 0x0000_0101)
    static let qemuAll = FeatureBits(low: 0x3000_003e, high: 0x0000_0101)

    static let cases: [Case] = [
        Case(name: "QEMU default offer, balloond wants stats+poison", offered: qemuDefault,
             wanted: [.statsVQ, .pagePoison, .version1], expected: [.statsVQ, .pagePoison, .version1]),
        Case(name: "VERSION_1 is always accepted even if not asked for", offered: qemuDefault,
             wanted: [.statsVQ], expected: [.statsVQ, .version1]),
        Case(name: "bits not offered are never accepted", offered: qemuDefault,
             wanted: [.statsVQ, .freePageHint, .reporting, .version1], expected: [.statsVQ, .version1]),
        Case(name: "full offer with hint and reporting", offered: qemuAll,
             wanted: [.statsVQ, .freePageHint, .reporting, .deflateOnOOM, .version1],
             expected: [.statsVQ, .freePageHint, .reporting, .deflateOnOOM, .version1]),
        Case(name: "unknown device bits (>= 6) are never accepted", offered: qemuDefault.union(FeatureBits(bit: 6)).union(FeatureBits(bit: 8)),
             wanted: FeatureBits(rawValue: ~0), expected: [.statsVQ, .pagePoison, .version1, .indirectDesc, .eventIdx, .ringReset]),
        Case(name: "legacy-only device (no VERSION_1) is refused", offered: FeatureBits(low: 0x12, high: 0), wanted: [.statsVQ], expected: nil),
        Case(name: "ACCESS_PLATFORM offered is refused", offered: qemuDefault.union(.accessPlatform), wanted: [.statsVQ], expected: nil),
    ]

    @Test("negotiateFeatures", arguments: cases)
    func negotiation(_ c: Case) {
        if let expected = c.expected {
            #expect((try? negotiateFeatures(offered: c.offered, wanted: c.wanted)) == expected)
        } else {
            #expect(throws: FeatureNegotiationError.self) { try negotiateFeatures(offered: c.offered, wanted: c.wanted) }
        }
    }

    @Test("ACCESS_PLATFORM is never accepted, and the error says why")
    func accessPlatformMessage() {
        do {
            _ = try negotiateFeatures(offered: Self.qemuDefault.union(.accessPlatform), wanted: FeatureBits(rawValue: ~0))
            Issue.record("expected a refusal")
        } catch {
            #expect(error == .accessPlatformRequired)
            #expect(error.description.contains("iommu_platform"))
        }
    }

    @Test("feature halves round-trip and names are readable")
    func halves() {
        let f = FeatureBits(low: 0x3000_0012, high: 0x101)
        #expect(f.low == 0x3000_0012)
        #expect(f.high == 0x101)
        #expect(f.contains(.version1) && f.contains(.ringReset) && f.contains(.statsVQ) && f.contains(.pagePoison))
        #expect(f.names == ["STATS_VQ", "PAGE_POISON", "INDIRECT_DESC", "EVENT_IDX", "VERSION_1", "RING_RESET"])
        #expect(FeatureBits(bit: 45).names == ["bit(45)"])
    }
}

@Suite("QEMU's balloon queue numbering (virtio-balloon.md §3.2)")
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

@Suite("Balloon config values")
struct BalloonConfigTests {
    @Test("cmd id values: 0 STOP, 1 DONE, anything else a round")
    func commands() {
        #expect(FreePageHintCommand(rawValue: 0) == .stop)
        #expect(FreePageHintCommand(rawValue: 1) == .done)
        #expect(FreePageHintCommand(rawValue: 0x8000_0001) == .round(0x8000_0001))
        #expect(FreePageHintCommand(rawValue: 2) == .round(2))
        #expect(FreePageHintCommand.round(7).rawValue == 7)
    }

    @Test("poison_val as Linux writes it: 0xAAAAAAAA for page_poison, 0 for init_on_free, none otherwise")
    func poisonValues() {
        #expect(PagePoisonPolicy.poison.poisonValue == 0xAAAA_AAAA)
        #expect(PagePoisonPolicy.initOnFree.poisonValue == 0)
        #expect(PagePoisonPolicy.none.poisonValue == nil)
    }

    @Test("balloon PFNs are 4 KiB frames and must fit 32 bits")
    func pfns() {
        #expect(PhysicalAddress(0x1234_5000).balloonPFN == 0x12345)
        #expect(PhysicalAddress(UInt64(UInt32.max) << 12).balloonPFN == UInt32.max)
        #expect(PhysicalAddress(1 << 44).balloonPFN == nil)
    }

    @Test("device status names every bit")
    func statusNames() {
        let s: DeviceStatus = [.acknowledge, .driver, .featuresOK, .driverOK, .needsReset]
        #expect(s.description == "0x4f (ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK|NEEDS_RESET)")
        #expect(DeviceStatus().description == "0 (reset)")
    }
}
