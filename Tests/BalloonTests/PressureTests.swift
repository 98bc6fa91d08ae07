import Testing
import TestSupport
import BalloonSimulator
import VirtioCore
import VirtioPCI
import VirtioQueue
import BalloonBlocks
import FreePages
import Logging
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

    @Test("pressure first takes back memory the hint source holds until DONE; the balloon deflates only for what that did not cover")
    func hintMemoryGoesBackFirst() throws {
        let rig = try pressureRig()
        rig.source.heldUntilDone = 256 << 20
        rig.memoryStatus.available = 80 << 20  // less the 32 MiB balloon: 48 MiB below the 96 MiB watermark
        rig.clock.advance(milliseconds: 300)
        try rig.driver.tick()
        try rig.serviceAll()
        // 64 MiB step + 48 MiB short = 112 MiB, all of it from the hint source.
        #expect(rig.source.pressureRequests == [112 << 20])
        #expect(rig.source.heldUntilDone == 144 << 20)
        #expect(rig.driver.counters.pressureHintReleases == 1)
        #expect(rig.device.actual == 8192, "the hint memory covered the need: the balloon stays")
        #expect(rig.driver.counters.pressureDeflates == 0)
        // Only 8 MiB left to give: the balloon deflates for the rest.
        rig.source.heldUntilDone = 8 << 20
        try rig.driver.tick(psiFired: true)
        try rig.serviceAll()
        #expect(rig.driver.counters.pressureDeflates == 1)
        #expect(rig.device.actual < 8192)
    }

    @Test("with an empty balloon, memory held for hinting alone keeps the memory checks going")
    func hintMemoryAloneIsWatched() throws {
        let rig = try Rig(BalloonDeviceProperties(deflateOnOOM: true)).running(target: 0)
        rig.source.heldUntilDone = 512 << 20
        rig.memoryStatus.available = 50 << 20
        rig.clock.advance(milliseconds: 20_000)
        try rig.driver.tick()
        #expect(rig.source.pressureRequests.count == 1, "a low MemAvailable must reach the hint source without a PSI event")
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

    @Test("MemAvailable falling fast deflates before it reaches the watermark, by what the drain would take until the check after next")
    func fallingFastDeflatesEarly() throws {
        var props = BalloonDeviceProperties()
        props.deflateOnOOM = true
        let rig = try Rig(props, balloonBytes: 512 << 20).running(target: 131_072)
        #expect(rig.device.actual == 131_072)
        let held: UInt64 = 512 << 20
        rig.memoryStatus.available = (400 << 20) + held  // reads 400 MiB with the balloon held
        rig.memoryStatus.free = (400 << 20) + held
        rig.clock.advance(milliseconds: 300)
        try rig.driver.tick()
        #expect(rig.driver.counters.pressureDeflates == 0)
        // 150 MiB gone in 250 ms (600 MiB/s): still 154 MiB above the 96 MiB watermark, but
        // the next two intervals would take 300 MiB.
        rig.clock.advance(milliseconds: 250)
        rig.memoryStatus.available -= 150 << 20
        rig.memoryStatus.free -= 150 << 20
        try rig.driver.tick()
        try rig.serviceAll()
        #expect(rig.driver.counters.pressureDeflates == 1, "no deflate while MemAvailable fell at 600 MiB/s towards the watermark")
        // 64 MiB step + 300 MiB of drain: at least 364 MiB deflated.
        let deflated = (131_072 - Int(rig.device.actual)) * 4096
        #expect(deflated >= 364 << 20, "deflated \(deflated >> 20) MiB")
        #expect(rig.memory.heldBytes <= (512 - 364) << 20)
    }

    @Test("the balloon's own inflate is not a drain: inflating 504 MiB in one step leaves MemAvailable well above the watermark, and nothing deflates")
    func ownInflateIsNotPressure() throws {
        var props = BalloonDeviceProperties()
        props.deflateOnOOM = true
        let rig = try Rig(props, balloonBytes: 512 << 20).running(target: 2048)
        rig.memoryStatus.available = 900 << 20  // 892 MiB read with 8 MiB held; 388 MiB at 512 MiB
        rig.memoryStatus.free = 800 << 20
        rig.clock.advance(milliseconds: 300)
        try rig.driver.tick()
        // The host asks for 512 MiB; offline memory blocks inflate that in well under a second.
        rig.setTarget(pages: 131_072)
        try rig.serviceAll()
        for _ in 0..<8 {
            rig.clock.advance(milliseconds: 250)
            try rig.driver.tick()
            try rig.serviceAll()
        }
        #expect(rig.driver.counters.pressureDeflates == 0, "balloond took its own inflate for memory pressure and deflated")
        #expect(rig.device.actual == 131_072)
        // Someone else's allocation at that speed still counts (two checks 250 ms apart).
        try rig.driver.tick(earlyWarning: true)
        rig.memoryStatus.available -= 150 << 20
        rig.memoryStatus.free -= 150 << 20
        rig.clock.advance(milliseconds: 250)
        try rig.driver.tick(earlyWarning: true)
        try rig.serviceAll()
        #expect(rig.driver.counters.pressureDeflates == 1, "150 MiB gone in 250 ms towards the watermark: deflate early")
    }

    @Test("a memory check that fell due while a slow deflate ran is next due one interval later, not in the past")
    func slowDeflateDoesNotLeaveACheckInThePast() throws {
        var props = BalloonDeviceProperties()
        props.deflateOnOOM = true
        let rig = try Rig(props, balloonBytes: 512 << 20).running(target: 131_072)
        rig.memoryStatus.available = (80 << 20) + (512 << 20)  // reads 80 MiB with the balloon held
        rig.clock.advance(milliseconds: 300)
        // Every clock read during this tick costs 200 ms: the deflate outlasts the 250 ms interval.
        let clock = rig.clock
        rig.driver.clock = MonotonicClock { clock.now += .milliseconds(200); return clock.now }
        try rig.driver.tick()
        rig.driver.clock = clock.monotonic
        #expect(rig.driver.counters.pressureDeflates == 1)
        #expect(rig.memory.heldBytes > 0, "the balloon still holds memory, so MemAvailable stays watched")
        let next = try #require(rig.driver.nextDeadline)
        #expect(next > clock.now, "the next deadline is \((clock.now - next).whole(.milliseconds(1))) ms in the past")
        #expect(next <= clock.now + .milliseconds(250))
    }
}

@Suite("MemAvailable and MemFree from /proc/meminfo, scanned as bytes")
struct MeminfoScanTests {
    let sample = """
        MemTotal:        1004360 kB
        MemFree:          356392 kB
        MemAvailable:     289636 kB
        Buffers:               0 kB

        """

    @Test("reads both values in bytes")
    func readsBoth() throws {
        let r = try #require(parseMeminfoAvailableFree(ArraySlice(Array(sample.utf8))))
        #expect(r.available == 289_636 * 1024)
        #expect(r.free == 356_392 * 1024)
    }

    @Test("a file without MemAvailable, with a value that is not a number, or cut short is refused", arguments: [
        "MemTotal: 1 kB\nMemFree: 5 kB\n",
        "MemFree: 5 kB\nMemAvailable: kB\n",
        "MemFree: 5 kB\nMemAvailable:",
        "",
    ])
    func refusesMalformed(_ text: String) {
        #expect(parseMeminfoAvailableFree(ArraySlice(Array(text.utf8))) == nil)
    }

    @Test("a value too large to be bytes is refused, not wrapped")
    func refusesOverflow() {
        #expect(parseMeminfoAvailableFree(ArraySlice(Array("MemFree: 1 kB\nMemAvailable: 99999999999999999 kB\n".utf8))) == nil)
    }

    @Test("ProcMemoryStatus reads through one reused buffer and only the bytes read count")
    func readsThroughBuffer() throws {
        var calls = 0
        let text = Array(sample.utf8)
        let status = ProcMemoryStatus { buffer in
            calls += 1
            // Stale bytes past the end of this read must not be parsed.
            for i in buffer.indices { buffer[i] = UInt8(ascii: "9") }
            buffer.replaceSubrange(0..<text.count, with: text)
            return text.count
        }
        let r = try #require(status.read())
        #expect(r.available == 289_636 * 1024)
        #expect(status.read() != nil)
        #expect(calls == 2)
        #expect(ProcMemoryStatus { _ in nil }.read() == nil)
    }

    @Test("the one key/value tokenizer (meminfo and vmstat): blanks trimmed, a number must stand alone, overflow is no number, the scan stops when asked")
    func tokenizer() {
        let text = ArraySlice(Array("  MemFree:\t 42 kB\nBad: 12kB\nHuge: 99999999999999999999\nnoseparator\npgfault 7\nLast: 1\n".utf8))
        var seen: [(String, UInt64?)] = []
        scanKeyValues(text, separator: UInt8(ascii: ":")) { key, value in
            seen.append((String(decoding: key, as: UTF8.self), value))
            return key.elementsEqual("Huge".utf8) == false
        }
        #expect(seen.map(\.0) == ["MemFree", "Bad", "Huge"], "stopped after Huge; lines without ':' skipped")
        #expect(seen.map(\.1) == [42, nil, nil])
        #expect(parseKeyValues("pgfault 7\npswpin 0\nweird line\n", separator: " ") == ["pgfault": 7, "pswpin": 0])
    }

    #if os(Linux)
    @Test("agrees with this machine's /proc/meminfo")
    func thisMachine() throws {
        let text = try String(contentsOfFile: "/proc/meminfo", encoding: .utf8)
        let r = try #require(parseMeminfoAvailableFree(ArraySlice(Array(text.utf8))))
        #expect(r.available > 0 && r.free > 0)
    }
    #endif
}

@Suite("Deflate under pressure: the memory first")
struct PressureOrderTests {
    @Test("a pressure deflate gives the memory back before it writes its log line (writing a log to tmpfs can itself wait for memory)")
    func memoryBeforeLogLine() throws {
        var props = BalloonDeviceProperties()
        props.deflateOnOOM = true
        let rig = try Rig(props, balloonBytes: 512 << 20).running(target: 131_072)
        var heldAtLogLine: UInt64?
        let memory = rig.memory
        rig.driver.logger = Logger(label: "test") { _ in
            CallbackLogHandler { _, message in if message.contains("memory pressure") { heldAtLogLine = memory.heldBytes } }
        }
        rig.memoryStatus.available = (80 << 20) + (512 << 20)  // reads 80 MiB with the balloon held
        rig.clock.advance(milliseconds: 300)
        try rig.driver.tick()
        let held = try #require(heldAtLogLine, "no pressure log line")
        #expect(held < 512 << 20, "the log line was written while the balloon still held all its memory")
    }
}
