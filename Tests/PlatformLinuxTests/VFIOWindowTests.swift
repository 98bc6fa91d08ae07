import Testing
import TestSupport
import PlatformLinux
import VirtioCore

@Suite("VFIODevice.mapWindow: owned memory mapped at device addresses above guest RAM")
struct VFIOWindowTests {
    @Test("window mappings start at 256 GiB, do not overlap, and their space is reused after unmap")
    func windowAllocation() throws {
        let rig = VFIORig()
        let d = try rig.open()
        let a = try d.mapWindow(virtualAddress: 0x7f00_0000_0000, length: 32 << 20)
        let b = try d.mapWindow(virtualAddress: 0x7f10_0000_0000, length: 64 << 20)
        #expect(a == VFIODevice.windowBase)
        #expect(b == a + (32 << 20))
        #expect(rig.kernel.mappings[a]?.size == 32 << 20 && rig.kernel.mappings[b]?.size == 64 << 20)
        try d.unmap(deviceAddress: a, length: 32 << 20)
        #expect(rig.kernel.mappings[a] == nil)
        let c = try d.mapWindow(virtualAddress: 0x7f20_0000_0000, length: 16 << 20)
        #expect(c == a, "freed window space is reused")
    }

    @Test("identity mappings (IOVA = GPA) and window mappings coexist")
    func identityAndWindow() throws {
        let rig = VFIORig()
        let d = try rig.open()
        try d.map(virtualAddress: 0x7e00_0000_0000, length: 2 << 20, at: 0x5a0_0000)
        let w = try d.mapWindow(virtualAddress: 0x7f00_0000_0000, length: 2 << 20)
        #expect(w >= 1 << 38 && w != 0x5a0_0000)
        #expect(d.mappings.count == 2)
    }

    @Test("a kernel whose IOVA ranges leave no room for the window refuses with a reason, before any map")
    func noRoomForWindow() throws {
        let rig = VFIORig()
        rig.kernel.iovaRanges = [0...((1 << 32) - 1)]
        let d = try rig.open()
        let before = rig.kernel.calls.count
        do {
            _ = try d.mapWindow(virtualAddress: 0x7f00_0000_0000, length: 2 << 20)
            Issue.record("must be refused")
        } catch {
            guard case .badMapping(_, _, let reason) = error else { Issue.record("unexpected \(error)"); return }
            #expect(reason.contains("window"))
        }
        #expect(rig.kernel.calls.count == before)
    }
}
