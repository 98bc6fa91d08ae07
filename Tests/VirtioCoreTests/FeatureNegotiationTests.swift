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

    @Test("ACCESS_PLATFORM offered but not wanted (uio) is refused, and the error says why and names --backend vfio")
    func accessPlatformMessage() {
        let allButAccessPlatform = FeatureBits(rawValue: ~0).subtracting(.accessPlatform)
        do {
            _ = try negotiateFeatures(offered: Self.qemuDefault.union(.accessPlatform), wanted: allButAccessPlatform)
            Issue.record("expected a refusal")
        } catch {
            #expect(error == .accessPlatformRequired)
            #expect(error.description.contains("iommu_platform"))
            #expect(error.description.contains("--backend vfio"))
        }
    }

    @Test("ACCESS_PLATFORM is accepted only when offered and wanted (vfio maps what the device reaches)")
    func accessPlatformWanted() throws {
        let offered = Self.qemuDefault.union(.accessPlatform)
        let accepted = try negotiateFeatures(offered: offered, wanted: [.statsVQ, .accessPlatform])
        #expect(accepted == [.statsVQ, .accessPlatform, .version1])
        // Wanted but not offered: not accepted (and no error).
        #expect(try negotiateFeatures(offered: Self.qemuDefault, wanted: [.statsVQ, .accessPlatform]).contains(.accessPlatform) == false)
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
