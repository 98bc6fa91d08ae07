import Testing
import BalloonSimulator
import VirtioCore
import VirtioPCI
import VirtioQueue
import FreePages
@testable import Balloon

@Suite("Deflate under memory pressure (DEFLATE_ON_OOM)")
struct PressureTests {
    func pressureRig(deflateOnOOM: Bool = true) throws -> Rig {
        var props = BalloonDeviceProperties()
        props.deflateOnOOM = deflateOnOOM
        return try Rig(props).running(target: 8192)
    }

    @Test("low MemAvailable deflates at least the step plus the shortfall, and holds the balloon smaller")
    func lowAvailableDeflates() throws {
        let rig = try pressureRig()
        #expect(rig.device.actual == 8192)
        rig.memoryStatus.available = 80 << 20  // 16 MiB below the 96 MiB watermark
        rig.clock.advance(milliseconds: 300)
        try rig.driver.tick()
        try rig.serviceAll()
        // 64 MiB step + 16 MiB short ≥ the whole 32 MiB balloon.
        #expect(rig.device.actual == 0)
        #expect(rig.driver.counters.pressureDeflates == 1)
        // Pressure gone, but inside the hold time: no re-inflate.
        rig.memoryStatus.available = 800 << 20
        rig.clock.advance(milliseconds: 30_000)
        try rig.driver.tick()
        try rig.serviceAll()
        #expect(rig.device.actual == 0)
        // After the hold: re-inflated.
        rig.clock.advance(milliseconds: 31_000)
        try rig.driver.tick()
        try rig.serviceAll()
        #expect(rig.device.actual == 8192)
    }

    @Test("a PSI trigger deflates one step")
    func psiDeflatesAStep() throws {
        var options = BalloonDriverOptions()
        options.pressure.deflateStepBytes = 8 << 20
        var props = BalloonDeviceProperties()
        props.deflateOnOOM = true
        let rig = try Rig(props, options: options).running(target: 8192)
        try rig.driver.tick(psiFired: true)
        try rig.serviceAll()
        #expect(rig.device.actual == 8192 - 2048)
    }

    @Test("after a pressure deflate, re-inflating keeps MemAvailable above the re-inflate watermark")
    func hysteresis() throws {
        let rig = try pressureRig()
        rig.memoryStatus.available = 90 << 20
        try rig.driver.tick(psiFired: true)
        try rig.serviceAll()
        #expect(rig.device.actual == 0)
        rig.clock.advance(milliseconds: 61_000)
        rig.memoryStatus.available = (192 + 8) << 20  // 8 MiB above the watermark
        try rig.driver.tick()
        try rig.serviceAll()
        #expect(rig.device.actual == 2048)
    }

    @Test("without DEFLATE_ON_OOM the host's target is binding: pressure does not deflate")
    func noDeflateWithoutFeature() throws {
        let rig = try pressureRig(deflateOnOOM: false)
        rig.memoryStatus.available = 10 << 20
        try rig.driver.tick(psiFired: true)
        try rig.serviceAll()
        #expect(rig.device.actual == 8192)
        #expect(rig.driver.counters.pressureDeflates == 0)
    }
}
