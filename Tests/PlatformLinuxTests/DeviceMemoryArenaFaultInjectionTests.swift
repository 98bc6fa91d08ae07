#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import PlatformLinux

@Suite("Device memory arena: offsets in two memfds, released by punching holes (issue 9 H2)")
struct DeviceMemoryArenaFaultInjectionTests {
    @Test("the offset allocator hands out first-fit granule-rounded extents and merges released neighbours")
    func offsetAllocator() {
        var a = OffsetAllocator(capacity: 10 * 4096, granule: 4096)
        #expect(a.allocate(1) == 0)
        #expect(a.allocate(4097) == 4096)  // two granules
        #expect(a.allocate(4096) == 3 * 4096)
        #expect(a.bytesFree == 6 * 4096)
        #expect(a.allocate(7 * 4096) == nil, "no extent that big")
        a.release(offset: 4096, length: 8192)
        #expect(a.free == [4096..<(3 * 4096), (4 * 4096)..<(10 * 4096)])
        #expect(a.allocate(8192) == 4096, "first fit reuses the hole")
        a.release(offset: 0, length: 4096)
        a.release(offset: 4096, length: 8192)
        a.release(offset: 3 * 4096, length: 4096)
        #expect(a.free == [0..<(10 * 4096)], "merged with both neighbours into one extent")
        var empty = OffsetAllocator(capacity: 0, granule: 2 << 20)
        #expect(empty.allocate(1) == nil)
    }

    @Test("releasing a slot punches its pages out of the memfd (freed for everyone) and its offsets are reused")
    func punchHoleRelease() throws {
        let arena = try DeviceMemoryArena()
        let before = arena.offsetsFree(.small)
        let m = try OwnedAnonymousMapping(length: 3 * OwnedAnonymousMapping.slotBytes, kind: .small, arena: arena)
        try m.populateForWrite()
        #expect(arena.allocatedBytes(.small) == 3 * OwnedAnonymousMapping.slotBytes, "pages belong to the file")
        #expect(arena.offsetsFree(.small) == before - 3 * OwnedAnonymousMapping.slotBytes)
        m.unmapSlot(1)
        #expect(arena.allocatedBytes(.small) == 2 * OwnedAnonymousMapping.slotBytes, "the slot's pages left the file although it is still open")
        let again = try OwnedAnonymousMapping(length: OwnedAnonymousMapping.slotBytes, kind: .small, arena: arena)
        #expect(again.fileOffset == m.fileOffset + OwnedAnonymousMapping.slotBytes, "the hole is reused")
        m.unmapAll()
        again.unmapAll()
        #expect(arena.allocatedBytes(.small) == 0)
        #expect(arena.offsetsFree(.small) == before)
    }

    @Test("a duplicate of the memfd keeps the pages after this process unmapped them without punching (what a killed worker leaves)")
    func duplicateKeepsPages() throws {
        let arena = try DeviceMemoryArena()
        let guardianCopy = dup(arena.small.descriptor)
        defer { close(guardianCopy) }
        let p = try #require(mmap(nil, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, arena.small.descriptor, 0))
        #expect(p != MAP_FAILED)
        memset(p, 0x5a, 1 << 20)
        munmap(p, 1 << 20)  // exit_mm: the mapping is gone
        var st = stat()
        fstat(guardianCopy, &st)
        #expect(Int(st.st_blocks) * 512 == 1 << 20, "the pages still belong to the file the guardian holds")
    }
}

/// Whether this host can make a hugetlbfs memfd (no pool pages needed for offsets alone).
private let hostHasHugeTLBMemfd = ((try? DeviceMemoryArena(sparseBytes: 1 << 32))?.huge) != nil

@Suite("Device memory arena: hugetlb reservations are dropped by truncation, not punched")
struct DeviceMemoryArenaReservationTests {
    @Test("reservations come from the hugetlb file's upper half, are not reused one by one, and once none is left the half is truncated and reused from its start",
          .enabled(if: hostHasHugeTLBMemfd, "needs a hugetlbfs memfd"))
    func reservationsReleasedByTruncation() throws {
        let arena = try DeviceMemoryArena(sparseBytes: 1 << 32)
        let half = 1 << 31
        let slot = OwnedAnonymousMapping.slotBytes
        #expect(arena.offsetsFree(.hugeTLB2MiB) == half, "faulted hugetlb memory keeps the lower half")
        let a = try arena.allocateOffset(length: 2 * slot, backing: .hugeTLBReservation)
        let b = try arena.allocateOffset(length: slot, backing: .hugeTLBReservation)
        #expect(a == half && b == half + 2 * slot)
        #expect(arena.reservationBytesLive == 3 * slot)
        arena.release(offset: a, length: 2 * slot, backing: .hugeTLBReservation)
        let c = try arena.allocateOffset(length: slot, backing: .hugeTLBReservation)
        #expect(c == half + 3 * slot, "a released reservation's offsets are not reused while others live: only truncation drops it")
        arena.release(offset: b, length: slot, backing: .hugeTLBReservation)
        arena.release(offset: c, length: slot, backing: .hugeTLBReservation)
        #expect(arena.reservationBytesLive == 0)
        #expect(arena.lastReservationReleaseError == nil)
        let size = try #require(arena.huge).status().st_size
        #expect(size == 1 << 32, "the file is extended again after the truncation")
        #expect(try arena.allocateOffset(length: slot, backing: .hugeTLBReservation) == half, "the half is reused from its start")
        let lower = try arena.allocateOffset(length: slot, backing: .hugeTLB2MiB)
        #expect(lower < half)
    }
}
