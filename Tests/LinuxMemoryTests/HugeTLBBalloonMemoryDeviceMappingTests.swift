import TestSupport
import Testing
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux
import VirtioCore

/// Free page reporting under vfio with ACCESS_PLATFORM: QEMU translates a report's address
/// through the vIOMMU, so every 2 MiB page the balloon memory holds is mapped there at its
/// guest-physical address, and unmapped before it goes back to the guest.
@Suite("Hugetlb balloon pages through the IOMMU (vfio with ACCESS_PLATFORM)")
struct HugeTLBBalloonMemoryDeviceMappingTests {
    @Test("each taken 2 MiB page is mapped at IOVA = GPA from its own slot; release unmaps it before the page is unmapped")
    func mapsAtGuestPhysical() throws {
        let f = BalloonFixture()
        let m = try f.hugeBackend()
        let mapper = RecordingMapper()
        m.deviceMapper = mapper
        let t = try m.take(maxPages: 3 * 512, hugeOnly: true)
        #expect(t.blocks.count == 3)
        #expect(Set(mapper.live.keys) == Set(t.blocks.map { $0.ranges[0].start.value }))
        #expect(mapper.live.values.allSatisfy { $0.length == 2 << 20 })
        #expect(Set(mapper.live.values.map(\.virtual)) == Set(f.huge.mapped.keys), "each mapping is backed by the slot holding that page")
        m.release([t.blocks[0]])
        #expect(mapper.live[t.blocks[0].ranges[0].start.value] == nil)
        #expect(f.huge.mapped.count == 2)
        m.releaseAll()
        #expect(mapper.live.isEmpty && f.huge.mapped.isEmpty)
    }

    @Test("a page whose IOMMU mapping cannot be removed is never given back")
    func keptWhenUnmapFails() throws {
        let f = BalloonFixture()
        let m = try f.hugeBackend()
        let mapper = RecordingMapper()
        m.deviceMapper = mapper
        let t = try m.take(maxPages: 2 * 512, hugeOnly: true)
        mapper.failUnmaps = true
        m.release(t.blocks)
        #expect(f.huge.mapped.count == 2, "pages the device may still reach went back to the guest")
        m.releaseAll()
        #expect(f.huge.mapped.count == 2)
    }

    @Test("a failed mapping gives back every page of that step, unmapping the ones already mapped, and says why")
    func mapFailureUndoesTheStep() throws {
        let f = BalloonFixture()
        let m = try f.hugeBackend()
        let mapper = RecordingMapper()
        mapper.failMapsAfter = 1
        m.deviceMapper = mapper
        do {
            _ = try m.take(maxPages: 3 * 512, hugeOnly: true)
            Issue.record("nothing taken: the take must fail with the mapping error")
        } catch {
            #expect(error.description.contains("VFIO_IOMMU_MAP_DMA"), "\(error)")
        }
        #expect(mapper.live.isEmpty)
        #expect(f.huge.mapped.isEmpty && m.heldBytes == 0)
    }
}
