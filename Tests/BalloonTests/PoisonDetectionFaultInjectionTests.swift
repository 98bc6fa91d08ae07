import Balloon
import Testing
import FreePages

/// init_on_free detection when the kernel config is missing, and the kernel's own boot line.
@Suite struct PoisonDetectionFaultInjectionTests {
    static let debianConfig = "CONFIG_PAGE_POISONING=y\n# CONFIG_INIT_ON_FREE_DEFAULT_ON is not set\nCONFIG_INIT_ON_ALLOC_DEFAULT_ON=y\n"

    @Test func withoutConfigCmdlineOrBootLineInitOnFreeIsUnknownAndKpageflagsUnsafe() {
        let c = GuestMemoryDebugConfig.detect(cmdline: "console=ttyS0 quiet", kernelConfig: nil, kernelLog: nil)
        #expect(!c.initOnFreeKnown)
        #expect(c.observedHintsProblem?.summary.contains("unknown") == true)
        #expect(c.poisonPolicy == .none, "nothing is announced to the device that is not known")
        #expect(c.description.contains("init_on_free=unknown"))
    }

    @Test func theBootLineDecidesWithoutAConfig() {
        let on = GuestMemoryDebugConfig.detect(cmdline: "quiet", kernelConfig: nil,
                                               kernelLog: "mem auto-init: stack:all(zero), heap alloc:off, heap free:on")
        #expect(on == GuestMemoryDebugConfig(pagePoisoning: false, initOnFree: true, initOnAlloc: false))
        #expect(on.observedHintsProblem != nil && on.poisonPolicy == .initOnFree)
        let off = GuestMemoryDebugConfig.detect(cmdline: "quiet", kernelConfig: nil,
                                                kernelLog: "mem auto-init: stack:off, heap alloc:on, heap free:off")
        #expect(off == GuestMemoryDebugConfig(pagePoisoning: false, initOnFree: false, initOnAlloc: true))
        #expect(off.observedHintsProblem == nil)
    }

    @Test func theBootLineWinsOverTheConfig() {
        // Built with init_on_free off by default, but the running kernel reports it on.
        let c = GuestMemoryDebugConfig.detect(cmdline: "", kernelConfig: Self.debianConfig,
                                              kernelLog: "mem auto-init: stack:off, heap alloc:on, heap free:on")
        #expect(c.initOnFree && c.initOnFreeKnown)
    }

    @Test("a garbled boot line is not used", arguments: [
        "mem auto-init: stack:off, heap alloc:on, heap free:maybe",
        "mem auto-init: stack:off, heap alloc:on",
        "mem auto-init: clearing system memory may take some time...",
    ])
    func garbledBootLine(line: String) {
        #expect(GuestMemoryDebugConfig.memAutoInit(fromKernelLog: line) == nil)
        #expect(!GuestMemoryDebugConfig.detect(cmdline: "", kernelConfig: nil, kernelLog: line).initOnFreeKnown)
    }

    @Test func anExplicitCmdlineOrAConfigIsEnough() {
        #expect(GuestMemoryDebugConfig.detect(cmdline: "init_on_free=0", kernelConfig: nil).observedHintsProblem == nil)
        #expect(GuestMemoryDebugConfig.detect(cmdline: "", kernelConfig: Self.debianConfig).observedHintsProblem == nil)
        #expect(GuestMemoryDebugConfig.detect(cmdline: "init_on_free=1", kernelConfig: nil).initOnFree)
    }

    @Test func poisoningIsKnownFromTheCmdlineWithoutAConfig() {
        let c = GuestMemoryDebugConfig.detect(cmdline: "page_poison=1", kernelConfig: nil)
        #expect(c.pagePoisoning && c.observedHintsProblem?.summary.contains("poisoning") == true)
    }
}
