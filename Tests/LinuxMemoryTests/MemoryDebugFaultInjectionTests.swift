import Testing
import FreePages
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux

/// The hint source choice when init_on_free could not be determined.
@Suite struct MemoryDebugFaultInjectionTests {
    @Test func autoAvoidsKpageflagsWhenInitOnFreeIsUnknown() throws {
        let r = try chooseHintSource(requested: .auto, hypervisor: .tcg, memoryDebug: GuestMemoryDebugConfig(initOnFreeKnown: false),
                                     unsafeHintsOnKVM: false, hugetlbAvailable: true, offlineAvailable: false).get()
        #expect(r.source == nil && r.reason.contains("unknown") && r.reason.contains("auto chose hugetlb"), "\(r)")
        let offline = try chooseHintSource(requested: .auto, hypervisor: .tcg, memoryDebug: GuestMemoryDebugConfig(initOnFreeKnown: false),
                                           unsafeHintsOnKVM: false, hugetlbAvailable: true, offlineAvailable: true).get()
        #expect(offline.source == .offline && offline.reason.contains("unknown"), "\(offline)")
        let known = try chooseHintSource(requested: .auto, hypervisor: .tcg, memoryDebug: GuestMemoryDebugConfig(initOnFreeKnown: true),
                                         unsafeHintsOnKVM: false, hugetlbAvailable: true, offlineAvailable: true).get()
        #expect(known.source == .kpageflags)
    }

    @Test func explicitKpageflagsIsRefusedWhenInitOnFreeIsUnknown() {
        let r = chooseHintSource(requested: .kpageflags, hypervisor: .tcg, memoryDebug: GuestMemoryDebugConfig(initOnFreeKnown: false),
                                 unsafeHintsOnKVM: true, hugetlbAvailable: true, offlineAvailable: true)
        guard case .failure(let e) = r else { Issue.record("kpageflags must be refused"); return }
        #expect(e.description.contains("unknown"))
    }
}
