import Testing
import VirtioCore
import VirtioPCI
import FreePages
@testable import Balloon

@Suite("wantedFeatures with device addressing: ACCESS_PLATFORM only when the driver's addresses are IOMMU-mapped")
struct DeviceAddressingTests {
    typealias Driver = BalloonDriver<ModernPCITransport>
    let all: FeatureBits = [.statsVQ, .freePageHint, .pagePoison, .deflateOnOOM, .reporting, .version1]
    var allWithPlatform: FeatureBits { all.union([.accessPlatform]) }

    @Test("guest-physical addressing never asks for ACCESS_PLATFORM, offered or not, even if implemented")
    func guestPhysical() {
        for offered in [all, allWithPlatform] {
            for implemented in [balloonImplementedFeatures, balloonImplementedFeatures.union([.accessPlatform])] {
                let want = Driver.wantedFeatures(offered: offered, implemented: implemented, poison: .none, addressing: .guestPhysical)
                #expect(!want.contains(.accessPlatform))
            }
        }
        // The default is guest-physical.
        #expect(Driver.wantedFeatures(offered: allWithPlatform, implemented: balloonImplementedFeatures, poison: .none)
            == Driver.wantedFeatures(offered: allWithPlatform, implemented: balloonImplementedFeatures, poison: .none, addressing: .guestPhysical))
    }

    @Test("IOMMU addressing without owned memory mapped: ACCESS_PLATFORM accepted, free page hinting and reporting left out")
    func iommuUnmappedOwnedMemory() {
        let want = Driver.wantedFeatures(offered: allWithPlatform, implemented: balloonImplementedFeatures, poison: .none,
                                         addressing: .iommu(hintsMapped: false, reportsMapped: false))
        #expect(want.contains(.accessPlatform))
        #expect(!want.contains(.freePageHint))
        #expect(!want.contains(.reporting))
        #expect(want.isSuperset(of: [.statsVQ, .deflateOnOOM, .version1]))
        // Negotiation then accepts ACCESS_PLATFORM instead of refusing the device.
        let accepted = try? negotiateFeatures(offered: allWithPlatform, wanted: want)
        #expect(accepted?.contains(.accessPlatform) == true)
    }

    @Test("IOMMU addressing with owned memory mapped keeps hinting and reporting beside ACCESS_PLATFORM")
    func iommuMappedOwnedMemory() {
        let want = Driver.wantedFeatures(offered: allWithPlatform, implemented: balloonImplementedFeatures, poison: .none,
                                         addressing: .iommu(hintsMapped: true, reportsMapped: true))
        #expect(want.isSuperset(of: [.accessPlatform, .freePageHint, .reporting, .statsVQ]))
    }

    @Test("IOMMU addressing keeps each feature whose memory is mapped and drops the other")
    func iommuPartlyMapped() {
        let hintsOnly = Driver.wantedFeatures(offered: allWithPlatform, implemented: balloonImplementedFeatures, poison: .none,
                                              addressing: .iommu(hintsMapped: true, reportsMapped: false))
        #expect(hintsOnly.contains(.freePageHint) && !hintsOnly.contains(.reporting) && hintsOnly.contains(.accessPlatform))
        let reportsOnly = Driver.wantedFeatures(offered: allWithPlatform, implemented: balloonImplementedFeatures, poison: .none,
                                                addressing: .iommu(hintsMapped: false, reportsMapped: true))
        #expect(!reportsOnly.contains(.freePageHint) && reportsOnly.contains(.reporting) && reportsOnly.contains(.accessPlatform))
    }

    @Test("IOMMU addressing when ACCESS_PLATFORM is not offered changes nothing against guest-physical", arguments: [true, false])
    func iommuNotOffered(mapped: Bool) {
        for poison in [PagePoisonPolicy.none, .poison] {
            let iommu = Driver.wantedFeatures(offered: all, implemented: balloonImplementedFeatures, poison: poison, addressing: .iommu(hintsMapped: mapped, reportsMapped: mapped))
            let plain = Driver.wantedFeatures(offered: all, implemented: balloonImplementedFeatures, poison: poison, addressing: .guestPhysical)
            #expect(iommu == plain)
            #expect(!iommu.contains(.accessPlatform))
        }
    }

    @Test("the poison rule still applies under IOMMU addressing: REPORTING dropped without PAGE_POISON offered")
    func poisonRuleKept() {
        let offered: FeatureBits = [.statsVQ, .reporting, .version1, .accessPlatform]
        let want = Driver.wantedFeatures(offered: offered, implemented: [.statsVQ, .reporting, .pagePoison], poison: .poison,
                                         addressing: .iommu(hintsMapped: true, reportsMapped: true))
        #expect(want.contains(.accessPlatform) && !want.contains(.reporting))
    }
}
