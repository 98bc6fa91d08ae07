import TestSupport
import BalloonSimulator
import VirtioCore
@testable import VirtioPCI

/// QEMU 7.2's transitional config space, from the simulator, as a mutable byte array.
func qemuConfigBytes(modern: Bool = false) -> [UInt8] {
    SimulatedBalloonDevice(properties: BalloonDeviceProperties(modernOnly: modern)).configSpace.bytes
}

let qemuBARs: [UInt64?] = [64, nil, nil, nil, 0x4000, nil]

func parse(_ bytes: [UInt8], bars: [UInt64?] = qemuBARs) throws(VirtioCapabilityError) -> VirtioCapabilities {
    try parseVirtioCapabilities(FakePCIConfigSpace(bytes: bytes), barSizes: bars)
}
