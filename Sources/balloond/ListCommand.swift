import VirtioCore
import ArgumentParser
import PlatformLinux
import VirtioPCI

struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List virtio-balloon PCI functions with their address, IDs, driver, IOMMU group, the backends that can drive them, and whether balloond can use them."
    )

    func run() throws {
        let balloons = try PCIEnumerator().virtioBalloons()
        if balloons.isEmpty {
            print("no virtio-balloon PCI device found (1af4:1002 or 1af4:1045); start the VM with -device virtio-balloon-pci")
            return
        }
        print("ADDRESS        ID         KIND          SUBSYSTEM  DRIVER            IOMMU        BACKENDS  USABLE")
        for f in balloons {
            let kind = f.deviceID == 0x1045 ? "modern" : "transitional"
            let facts = try? BackendFacts.read(f.address)
            let iommu = facts?.group.map { "group \($0.number)" } ?? "none"
            let backends = facts.map { $0.usableBackends.map(\.rawValue).joined(separator: ",") } ?? "?"
            var (usable, why) = usability(f)
            if let facts, facts.usableBackends.isEmpty {
                usable = false
                why = "behind a translating IOMMU and vfio-pci is not available"
            }
            print("\(f.bdf.padding(14)) \(hex4(f.vendorID)):\(hex4(f.deviceID))  \(kind.padding(13)) \(hex4(f.subsystemVendorID)):\(hex4(f.subsystemID))  \((f.driver ?? "none").padding(17)) \(iommu.padding(12)) \((backends.isEmpty ? "-" : backends).padding(9)) \(usable ? "yes" : "no"): \(why)")
        }
    }

    func usability(_ f: PCIFunction) -> (Bool, String) {
        guard f.barSizes.indices.contains(4), f.barSizes[4] != nil else { return (false, "no BAR4 (modern virtio interface disabled)") }
        do {
            let lock = try DeviceLock(address: f.address)
            lock.unlock()
        } catch let PlatformError.deviceBusy(_, _, pid) {
            return (true, "driven by balloond" + (pid.map { " (pid \($0))" } ?? ""))
        } catch {
            // Not root: the lock directory may not be writable. Say what we know.
        }
        switch f.driver {
        case nil: return (true, "unbound")
        case "virtio-pci": return (true, "in-kernel virtio-pci will be unbound")
        case uioPCIGenericDriver: return (true, "bound to uio_pci_generic")
        case vfioPCIDriver: return (true, "bound to vfio-pci (balloond's if `balloond run` bound it; else a VM's: then use --force)")
        case let other?: return (false, "bound to \(other); unbind it first")
        }
    }
}
