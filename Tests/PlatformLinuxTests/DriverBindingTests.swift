import TestSupport
import Testing
@testable import PlatformLinux

/// The bind/restore sequences against a fake sysfs tree and a fake kernel.
@Suite struct DriverBindingTests {
    let bdf = PCIAddress("0000:00:03.0")!

    func setUp(driver: String? = "virtio-pci") -> (FakeTree, FakeKernel, DriverBinder) {
        fakeBalloonBinder(bdf, driver: driver)
    }

    @Test func bindWritesTheSysfsSequence() throws {
        let (t, k, b) = setUp()
        let binding = try b.bind(bdf)
        #expect(k.commands == [["modprobe", "uio"], ["modprobe", "uio_pci_generic"]])
        #expect(k.writes == [
            .init(path: "/sys/bus/pci/drivers/virtio-pci/unbind", value: "0000:00:03.0"),
            .init(path: "/sys/bus/pci/devices/0000:00:03.0/driver_override", value: "uio_pci_generic"),
            .init(path: "/sys/bus/pci/drivers_probe", value: "0000:00:03.0"),
        ])
        #expect(binding.uioName == "uio0")
        #expect(binding.devicePath == t.at("/dev/uio0"))
        #expect(binding.previousDriver == "virtio-pci")
        #expect(try b.currentDriver(of: bdf) == "uio_pci_generic")
        #expect(t.read("/run/balloond/0000:00:03.0.driver") == "virtio-pci\n")
        #expect(try b.savedPreviousDriver(for: bdf) == .some("virtio-pci"))
        #expect(k.nodes.isEmpty)
    }

    @Test func bindMakesTheDeviceNodeWithoutDevtmpfs() throws {
        let (_, k, b) = setUp()
        k.devtmpfs = false
        let binding = try b.bind(bdf)
        #expect(k.nodes.count == 1)
        #expect(k.nodes.first?.path == "/dev/uio0")
        #expect(k.nodes.first?.major == 243)
        #expect(k.nodes.first?.minor == 0)
        #expect(Sys.exists(binding.devicePath))
    }

    @Test func bindOfAnUnboundDeviceSkipsUnbind() throws {
        let (t, k, b) = setUp(driver: nil)
        let binding = try b.bind(bdf)
        #expect(k.writes.map(\.path) == ["/sys/bus/pci/devices/0000:00:03.0/driver_override", "/sys/bus/pci/drivers_probe"])
        #expect(binding.previousDriver == nil)
        #expect(t.read("/run/balloond/0000:00:03.0.driver") == "\n")
        #expect(try b.savedPreviousDriver(for: bdf) == .some(nil))
    }

    @Test func halfDoneBindKeepsTheSavedDriver() throws {
        // A crash after unbinding virtio-pci left the device unbound with a state file.
        let (t, _, b) = setUp(driver: nil)
        t.stateFile("/run/balloond/0000:00:03.0.driver", "virtio-pci\n")
        let binding = try b.bind(bdf)
        #expect(binding.previousDriver == "virtio-pci")
        #expect(t.read("/run/balloond/0000:00:03.0.driver") == "virtio-pci\n")
    }

    @Test func bindWhenAlreadyBoundWritesNothing() throws {
        let (_, k, b) = setUp()
        _ = try b.bind(bdf)
        let before = k.writes.count
        let again = try b.bind(bdf)
        #expect(k.writes.count == before)
        #expect(again.previousDriver == "virtio-pci")
        #expect(again.uioName == "uio0")
    }

    @Test func restoreInALaterProcessRebindsThePreviousDriver() throws {
        let (t, k, b) = setUp()
        _ = try b.bind(bdf)
        // A new binder, as `balloond unbind` in another process would make.
        let k2 = FakeKernel(tree: t)
        let later = DriverBinder(root: t.root, kernel: k2, kernelRelease: "6.1.0-test")
        let now = try later.restore(bdf)
        #expect(k2.writes == [
            .init(path: "/sys/bus/pci/drivers/uio_pci_generic/unbind", value: "0000:00:03.0"),
            .init(path: "/sys/bus/pci/devices/0000:00:03.0/driver_override", value: "\n"),
            .init(path: "/sys/bus/pci/drivers/virtio-pci/bind", value: "0000:00:03.0"),
        ])
        #expect(now == "virtio-pci")
        #expect(!t.exists("/run/balloond/0000:00:03.0.driver"))
        #expect(!t.exists("/sys/bus/pci/devices/0000:00:03.0/uio"))
        _ = k
    }

    @Test func restoreWithoutStateFileReprobes() throws {
        let (t, k, b) = setUp(driver: nil)
        t.bindLink(bdf.bdf, "uio_pci_generic")
        let now = try b.restore(bdf)
        #expect(k.writes.map(\.path) == [
            "/sys/bus/pci/drivers/uio_pci_generic/unbind",
            "/sys/bus/pci/devices/0000:00:03.0/driver_override",
            "/sys/bus/pci/drivers_probe",
        ])
        #expect(now == "virtio-pci")
    }

    @Test func restoreLeavesAnotherDriverAlone() throws {
        let (t, k, b) = setUp()
        t.stateFile("/run/balloond/0000:00:03.0.driver", "virtio-pci\n")
        let now = try b.restore(bdf)
        #expect(now == "virtio-pci")
        #expect(k.writes.isEmpty)
        #expect(!t.exists("/run/balloond/0000:00:03.0.driver"))
    }

    @Test func refusesADeviceThatIsNotABalloon() {
        let (t, k, b) = setUp()
        let nic = PCIAddress("0000:00:04.0")!
        t.pciDevice(nic.bdf, vendor: 0x1af4, device: 0x1041, driver: "virtio-pci")
        #expect(throws: PlatformError.notAVirtioBalloon(bdf: "0000:00:04.0", vendor: 0x1af4, device: 0x1041)) { try b.bind(nic) }
        #expect(throws: PlatformError.notAVirtioBalloon(bdf: "0000:00:04.0", vendor: 0x1af4, device: 0x1041)) { try b.restore(nic) }
        #expect(k.writes.isEmpty)
        #expect(k.commands.isEmpty)
        #expect(PlatformError.notAVirtioBalloon(bdf: "0000:00:04.0", vendor: 0x1af4, device: 0x1041).description
            .contains("1af4:1041, not a virtio balloon"))
    }

    @Test func missingDevice() {
        let (_, _, b) = setUp()
        #expect(throws: PlatformError.deviceNotFound(bdf: "0000:00:09.0")) { try b.bind(PCIAddress("0000:00:09.0")!) }
    }

    @Test func missingModuleIsAnActionableError() {
        let (_, k, b) = setUp()
        k.modprobeable = ["uio"]
        do {
            _ = try b.bind(bdf)
            Issue.record("bind must fail without uio_pci_generic")
        } catch {
            guard case .moduleUnavailable(let name, let attempts) = error else {
                Issue.record("unexpected \(error)")
                return
            }
            #expect(name == "uio_pci_generic")
            #expect(attempts.count == 2)
            guard attempts.count == 2, case .modprobe("uio_pci_generic", let probe) = attempts[0] else { return }
            #expect(probe.status == 1 && probe.output.hasPrefix("modprobe: FATAL"))
            #expect(attempts[0].description.hasPrefix("modprobe uio_pci_generic: exit 1: modprobe: FATAL"))
            #expect(attempts[1] == .noModuleFile(module: "uio_pci_generic", kernelRelease: "6.1.0-test"))
            #expect(error.description.contains("CONFIG_UIO_PCI_GENERIC"))
            #expect(error.description.contains("linux-image"))
        }
        // Nothing was unbound.
        #expect(k.writes.isEmpty)
    }

    @Test func insmodFallbackUsesTheModuleFile() throws {
        let (t, k, b) = setUp()
        k.modprobeable = []
        t.file("/lib/modules/6.1.0-test/kernel/drivers/uio/uio.ko", "ELF")
        t.file("/usr/lib/modules/6.1.0-test/kernel/drivers/uio/uio_pci_generic.ko", "ELF")
        _ = try b.bind(bdf)
        #expect(k.commands == [
            ["modprobe", "uio"],
            ["insmod", t.at("/lib/modules/6.1.0-test/kernel/drivers/uio/uio.ko")],
            ["modprobe", "uio_pci_generic"],
            ["insmod", t.at("/usr/lib/modules/6.1.0-test/kernel/drivers/uio/uio_pci_generic.ko")],
        ])
    }

    @Test func failingInsmodIsReported() {
        let (t, k, b) = setUp()
        k.modprobeable = []
        k.insmodWorks = false
        t.file("/lib/modules/6.1.0-test/kernel/drivers/uio/uio.ko.zst", "zstd")
        do {
            _ = try b.bind(bdf)
            Issue.record("bind must fail")
        } catch {
            guard case .moduleUnavailable("uio", let attempts) = error else {
                Issue.record("unexpected \(error)")
                return
            }
            let path = t.at("/lib/modules/6.1.0-test/kernel/drivers/uio/uio.ko.zst")
            #expect(attempts.last == .insmod(path: path, module: "uio", CommandResult(status: 1, output: "insmod: ERROR: could not insert module")))
            #expect(attempts.last?.description == "insmod \(path): exit 1: insmod: ERROR: could not insert module")
        }
    }

    @Test func builtInModulesNeedNoLoading() throws {
        let (t, k, b) = setUp()
        t.directory("/sys/class/uio")
        t.pciDriver("uio_pci_generic")
        _ = try b.bind(bdf)
        #expect(k.commands.isEmpty)
    }

    @Test func rejectedProbeRollsBack() throws {
        let (t, k, b) = setUp()
        k.uioAcceptsDevices = false
        do {
            _ = try b.bind(bdf)
            Issue.record("bind must fail when uio_pci_generic rejects the device")
        } catch {
            guard case .bindFailed(let dev, let expected, let found, let detail) = error else {
                Issue.record("unexpected \(error)")
                return
            }
            #expect(dev == bdf.bdf)
            #expect(expected == "uio_pci_generic")
            #expect(found == nil)
            #expect(detail == .rolledBack(previous: "virtio-pci"))
            #expect(error.description.contains("dmesg"))
        }
        #expect(k.writes.suffix(2) == [
            .init(path: "/sys/bus/pci/devices/0000:00:03.0/driver_override", value: "\n"),
            .init(path: "/sys/bus/pci/drivers/virtio-pci/bind", value: "0000:00:03.0"),
        ])
        #expect(try b.currentDriver(of: bdf) == "virtio-pci")
        #expect(!t.exists("/run/balloond/0000:00:03.0.driver"))
    }

    @Test func uioWithoutDeviceDirectoryIsAnError() {
        let (t, k, b) = setUp()
        _ = k
        t.bindLink(bdf.bdf, "uio_pci_generic")
        t.directory("/sys/class/uio")
        do {
            _ = try b.bind(bdf)
            Issue.record("a uio binding without uio/uioN must fail")
        } catch {
            guard case .uioDeviceMissing(bdf.bdf, .noUIODirectory(let path, let e)) = error else {
                Issue.record("unexpected \(error)")
                return
            }
            #expect(path == t.at("/sys/bus/pci/devices/\(bdf.bdf)/uio") && e.errno == .noSuchFileOrDirectory)
            #expect(error.description.contains("did not register a uio device"))
        }
    }
}
