import Testing
import BalloonSimulator
import VirtioCore
import VirtioPCI
import VirtioQueue
import FreePages
@testable import Balloon

@Suite("Guest page poisoning detection (docs/virtio-balloon.md §7)")
struct PoisonDetectionTests {
    static let debianConfig = "CONFIG_PAGE_POISONING=y\n# CONFIG_INIT_ON_FREE_DEFAULT_ON is not set\nCONFIG_INIT_ON_ALLOC_DEFAULT_ON=y\n"

    @Test("poison_val as Linux writes it: 0xAAAAAAAA for page_poison, 0 for init_on_free, none otherwise")
    func poisonValues() {
        #expect(PagePoisonPolicy.poison.poisonValue == 0xAAAA_AAAA)
        #expect(PagePoisonPolicy.initOnFree.poisonValue == 0)
        #expect(PagePoisonPolicy.none.poisonValue == nil)
    }

    @Test("reporting is refused for a non-zero poison_val only (QEMU skips those reports); init_on_free's 0 and no poisoning report")
    func reportingRefusal() {
        #expect(PagePoisonPolicy.reportingRefusal(poisonValue: 0xAAAA_AAAA)?.contains("0xaaaaaaaa") == true)
        #expect(PagePoisonPolicy.reportingRefusal(poisonValue: 0) == nil)
        #expect(PagePoisonPolicy.reportingRefusal(poisonValue: nil) == nil)
    }

    @Test("Debian default: no poisoning, init_on_alloc from the config")
    func debianDefault() {
        let c = GuestMemoryDebugConfig.detect(cmdline: "console=ttyS0 quiet", kernelConfig: Self.debianConfig)
        #expect(c == GuestMemoryDebugConfig(pagePoisoning: false, initOnFree: false, initOnAlloc: true))
        #expect(c.poisonPolicy == .none)
    }

    @Test("page_poison=1 gives 0xAAAAAAAA and overrides init_on_free/init_on_alloc")
    func poison() {
        let c = GuestMemoryDebugConfig.detect(cmdline: "page_poison=1 init_on_free=1", kernelConfig: Self.debianConfig)
        #expect(c == GuestMemoryDebugConfig(pagePoisoning: true, initOnFree: false, initOnAlloc: false))
        #expect(c.poisonPolicy.poisonValue == 0xAAAA_AAAA)
    }

    @Test("init_on_free=1 gives poison_val 0")
    func initOnFree() {
        let c = GuestMemoryDebugConfig.detect(cmdline: "init_on_free=1 init_on_alloc=0", kernelConfig: Self.debianConfig)
        #expect(c.poisonPolicy == .initOnFree)
        #expect(c.poisonPolicy.poisonValue == 0)
        #expect(!c.initOnAlloc)
    }

    @Test("page_poison=1 on a kernel built without CONFIG_PAGE_POISONING does nothing")
    func poisonNotBuilt() {
        let c = GuestMemoryDebugConfig.detect(cmdline: "page_poison=1", kernelConfig: "# CONFIG_PAGE_POISONING is not set\n")
        #expect(!c.pagePoisoning)
    }
}
