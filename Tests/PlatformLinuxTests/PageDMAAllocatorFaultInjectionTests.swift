#if canImport(Glibc)
import Glibc
#endif
import Testing
import PlatformLinux
import VirtioQueue

/// Counts holds; fails on demand.
final class FakeMigrationHold: MigrationHold {
    var held = 0
    var acquires = 0
    var fail: MigrationHoldError?
    func acquire() throws(MigrationHoldError) {
        if let fail { throw fail }
        acquires += 1
        held += 1
    }
    func release() { held -= 1 }
}

/// The real pagemap, with pages "moved" on demand.
final class MovablePagemap: PagemapReading {
    let real: PagemapResolver
    var moved: [UInt: UInt64] = [:]
    init() throws { real = try PagemapResolver() }
    var pageSize: Int { real.pageSize }
    func entries(forVirtual virtualAddress: UInt, count: Int) throws(PlatformError) -> [PagemapEntry] {
        let e = try real.entries(forVirtual: virtualAddress, count: count)
        return e.enumerated().map { i, entry in
            let va = (virtualAddress & ~UInt(pageSize - 1)) + UInt(i * pageSize)
            guard let pfn = moved[va] else { return entry }
            return PagemapEntry(rawValue: (entry.rawValue & ~((1 << 55) - 1)) | pfn)
        }
    }
}

/// Issue 9 M1: DMA memory without hugepages.
@Suite("4 KiB DMA pages: sized buffers, compaction held, placement re-checked (issue 9 M1)",
       .enabled(if: geteuid() == 0, "PFNs in /proc/self/pagemap need CAP_SYS_ADMIN"))
struct PageDMAAllocatorFaultInjectionTests {
    @Test("the largest allocation is one page, so PFN buffers are sized to 1024 PFNs")
    func largestAllocationIsOnePage() throws {
        let a = PageDMAAllocator(pagemap: try PagemapResolver(), migrationHold: FakeMigrationHold(), arena: try DeviceMemoryArena())
        #expect(a.largestAllocation == 4096)
    }

    @Test("every 4 KiB DMA page is taken under the migration hold, and the last one released ends it")
    func holdWhilePagesLive() throws {
        let hold = FakeMigrationHold()
        let a = PageDMAAllocator(pagemap: try PagemapResolver(), migrationHold: hold, arena: try DeviceMemoryArena())
        var r1: DMARegion? = try a.allocate(byteCount: 4096, alignment: 4096)
        var r2: DMARegion? = try a.allocate(byteCount: 64, alignment: 16)
        #expect(hold.held == 2 && a.livePages == 2)
        #expect(r1!.physicalAddress != r2!.physicalAddress)
        r1 = nil
        #expect(hold.held == 1)
        r2 = nil
        #expect(hold.held == 0 && a.livePages == 0)
        _ = (r1, r2)
    }

    @Test("no 4 KiB DMA page is handed out when compaction cannot be held off")
    func refusesWithoutHold() throws {
        let hold = FakeMigrationHold()
        hold.fail = .holder(SystemCallError(call: "open", path: "/proc/sys/vm/compact_unevictable_allowed", errno: .permissionDenied))
        let a = PageDMAAllocator(pagemap: try PagemapResolver(), migrationHold: hold, arena: try DeviceMemoryArena())
        #expect(throws: DMAError.platform(DMAMemoryError.noMigrationHold(hold.fail!))) {
            _ = try a.allocate(byteCount: 64, alignment: 16)
        }
        // The rendered message says what to do.
        let message = DMAMemoryError.noMigrationHold(hold.fail!).description
        #expect(message.contains("compact_unevictable_allowed") && message.contains("hugepage"))
        #expect(a.livePages == 0 && a.pagesAllocated == 0)
    }

    @Test("verifyPlacement passes for pages in place and throws for a ring page that moved")
    func placementRecheck() throws {
        let pagemap = try MovablePagemap()
        let a = PageDMAAllocator(pagemap: pagemap, migrationHold: FakeMigrationHold(), arena: try DeviceMemoryArena())
        let ring = try a.allocate(byteCount: 4096, alignment: 4096)
        try a.verifyPlacement()
        let pfn = ring.physicalAddress.value / 4096
        let live = a.livePageAddresses
        #expect(live.count == 1 && live[0].pfn == pfn)
        // The kernel migrates it: pagemap now shows another frame.
        pagemap.moved[live[0].virtual] = pfn + 1
        #expect { try a.verifyPlacement() } throws: { error in
            guard case DMAError.platform(let e as DMAMemoryError) = error, case .pageMoved(fromPFN: pfn, let now) = e else { return false }
            return now?.pfn == pfn + 1 && "\(error)".contains("moved from frame 0x\(String(pfn, radix: 16))")
        }
    }
}
