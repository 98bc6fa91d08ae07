import Synchronization
import BalloonSimulator
import BalloonBlocks
import FreePages
import VirtioCore
import VirtioPCI
@testable import Balloon

final class FixedStats: BalloonStatsSource {
    var value: UInt64 = 1
    func collect() -> [BalloonStat] { BalloonStatTag.allCases.map { BalloonStat($0, value) } }
}

/// MemAvailable/MemFree as a test sets them, less what the balloon memory holds (as in a
/// real guest, where memory balloond takes leaves MemFree and MemAvailable).
final class FakeMemoryStatus: GuestMemoryStatus {
    var available: UInt64 = 800 << 20
    var free: UInt64 = 700 << 20
    var held: () -> UInt64 = { 0 }
    /// Runs at every read.
    var onRead: (() -> Void)?
    func read() -> (available: UInt64, free: UInt64)? {
        onRead?()
        let h = held()
        return (available > h ? available - h : 0, free > h ? free - h : 0)
    }
}

/// A clock tests move by hand.
final class FakeClock: Sendable {
    private let time = Mutex<Duration>(.seconds(1))
    var now: Duration {
        get { time.withLock { $0 } }
        set { time.withLock { $0 = newValue } }
    }
    func advance(milliseconds: Int) { now += .milliseconds(milliseconds) }
    /// This clock as the driver's and the daemon's clock.
    var monotonic: MonotonicClock { MonotonicClock { [self] in now } }
}

/// Wraps the simulated buddy allocator and records what the device could still do when the
/// driver gave pages back.
final class RecordingSource: FreePageSource {
    let inner: SimulatedBuddyAllocator
    weak var device: SimulatedBalloonDevice?
    var releaseDeviceStatus: [DeviceStatus] = []
    var releaseHintState: [SimulatedBalloonDevice.HintState] = []
    var appliedRanges: [GuestPhysicalRange] = []
    var endRounds = 0
    init(_ inner: SimulatedBuddyAllocator) { self.inner = inner }
    var name: String { inner.name }
    var ownership: FreePageOwnership { inner.ownership }
    var heldBytes: UInt64 { inner.heldBytes + heldUntilDone }
    /// Memory this source holds until DONE besides the allocator's (given back only by
    /// `releaseUnderPressure`, which records each request).
    var heldUntilDone: UInt64 = 0
    var pressureRequests: [UInt64] = []
    /// Runs at every `releaseUnderPressure` call.
    var onPressureRelease: (() -> Void)?
    func releaseUnderPressure(bytes: UInt64) -> UInt64 {
        pressureRequests.append(bytes)
        onPressureRelease?()
        let n = min(bytes, heldUntilDone)
        heldUntilDone -= n
        return n
    }
    /// Runs at the start of every round.
    var onBeginRound: (() -> Void)?
    func beginRound(id: UInt32) throws(FreePageSourceError) {
        onBeginRound?()
        try inner.beginRound(id: id)
    }
    func nextBatch(maxRanges: Int, maxRangeBytes: UInt64) throws(FreePageSourceError) -> [GuestPhysicalRange] {
        maxRangeBytesAsked.append(maxRangeBytes)
        return try inner.nextBatch(maxRanges: maxRanges, maxRangeBytes: maxRangeBytes)
    }
    /// Every `maxRangeBytes` the driver passed to `nextBatch`.
    var maxRangeBytesAsked: [UInt64] = []
    /// `preferredMaxRangeBytes` as a test sets it.
    var preferredMax: UInt64?
    var preferredMaxRangeBytes: UInt64? { preferredMax }
    /// A reserve as a test scripts it: its target (0: none) and what each `replenishReserve`
    /// call reports, in order (the last one repeats).
    var reserveTarget: UInt64 = 0
    var reserveScript: [ReserveProgress] = [.stuck]
    var reserveTargetBytes: UInt64 { reserveTarget }
    var replenishCalls = 0
    /// Runs at every `replenishReserve` call.
    var onReplenish: (() -> Void)?
    func replenishReserve() -> ReserveProgress {
        replenishCalls += 1
        onReplenish?()
        return reserveScript.count > 1 ? reserveScript.removeFirst() : reserveScript[0]
    }
    var hintingDoneCalls = 0
    func hintingDone() {
        hintingDoneCalls += 1
        releaseAll()
    }
    func hintsApplied(_ ranges: [GuestPhysicalRange]) { appliedRanges += ranges; inner.hintsApplied(ranges) }
    func endRound() { endRounds += 1; inner.endRound() }
    func releaseAll() {
        if let device {
            releaseDeviceStatus.append(device.status)
            releaseHintState.append(device.hintState)
        }
        inner.releaseAll()
    }
}

/// A simulated balloon device with a driver over it: fixed stats, simulated balloon memory in
/// the top `balloonBytes` of the simulated RAM, a memory status tests set, a clock tests move
/// (unless `realClock`), and a recording hint source over a simulated buddy allocator.
struct Rig {
    let device: SimulatedBalloonDevice
    let driver: BalloonDriver<ModernPCITransport>
    let line: SimulatedInterruptLine
    let stats = FixedStats()
    let memory: SimulatedBalloonMemory
    let memoryStatus = FakeMemoryStatus()
    /// The driver's clock, unless the rig was made with `realClock`.
    let clock = FakeClock()
    let source: RecordingSource

    /// `hints` is the allocator the driver hints from; by default one over the whole
    /// simulated RAM, 90 % used. `realClock` leaves the driver on the monotonic clock (hint
    /// rounds wait for ring space in real time).
    init(_ props: BalloonDeviceProperties = BalloonDeviceProperties(), options: BalloonDriverOptions = BalloonDriverOptions(),
         balloonBytes: UInt64 = 64 << 20, hints: SimulatedBuddyAllocator? = nil, realClock: Bool = false) throws {
        device = SimulatedBalloonDevice(properties: props)
        line = device.makeInterruptLine()
        // Balloon memory in the upper part of the simulated RAM (the device checks PFNs against it).
        memory = SimulatedBalloonMemory(base: props.ramSize - balloonBytes, bytes: balloonBytes)
        source = RecordingSource(hints ?? SimulatedBuddyAllocator(bytes: props.ramSize, usedFraction: 0.9))
        source.device = device
        driver = BalloonDriver(transport: try device.makeTransport(), allocator: device.makeDMAAllocator(), options: options, statsSource: stats,
                               hintSource: source, balloonMemory: memory, memoryStatus: memoryStatus)
        if !realClock {
            driver.clock = clock.monotonic
        }
        memoryStatus.held = { [memory] in memory.heldBytes }
    }

    /// A brought-up rig whose device offers free page hinting, over `ramMiB` of simulated RAM
    /// of which the hint source's allocator has `usedFraction` in use.
    static func hinting(ramMiB: UInt64 = 256, usedFraction: Double = 0.3, seed: UInt64 = 7) throws -> Rig {
        let rig = try Rig(BalloonDeviceProperties(freePageHint: true, ramSize: ramMiB << 20),
                          hints: SimulatedBuddyAllocator(bytes: ramMiB << 20, usedFraction: usedFraction, seed: seed), realClock: true)
        try rig.driver.bringUp()
        return rig
    }

    /// The free page hint queue's index when the device offers hinting (QEMU's numbering).
    var hintQueue: UInt16 { 3 }

    /// Services every pending interrupt, as the event loop would.
    func serviceAll() throws { try serviceAll(driver) }

    func serviceAll(_ driver: BalloonDriver<ModernPCITransport>) throws {
        var n = 0
        while try line.wait(timeoutMilliseconds: 0) {
            try driver.serviceInterrupt(line: line)
            n += 1
            precondition(n < 1000, "interrupt storm")
        }
    }
}

extension Rig {
    /// Brings the device up and sets a target of `pages` 4 KiB pages in the balloon.
    func running(target pages: UInt32) throws -> Rig {
        try driver.bringUp()
        setTarget(pages: pages)
        try serviceAll()
        return self
    }

    func setTarget(pages: UInt32) {
        device.setTarget(bytes: device.properties.ramSize - UInt64(pages) * 4096)
    }

    /// Every config write of `actual`, in order.
    var actualWrites: [[UInt8]] {
        device.events.compactMap { if case .configWrite(BalloonConfigLayout.actual, let b) = $0 { return b }; return nil }
    }
}
