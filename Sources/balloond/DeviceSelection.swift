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
                throw Failure.notAPCIAddress(device)
            }
            let f = try enumerator.function(at: address)
            guard f.isVirtioBalloon else {
                throw Failure.notAVirtioBalloon(bdf: f.bdf, vendor: f.vendorID, device: f.deviceID)
            }
            return f
        }
        let balloons = try enumerator.virtioBalloons()
        switch balloons.count {
        case 0:
            throw Failure.noBalloon
        case 1:
            return balloons[0]
        default:
            throw Failure.severalBalloons(bdfs: balloons.map(\.bdf))
        }
    }
}

