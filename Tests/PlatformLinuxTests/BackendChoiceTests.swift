import TestSupport
import Testing
@testable import PlatformLinux

@Suite("Backend choice (docs/vfio.md §7): auto, uio, vfio")
struct BackendChoiceTests {
    let bdf = "0000:00:03.0"
    func group(_ type: String? = "DMA-FQ") -> IOMMUGroup {
        IOMMUGroup(number: 7, domainType: type, members: [IOMMUGroup.Member(address: PCIAddress("0000:00:03.0")!, driver: "virtio-pci")])
    }

    @Test("auto takes vfio when the device has an IOMMU group and vfio-pci is available; the reason names the group")
    func autoVFIO() throws {
        let c = try chooseBackend(requested: .auto, facts: BackendFacts(group: group(), vfioAvailable: true), bdf: bdf).get()
        #expect(c.backend == .vfio)
        #expect(c.reason.contains("IOMMU group 7, domain DMA-FQ"))
        #expect(c.reason.contains("vfio-pci is available"))
    }

    @Test("auto takes uio when the device has no IOMMU group, and says so")
    func autoNoGroup() throws {
        for available in [true, false] {
            let c = try chooseBackend(requested: .auto, facts: BackendFacts(group: nil, vfioAvailable: available), bdf: bdf).get()
            #expect(c.backend == .uio)
            #expect(c.reason.contains("no IOMMU group"))
            #expect(c.reason.contains(bdf))
        }
    }

    @Test("auto takes uio when the device is behind an IOMMU but vfio-pci is not available, and says so")
    func autoNoVFIO() throws {
        let c = try chooseBackend(requested: .auto, facts: BackendFacts(group: group(), vfioAvailable: false), bdf: bdf).get()
        #expect(c.backend == .uio)
        #expect(c.reason.contains("vfio-pci is not available"))
        #expect(c.reason.contains("IOMMU group 7"))
    }

    @Test("--backend vfio without an IOMMU group is refused with what to do")
    func vfioWithoutGroup() {
        let r = chooseBackend(requested: .vfio, facts: BackendFacts(group: nil, vfioAvailable: true), bdf: bdf)
        #expect(r == .failure(.vfioWithoutIOMMU(bdf: bdf)))
        let message = BackendChoiceError.vfioWithoutIOMMU(bdf: bdf).description
        #expect(message.contains("intel-iommu") && message.contains("--backend uio") && message.contains(bdf))
    }

    @Test("--backend vfio where vfio-pci is unavailable is refused; with a group and vfio-pci it is taken")
    func vfioRequested() throws {
        #expect(chooseBackend(requested: .vfio, facts: BackendFacts(group: group(), vfioAvailable: false), bdf: bdf) == .failure(.vfioUnavailable(bdf: bdf)))
        #expect(BackendChoiceError.vfioUnavailable(bdf: bdf).description.contains("CONFIG_VFIO_PCI"))
        let c = try chooseBackend(requested: .vfio, facts: BackendFacts(group: group("identity"), vfioAvailable: true), bdf: bdf).get()
        #expect(c.backend == .vfio)
        #expect(c.reason == "--backend vfio (IOMMU group 7, domain identity)")
    }

    @Test("--backend uio is always uio, whatever the facts")
    func uioAlways() throws {
        for facts in [BackendFacts(group: nil, vfioAvailable: false), BackendFacts(group: group(), vfioAvailable: true),
                      BackendFacts(group: group("DMA"), vfioAvailable: false)] {
            let c = try chooseBackend(requested: .uio, facts: facts, bdf: bdf).get()
            #expect(c.backend == .uio && c.reason == "--backend uio")
        }
    }

    @Test("usableBackends: uio unless the IOMMU translates (a DMA/DMA-FQ domain), vfio with a group and vfio-pci")
    func usable() {
        #expect(BackendFacts(group: nil, vfioAvailable: true).usableBackends == [.uio])
        #expect(BackendFacts(group: group("identity"), vfioAvailable: true).usableBackends == [.uio, .vfio])
        #expect(BackendFacts(group: group("identity"), vfioAvailable: false).usableBackends == [.uio])
        #expect(BackendFacts(group: group("DMA-FQ"), vfioAvailable: true).usableBackends == [.vfio])
        #expect(BackendFacts(group: group("DMA"), vfioAvailable: true).usableBackends == [.vfio])
        #expect(BackendFacts(group: group("DMA-FQ"), vfioAvailable: false).usableBackends == [])
        #expect(!BackendFacts(group: group("identity"), vfioAvailable: true).translated)
        #expect(BackendFacts(group: group(nil), vfioAvailable: true).translated, "an unreadable domain type counts as translated")
    }

    @Test("vfioPCIAvailable: loaded (/sys/module/vfio_pci or the driver directory), or vfio-pci.ko in modules.dep or modules.builtin")
    func availability() {
        let t = FakeTree()
        #expect(!vfioPCIAvailable(root: t.root, kernelRelease: "6.1.0-test"))
        // Other vfio modules, and vfio-pci-core alone, are not vfio-pci.
        t.file("/lib/modules/6.1.0-test/modules.dep", "kernel/drivers/vfio/vfio.ko:\nkernel/drivers/vfio/pci/vfio-pci-core.ko: kernel/drivers/vfio/vfio.ko\n")
        #expect(!vfioPCIAvailable(root: t.root, kernelRelease: "6.1.0-test"))
        // Another kernel's modules do not count.
        t.file("/lib/modules/6.9.0-other/modules.dep", "kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/vfio.ko\n")
        #expect(!vfioPCIAvailable(root: t.root, kernelRelease: "6.1.0-test"))
        // Compressed, in /usr/lib/modules.
        t.file("/usr/lib/modules/6.1.0-test/modules.dep", "kernel/drivers/vfio/pci/vfio-pci.ko.xz: kernel/drivers/vfio/pci/vfio-pci-core.ko.xz\n")
        #expect(vfioPCIAvailable(root: t.root, kernelRelease: "6.1.0-test"))

        let builtin = FakeTree()
        builtin.file("/lib/modules/6.1.0-test/modules.builtin", "kernel/drivers/vfio/pci/vfio-pci.ko\n")
        #expect(vfioPCIAvailable(root: builtin.root, kernelRelease: "6.1.0-test"))

        let loaded = FakeTree()
        loaded.directory("/sys/module/vfio_pci")
        #expect(vfioPCIAvailable(root: loaded.root, kernelRelease: "6.1.0-test"))
        let driverDir = FakeTree()
        driverDir.pciDriver("vfio-pci")
        #expect(vfioPCIAvailable(root: driverDir.root, kernelRelease: "6.1.0-test"))
    }

    @Test("BackendFacts.read takes the group from sysfs and availability from the module lists")
    func readFacts() throws {
        let t = FakeTree()
        t.pciDevice("0000:00:03.0", vendor: 0x1af4, device: 0x1045, driver: "virtio-pci")
        t.iommuGroup(4, type: "DMA", members: ["0000:00:03.0"])
        t.file("/lib/modules/6.1.0-test/modules.dep", "kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/vfio.ko\n")
        let facts = try BackendFacts.read(PCIAddress("0000:00:03.0")!, root: t.root, kernelRelease: "6.1.0-test")
        #expect(facts.group?.number == 4 && facts.group?.domainType == "DMA")
        #expect(facts.vfioAvailable)
        #expect(facts.usableBackends == [.vfio])
    }
}
