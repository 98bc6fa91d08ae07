import TestSupport
import FreePages
import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
import PlatformLinux
import VirtioCore

/// Records the device mappings the anonymous source makes (vfio with ACCESS_PLATFORM) and
/// checks every unmap matches a live mapping.
final class RecordingMapper: DeviceAddressMapper {
    var next: UInt64 = 1 << 38
    private(set) var live: [UInt64: (virtual: UInt, length: Int)] = [:]
    private(set) var events: [String] = []
    var failNextWindow: VFIOError?
    var failUnmaps = false
    /// `map` fails once this many maps have succeeded (nil: never).
    var failMapsAfter: Int?
    private var maps = 0

    func map(virtualAddress: UInt, length: Int, at deviceAddress: UInt64) throws(VFIOError) {
        if let n = failMapsAfter, maps >= n { throw .mapFailed(iova: deviceAddress, size: UInt64(length), SystemCallError(call: "ioctl(VFIO_IOMMU_MAP_DMA)", path: nil, errno: .noSpace)) }
        maps += 1
        live[deviceAddress] = (virtualAddress, length)
        events.append("map")
    }

    func mapWindow(virtualAddress: UInt, length: Int) throws(VFIOError) -> UInt64 {
        if let e = failNextWindow { failNextWindow = nil; throw e }
        let iova = next
        next += UInt64(length)
        live[iova] = (virtualAddress, length)
        events.append("window")
        return iova
    }

    func unmap(deviceAddress: UInt64, length: Int) throws(VFIOError) {
        if failUnmaps { throw .unmapFailed(iova: deviceAddress, size: UInt64(length), unmapped: 0, nil) }
        guard let m = live[deviceAddress], m.length == length else {
            throw .badMapping(iova: deviceAddress, size: UInt64(length), reason: "not mapped")
        }
        live[deviceAddress] = nil
        events.append("unmap")
    }
}

@Suite("The anonymous source through the IOMMU (vfio with ACCESS_PLATFORM)")
struct AnonymousSourceDeviceMappingTests {
    @Test("each chunk is mapped once in the device window; hints are window addresses of at most 1 MiB that cover exactly the chunk")
    func hintsAreWindowAddresses() throws {
        let s = AnonymousSourceTests.setup()
        let mapper = RecordingMapper()
        s.source.deviceMapper = mapper
        try s.source.beginRound(id: 0x8000_0001)
        let ranges = try drainHints(s.source)
        #expect(mapper.events == Array(repeating: "window", count: s.source.lastRound.chunks))
        #expect(ranges.allSatisfy { $0.length <= 1 << 20 && $0.length > 0 })
        // Every hinted byte lies inside a live mapping, and the hints cover the held bytes once.
        for r in ranges {
            #expect(mapper.live.contains { $0.key <= r.start.value && r.end <= $0.key + UInt64($0.value.length) }, "\(r) outside every mapping")
        }
        #expect(ranges.reduce(0) { $0 + $1.length } == s.source.heldBytes)
        #expect(Set(ranges.map(\.start)).count == ranges.count)
        // No guest-physical address is handed out: all are in the window above 2^38.
        #expect(ranges.allSatisfy { $0.start.value >= 1 << 38 })
    }

    @Test("the mapping is removed before the chunk is released, and a chunk whose mapping cannot be removed is kept")
    func unmapBeforeRelease() throws {
        let s = AnonymousSourceTests.setup()
        let mapper = RecordingMapper()
        s.source.deviceMapper = mapper
        try s.source.beginRound(id: 1)
        let ranges = try drainHints(s.source)
        s.source.endRound()
        s.source.hintsApplied(ranges)
        #expect(mapper.live.isEmpty, "every chunk unmapped once its hints came back")
        #expect(s.memory.mapped.isEmpty, "and then released")
        #expect(mapper.events.filter { $0 == "unmap" }.count == mapper.events.filter { $0 == "window" }.count)

        // Now the IOMMU refuses to unmap: the chunks stay mapped and are never released.
        let t = AnonymousSourceTests.setup()
        let stuck = RecordingMapper()
        t.source.deviceMapper = stuck
        try t.source.beginRound(id: 2)
        let r2 = try drainHints(t.source)
        stuck.failUnmaps = true
        t.source.endRound()
        t.source.hintsApplied(r2)
        #expect(!stuck.live.isEmpty)
        #expect(!t.memory.mapped.isEmpty, "a chunk the device may still reach was released")
    }

    @Test("a failed device mapping releases the chunk and stops the round with the mapping error")
    func mappingFailure() throws {
        let s = AnonymousSourceTests.setup()
        let mapper = RecordingMapper()
        mapper.failNextWindow = .badMapping(iova: 1 << 38, size: 32 << 20, reason: "window full")
        s.source.deviceMapper = mapper
        try s.source.beginRound(id: 1)
        #expect(throws: FreePageSourceError.self) { _ = try s.source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20) }
        #expect(s.memory.mapped.isEmpty)
        #expect(s.source.heldBytes == 0)
        #expect(s.source.lastRound.stoppedBecause?.contains("window full") == true)
    }
}
