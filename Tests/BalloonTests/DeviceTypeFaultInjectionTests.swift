import Testing
import BalloonSimulator
import FreePages
import VirtioCore
import VirtioPCI
@testable import Balloon

@Suite("The driver, not the transport, decides which virtio device it drives")
struct DeviceTypeFaultInjectionTests {
    @Test("a virtio device of another type (transitional 1af4:1000, subsystem 1: virtio-net) is refused at bring-up, before any write")
    func otherDeviceTypeRefusedByTheDriver() throws {
        let device = SimulatedBalloonDevice(properties: BalloonDeviceProperties())
        device.configSpace.poke(PCIConfig.deviceID, 0x00)
        device.configSpace.poke(PCIConfig.deviceID + 1, 0x10)
        device.configSpace.poke(PCIConfig.subsystemID, 0x01)
        device.configSpace.poke(PCIConfig.subsystemID + 1, 0x00)
        let transport = try device.makeTransport()
        #expect(transport.virtioDeviceType == 1)
        let driver = BalloonDriver(transport: transport, allocator: device.makeDMAAllocator())
        device.clearEvents()
        #expect(throws: BalloonError.wrongDeviceType(1)) { try driver.bringUp() }
        #expect(device.events.isEmpty)
    }
}
