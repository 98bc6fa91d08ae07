import TestSupport
import FreePages
import PlatformLinux
import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks

/// The errors carry what failed and the errno; the one-line messages rendered from them are a
/// product surface (they tell the operator what to do), so their wording is pinned here.
@Suite struct ErrorMessageTests {
    let denied = SystemCallError(call: "open", path: "/proc/sys/vm/compact_unevictable_allowed", errno: .permissionDenied)
    let noMemory = SystemCallError(call: "mmap", path: nil, errno: .noMemory)

    @Test func theErrnoSurvivesFromTheKernelToTheDriver() throws {
        let tree = FakeTree()
        try Sys.makeDirectories(tree.at("/proc/sys/vm/compact_unevictable_allowed"))  // read(2) on it fails with EISDIR
        let path = tree.at("/proc/sys/vm/compact_unevictable_allowed")
        #expect {
            _ = try SysctlOverride.readValue(path)
        } throws: { e in
            guard case .cannotRead(path, let failure)? = e as? GuestMemoryError else { return false }
            return failure.errno == .isDirectory
        }
        let wrapped = FreePageSourceError.failed(GuestMemoryError.compactionNotPrevented(.cannotRead(path: path, denied)))
        guard case .compactionNotPrevented(.cannotRead(_, let failure))? = wrapped.reason(as: GuestMemoryError.self) else {
            Issue.record("the typed error is carried, not flattened: \(wrapped)")
            return
        }
        #expect(failure.errno == .permissionDenied)
    }

    @Test func guestMemoryMessagesKeepTheirWording() {
        let p = "/proc/sys/vm/compact_unevictable_allowed"
        #expect(GuestMemoryError.cannotSet(path: p, value: 0, denied).description == "cannot set \(p) to 0: \(denied); balloond must run as root")
        #expect(GuestMemoryError.cannotMap(bytes: 32 << 20, step: .lock, noMemory).description
            == "mlock of 32 MiB of anonymous memory failed: \(noMemory); run balloond as root (CAP_IPC_LOCK) or raise RLIMIT_MEMLOCK")
        #expect(GuestMemoryError.cannotMap(bytes: 32 << 20, step: .populate, noMemory).description
            == "populating 32 MiB of anonymous memory failed: \(noMemory)")
        #expect(GuestMemoryError.otherInstanceChanged(sysctl: p, pid: 42, stateFile: SysctlStateFile.compactUnevictablePath).description
            == "another balloond (pid 42) has changed \(p) (see /run/balloond/balloon-compact.state); stop it first")
        #expect(GuestMemoryError.cannotOpenPageFile(path: "/proc/kpageflags", denied).description
            == "cannot open /proc/kpageflags: \(denied). It needs root (CAP_SYS_ADMIN) and a kernel with CONFIG_PROC_PAGE_MONITOR")
        let online = GuestMemoryError.cannotOnline(block: 7, path: "/sys/devices/system/memory/memory7/state", denied)
        #expect(GuestMemoryError.several([online, .noArena]).description
            == "cannot online memory block 7 (/sys/devices/system/memory/memory7/state): \(denied); no device memory arena to reserve hugetlb pages from")
    }

    @Test func refusalsAndSourceErrorsKeepTheirWording() {
        let reserve = GuestMemoryError.cannotReserve(pages: 3, noMemory)
        #expect(HugeTLBRefusal.cannotReserve(pages: 3, reserve).description
            == "the hugetlb pool changed during a step (reserving 3 free pool pages failed: reserving 3 hugetlb pages with an unfaulted shared hugetlbfs mapping failed: \(noMemory) (ENOMEM: fewer free unreserved pool pages than that)): someone else is changing nr_hugepages or using the pool; balloond stops taking pool pages (those already hinted stay reserved until released); using anonymous memory for this round")
        #expect(HugeTLBRefusal.noPool.description
            == "the hugetlb pool cannot be used: this kernel has no 2 MiB hugetlb pool (CONFIG_HUGETLBFS); using anonymous memory for this round")
        let refusal = FreePageSourceError.failed(HugeTLBRefusal.overcommitEnabled(2))
        #expect(refusal.description == HugeTLBRefusal.overcommitEnabled(2).description, "the driver logs the platform's message as it is")
        let both = FreePageSourceError.fallbackFailed(primary: "hugetlb", refusal: refusal, fallback: "anonymous",
                                                      failure: .failed(LinuxHintSourceError.noPagemap))
        #expect(both.description == "hugetlb refused (\(refusal)) and anonymous failed too: the anonymous source needs /proc/self/pagemap opened while privileged")
        #expect(FreePageSourceError.failed(LinuxHintSourceError.noArena(source: .hugetlb)).description == "the hugetlb source needs the device memory arena")
        #expect(FreePageSourceError.outsideRound.description == "nextBatch outside a round")
    }

    @Test func balloonMessagesKeepTheirWording() {
        #expect(BalloonMemoryError.failed(LinuxBalloonMemoryError.pfnsHidden).description
            == "/proc/self/pagemap shows PFN 0: the kernel hides PFNs from processes without CAP_SYS_ADMIN; run balloond as root and open pagemap while privileged")
        #expect(LinuxBalloonMemoryError.badHugePage(index: 1, .notAligned(pfn: 0x1401)).description
            == "hugetlb page 1 of a populated mapping: its PFN 0x1401 is not 2 MiB aligned, so it is not one 2 MiB hugetlb page")
        #expect(LinuxBalloonMemoryError.overcommitOverflow(path: "/proc/sys/vm/nr_overcommit_hugepages", value: .max, raiseBy: 4).description
            == "/proc/sys/vm/nr_overcommit_hugepages is \(UInt64.max): raising it by 4 would overflow; set it to a sane value (e.g. 0) and restart balloond")
        let cannotSet = GuestMemoryError.cannotSet(path: "/proc/sys/vm/compact_unevictable_allowed", value: 0, denied)
        #expect(LinuxBalloonMemoryError.compactionNotPrevented(path: "/proc/sys/vm/compact_unevictable_allowed", cannotSet).description
            == "cannot set /proc/sys/vm/compact_unevictable_allowed to 0: \(cannotSet). Without it, compaction may move locked balloon pages and QEMU would discard their new owner's data; run balloond as root")
    }

    @Test func mapFailuresSayWhetherToTakeLessAndKeepTheirWording() {
        let hugeENOMEM = BalloonMapFailure(.hugeTLB, count: 2, step: .mmap, noMemory)
        #expect(hugeENOMEM.kind == .noMemory)
        #expect(hugeENOMEM.description == "mmap of 2 private 2 MiB hugetlb page(s) failed with ENOMEM: the kernel could not reserve them (no free 2 MiB block for a surplus page, nr_overcommit_hugepages reached, or a hugetlb cgroup limit)")
        let noHugeTLB = BalloonMapFailure(.hugeTLB, count: 2, step: .mmap, SystemCallError(call: "mmap", path: nil, errno: .invalidArgument))
        #expect(noHugeTLB.kind == .unusable)
        #expect(noHugeTLB.description == "mmap of 2 private 2 MiB hugetlb page(s) failed with EINVAL: this kernel has no 2 MiB hugetlb pages (CONFIG_HUGETLBFS, hugepagesz=2M)")
        let eperm = SystemCallError(call: "mlock", path: nil, errno: .notPermitted)
        let lockDenied = BalloonMapFailure(.lockedAnonymous, count: 100, step: .lock, eperm)
        #expect(lockDenied.kind == .unusable)
        #expect(lockDenied.description == "mlock of 100 locked anonymous 4 KiB page(s) failed: \(eperm); run balloond as root (CAP_IPC_LOCK)")
        let eagain = SystemCallError(call: "mlock", path: nil, errno: .resourceTemporarilyUnavailable)
        let lockShort = BalloonMapFailure(.lockedAnonymous, count: 100, step: .lock, eagain)
        #expect(lockShort.kind == .noMemory)
        #expect(lockShort.description == "mlock of 100 locked anonymous 4 KiB page(s) failed: \(eagain) (RLIMIT_MEMLOCK reached, or not enough memory)")
        #expect(BalloonMapFailure(.lockedAnonymous, count: 100, step: .mmap, noMemory).description
            == "mmap of 100 locked anonymous 4 KiB page(s) failed with ENOMEM (vm.overcommit_memory refuses it)")
        #expect(BalloonMapFailure(.lockedAnonymous, count: 100, step: .dontFork, noMemory).kind == .unusable, "only mapping, populating and locking can be short of memory")
    }
}
