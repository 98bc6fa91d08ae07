import VirtioCore
import ArgumentParser
import PlatformLinux
import VirtioPCI

/// `--device BDF`, shared by the commands that act on one balloon.
struct DeviceOption: ParsableArguments {
    @Option(name: .long, help: "PCI address of the balloon (e.g. 0000:00:03.0). Default: the only virtio-balloon in the guest.")
    var device: String?

    /// The balloon to use: the named one (which must be a virtio balloon), or the only one.
    func select() throws -> PCIFunction {
        let enumerator = PCIEnumerator()
        if let device {
            guard let address = PCIAddress(device) else {
                throw Failure("'\(device)' is not a PCI address; use the form 0000:00:03.0 (see `balloond list`)")
            }
            let f = try enumerator.function(at: address)
            guard f.isVirtioBalloon else {
                throw Failure("\(f.bdf) is \(hex4(f.vendorID)):\(hex4(f.deviceID)), not a virtio balloon (1af4:1002 or 1af4:1045); balloond refuses other devices")
            }
            return f
        }
        let balloons = try enumerator.virtioBalloons()
        switch balloons.count {
        case 0:
            throw Failure("no virtio-balloon PCI device found (1af4:1002 or 1af4:1045); start the VM with `-device virtio-balloon-pci`")
        case 1:
            return balloons[0]
        default:
            throw Failure("\(balloons.count) virtio balloons found (\(balloons.map(\.bdf).joined(separator: ", "))); choose one with --device")
        }
    }
}

