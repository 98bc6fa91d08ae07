import Testing
import PlatformLinux

/// The real mapping type on this machine, unprivileged: mmap, advice, populate, per-slot
/// munmap, and pagemap's present bit (readable without root; PFNs are not). No sysctl is
/// touched and nothing is locked.
@Suite struct OwnedAnonymousMappingTests {
    @Test func populatesAndUnmapsBySlot() throws {
        let length = 2 * OwnedAnonymousMapping.slotBytes + 4096
        let m = try OwnedAnonymousMapping(length: length, kind: .small, arena: try DeviceMemoryArena())
        #expect(m.slotCount == 3 && m.slot(2).length == 4096 && m.slot(1).address == m.address + UInt(OwnedAnonymousMapping.slotBytes))
        try m.advise(OwnedAnonymousMapping.adviceNoHugePage)
        try m.populateForWrite()
        let pagemap = try PagemapResolver()
        let pages = length / 4096
        #expect(try pagemap.entries(forVirtual: m.address, count: pages).allSatisfy { $0.present }, "every page faulted in")
        m.unmapSlot(1)
        m.unmapSlot(1)  // once only
        #expect(m.mappedSlotCount == 2)
        let after = try pagemap.entries(forVirtual: m.address, count: pages)
        #expect(after[0..<512].allSatisfy { $0.present } && after[512..<1024].allSatisfy { !$0.present } && after[1024].present)
    }
}
