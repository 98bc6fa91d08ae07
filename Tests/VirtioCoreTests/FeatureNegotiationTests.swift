import Testing
@testable import VirtioCore

@Suite("Feature negotiation (docs/virtio-balloon.md §1.5)")
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
