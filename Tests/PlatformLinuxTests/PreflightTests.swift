import TestSupport
import Testing
@testable import PlatformLinux

/// Every preflight check against fake /sys and /proc trees.
@Suite struct PreflightTests {
    let bdf = PCIAddress("0000:00:03.0")!

    /// A tree on which every check passes: no lockdown, no IOMMU group, a pagemap whose entry
    /// for `probe` is present with a PFN.
    func goodTree() -> FakeTree {
        let t = FakeTree()
        t.pciDevice(bdf.bdf, vendor: 0x1af4, device: 0x1045, driver: "virtio-pci", resources: balloonResources)
        t.file("/sys/kernel/security/lockdown", "[none] integrity confidentiality\n")
        writePagemapEntry(t, virtual: probe, raw: 1 << 63 | 0xabcde)
        return t
    }

    let probe: UInt = 0x5000

    func writePagemapEntry(_ t: FakeTree, virtual: UInt, raw: UInt64) {
        var bytes = [UInt8](repeating: 0, count: Int(virtual / 4096 + 1) * 8)
        let at = Int(virtual / 4096) * 8
        for i in 0..<8 { bytes[at + i] = UInt8(truncatingIfNeeded: raw >> (8 * UInt64(i))) }
        t.file("/proc/self/pagemap", bytes: bytes)
    }

    @Test func allChecksPassOnAGoodTree() throws {
        let t = goodTree()
        let p = Preflight(root: t.root, effectiveUID: 0)
        try p.checkRoot()
        try p.checkLockdown()
        try p.checkIOMMU(for: bdf)
        try p.checkPagemap(probeAddress: probe)
    }

    @Test func notRoot() {
        let t = goodTree()
        let p = Preflight(root: t.root, effectiveUID: 1000)
        #expect(throws: PlatformError.notRoot(effectiveUID: 1000)) { try p.checkRoot() }
        #expect(PlatformError.notRoot(effectiveUID: 1000).description.contains("must run as root (effective uid is 1000)"))
    }

    @Test(arguments: ["integrity", "confidentiality"])
    func lockdownActive(_ mode: String) {
        let t = goodTree()
        let text = ["none", "integrity", "confidentiality"].map { $0 == mode ? "[\($0)]" : $0 }.joined(separator: " ")
        t.file("/sys/kernel/security/lockdown", text + "\n")
        let p = Preflight(root: t.root, effectiveUID: 0)
        do {
            try p.checkLockdown()
            Issue.record("lockdown \(mode) must fail")
        } catch {
            #expect(error == .kernelLockdown(mode: mode))
            #expect(error.description.contains("lockdown mode '\(mode)'"))
            #expect(error.description.contains("Secure Boot"))
        }
    }

    @Test func lockdownFileAbsentIsFine() throws {
        let t = goodTree()
        t.remove("/sys/kernel/security/lockdown")
        try Preflight(root: t.root, effectiveUID: 0).checkLockdown()
    }

    @Test func lockdownFileWithoutSelectionIsMalformed() {
        let t = goodTree()
        t.file("/sys/kernel/security/lockdown", "none integrity\n")
        #expect(throws: PlatformError.malformedFile(path: t.at("/sys/kernel/security/lockdown"), reason: .noSelectedLockdownMode(text: "none integrity"))) {
            try Preflight(root: t.root, effectiveUID: 0).checkLockdown()
        }
    }

    @Test func identityIOMMUGroupIsFine() throws {
        let t = goodTree()
        t.file("/sys/kernel/iommu_groups/7/type", "identity\n")
        t.symlink("/sys/bus/pci/devices/\(bdf.bdf)/iommu_group", to: "../../../../kernel/iommu_groups/7")
        try Preflight(root: t.root, effectiveUID: 0).checkIOMMU(for: bdf)
    }

    @Test(arguments: ["DMA", "DMA-FQ", "blocked"])
    func translatingIOMMUGroup(_ type: String) {
        let t = goodTree()
        t.file("/sys/kernel/iommu_groups/7/type", type + "\n")
        t.symlink("/sys/bus/pci/devices/\(bdf.bdf)/iommu_group", to: "../../../../kernel/iommu_groups/7")
        do {
            try Preflight(root: t.root, effectiveUID: 0).checkIOMMU(for: bdf)
            Issue.record("IOMMU type \(type) must fail")
        } catch {
            #expect(error == .iommuTranslating(bdf: bdf.bdf, group: "7", domainType: type))
            #expect(error.description.contains("iommu=pt"))
            #expect(error.description.contains("intel_iommu=off"))
            #expect(error.description.contains("IOMMU group 7 with domain type '\(type)'"))
        }
    }

    @Test func iommuGroupWithoutTypeFileFails() {
        let t = goodTree()
        t.directory("/sys/kernel/iommu_groups/3")
        t.symlink("/sys/bus/pci/devices/\(bdf.bdf)/iommu_group", to: "../../../../kernel/iommu_groups/3")
        do {
            try Preflight(root: t.root, effectiveUID: 0).checkIOMMU(for: bdf)
            Issue.record("an IOMMU group of unknown type must fail")
        } catch {
            #expect(error == .iommuTranslating(bdf: bdf.bdf, group: "3", domainType: "unknown (\(t.at("/sys/kernel/iommu_groups/3/type")) is missing)"))
            #expect(error.description.contains("domain type 'unknown"))
        }
    }

    @Test func pagemapPFNZero() {
        let t = goodTree()
        writePagemapEntry(t, virtual: probe, raw: 1 << 63)
        do {
            try Preflight(root: t.root, effectiveUID: 0).checkPagemap(probeAddress: probe)
            Issue.record("PFN 0 must fail")
        } catch {
            #expect(error == .pagemap(.pfnHidden(virtualAddress: probe)))
        }
    }

    @Test func pagemapMissing() {
        let t = goodTree()
        t.remove("/proc/self/pagemap")
        do {
            try Preflight(root: t.root, effectiveUID: 0).checkPagemap(probeAddress: probe)
            Issue.record("a missing pagemap must fail")
        } catch {
            #expect(error == .pagemap(.cannotOpen(SystemCallError(call: "open", path: t.at("/proc/self/pagemap"), errno: .noSuchFileOrDirectory))))
            #expect(error.description.contains("cannot open \(t.at("/proc/self/pagemap"))"))
            #expect(error.description.contains("CONFIG_PROC_PAGE_MONITOR"))
        }
    }

    @Test func pagemapTooShort() {
        let t = goodTree()
        t.file("/proc/self/pagemap", bytes: [1, 2, 3])
        do {
            try Preflight(root: t.root, effectiveUID: 0).checkPagemap(probeAddress: probe)
            Issue.record("a short pagemap must fail")
        } catch {
            // The probe's entry is at offset 0x5000 / 4096 * 8 = 40, past the 3-byte file.
            #expect(error == .pagemap(.shortRead(path: t.at("/proc/self/pagemap"), offset: 40, entries: 1, bytes: 0)))
        }
    }

    @Test func problemsCollectsEveryFailureInOrder() {
        let t = goodTree()
        t.file("/sys/kernel/security/lockdown", "none [integrity] confidentiality\n")
        t.file("/sys/kernel/iommu_groups/1/type", "DMA\n")
        t.symlink("/sys/bus/pci/devices/\(bdf.bdf)/iommu_group", to: "../../../../kernel/iommu_groups/1")
        t.remove("/proc/self/pagemap")
        let p = Preflight(root: t.root, effectiveUID: 1000)
        let problems = p.problems(for: bdf)
        #expect(problems.count == 4)
        #expect(problems.first == .notRoot(effectiveUID: 1000))
        #expect(problems.dropFirst().first == .kernelLockdown(mode: "integrity"))
        #expect(problems.dropFirst(2).first == .iommuTranslating(bdf: bdf.bdf, group: "1", domainType: "DMA"))
        #expect(throws: PlatformError.notRoot(effectiveUID: 1000)) { try p.run(for: bdf) }
    }
}
