import Testing
import BalloonSimulator
import FreePages
import VirtioCore
import VirtioPCI
@testable import Balloon

/// The daemon's wait in virtual time: instead of sleeping it moves the rig's clock to the
/// earlier of the timeout and the next scripted host event, runs that event, and reports what
/// became ready. At the horizon it requests a stop, so every run ends; a loop that spins
/// (timeout 0 again and again) shows up as a huge wakeup count instead of a hang.
final class VirtualPoller: EventPoller {
    let clock: FakeClock
    let device: SimulatedBalloonDevice
    private(set) var stopSignal: Int32 = 0
    var horizon: Duration
    /// Scripted host actions, each at a virtual time, with what they make ready.
    private var events: [(at: Duration, ready: Readiness, action: () -> Void)] = []
    /// From this time on the interrupt source is gone (uio reports POLLERR).
    var interruptLostAt: Duration?
    /// Every wait, with the virtual time it returned at (for per-minute counts).
    private(set) var wakeTimes: [Duration] = []
    /// Safety net so a spinning loop ends the test instead of hanging it.
    let maxWaits = 200_000

    init(clock: FakeClock, device: SimulatedBalloonDevice, runFor duration: Duration) {
        self.clock = clock
        self.device = device
        self.horizon = clock.now + duration
    }

    func requestStop(_ signal: Int32) { stopSignal = signal }

    func at(secondsFromNow s: Double, ready: Readiness = [], _ action: @escaping () -> Void = {}) {
        events.append((clock.now + .nanoseconds(UInt64(s * 1e9)), ready, action))
        events.sort { $0.at < $1.at }
    }

    /// Runs at the start of every wait (tests look at the daemon's state there).
    var onWait: (() -> Void)?

    func wait(timeout: Duration?) throws(PollerError) -> Readiness {
        onWait?()
        defer { wakeTimes.append(clock.now) }
        if wakeTimes.count >= maxWaits {
            stopSignal = 15
            return .stop
        }
        let deadline = timeout.map { clock.now + $0 } ?? .seconds(Int64.max)
        if let lost = interruptLostAt, lost <= deadline {
            clock.now = max(clock.now, lost)
            throw .interruptSourceLost(revents: 0x8)  // fault injection: POLLERR on the uio descriptor
        }
        if device.interruptAsserted { return .interrupt }
        if let e = events.first, e.at <= deadline, e.at <= horizon {
            events.removeFirst()
            clock.now = max(clock.now, e.at)
            e.action()
            return e.ready.union(device.interruptAsserted ? .interrupt : [])
        }
        if deadline >= horizon {
            clock.now = horizon
            stopSignal = 15
            return .stop
        }
        clock.now = deadline
        return []
    }

    /// Wakeups in the virtual interval [from, to).
    func wakeups(from: Duration, to: Duration) -> Int { wakeTimes.filter { $0 >= from && $0 < to }.count }
}

/// The simulator rig (BringUpTests' `Rig`) with a daemon over the virtual-time poller.
struct DaemonRig {
    let rig: Rig
    let poller: VirtualPoller
    let daemon: Daemon<ModernPCITransport>
    let start: Duration

    init(_ props: BalloonDeviceProperties = BalloonDeviceProperties(), options: BalloonDriverOptions = BalloonDriverOptions(),
         daemonOptions: DaemonOptions = DaemonOptions(), runFor duration: Duration) throws {
        rig = try Rig(props, options: options)
        start = rig.clock.now
        poller = VirtualPoller(clock: rig.clock, device: rig.device, runFor: duration)
        daemon = Daemon(driver: rig.driver, line: rig.line, poller: poller, clock: rig.clock.monotonic, options: daemonOptions)
    }

    /// Runs the daemon, and checks it never had to floor a deadline the driver left in the past.
    @discardableResult
    func run() -> DaemonExit {
        let exit = daemon.run()
        #expect(daemon.pastDeadlines == 0, "the driver left a deadline in the past after handling it")
        return exit
    }

    /// Wakeups per minute over the last `minutes` minutes of the run.
    func wakeupsPerMinute(lastMinutes minutes: UInt64) -> Double {
        let end = poller.horizon
        let from = end - minute * Int(minutes)
        return Double(poller.wakeups(from: from, to: end)) / Double(minutes)
    }
}

let minute: Duration = .seconds(60)
let hour: Duration = minute * 60
/// `30 * minute` reads as the tests mean it (the standard library has only `minute * 30`).
func * (count: Int, unit: Duration) -> Duration { unit * count }

/// "A few wakeups per minute at most when nothing changes" (issue: a daemon you can leave running).
let idleWakeupsPerMinute = 6.0

@Suite("Daemon event loop in virtual time: bounded wakeups in every state")
struct DaemonTests {
    @Test("idle with nothing held: the loop sleeps until an event (no timed wakeups)")
    func idleSleeps() throws {
        let r = try DaemonRig(runFor: 30 * minute)
        let exit = r.run()
        #expect(exit == .stopSignal(15))
        #expect(r.rig.driver.isRunning)
        #expect(r.wakeupsPerMinute(lastMinutes: 25) == 0)
        #expect(r.daemon.wakeups <= 3)
    }

    @Test("balloon inflated and idle: a few wakeups a minute (MemAvailable checks back off to the resting interval)")
    func inflatedIdle() throws {
        var props = BalloonDeviceProperties()
        props.deflateOnOOM = true
        let r = try DaemonRig(props, runFor: 30 * minute)
        r.poller.at(secondsFromNow: 1) { r.rig.device.setTarget(bytes: (1 << 30) - (32 << 20)) }
        _ = r.run()
        #expect(r.rig.driver.actualPages == 32 << 8)
        #expect(r.wakeupsPerMinute(lastMinutes: 20) <= idleWakeupsPerMinute)
    }

    @Test("1 h after a pressure deflate: a few wakeups a minute, not a spin (H1: the expired hold was never cleared)")
    func afterPressureDeflate() throws {
        var props = BalloonDeviceProperties()
        props.deflateOnOOM = true
        let r = try DaemonRig(props, runFor: hour + 10 * minute)
        let status = r.rig.memoryStatus
        r.poller.at(secondsFromNow: 1) { r.rig.device.setTarget(bytes: (1 << 30) - (48 << 20)) }
        // A memory hog: MemAvailable drops below the watermark for a while, then recovers.
        r.poller.at(secondsFromNow: 30) { status.available = 60 << 20; status.free = 40 << 20 }
        r.poller.at(secondsFromNow: 31, ready: .pressure)
        r.poller.at(secondsFromNow: 45) { status.available = 800 << 20; status.free = 700 << 20 }
        _ = r.run()
        #expect(r.rig.driver.counters.pressureDeflates >= 1)
        #expect(r.wakeupsPerMinute(lastMinutes: 60) <= idleWakeupsPerMinute)
        // The hold ended and the balloon went back to the host's target.
        #expect(r.rig.driver.actualPages == 48 << 8)
    }

    @Test("the guest's clock jumps after a tick (a migration's downtime): the due check runs at once, no internal error, no spin")
    func clockJumpAfterTick() throws {
        var props = BalloonDeviceProperties()
        props.deflateOnOOM = true
        let r = try DaemonRig(props, runFor: 10 * minute)
        r.poller.at(secondsFromNow: 1) { r.rig.device.setTarget(bytes: (1 << 30) - (48 << 20)) }
        // Publishing runs after the tick: the guest pauses there for 20 s (longer than any
        // MemAvailable check interval; a migration's downtime, a suspended guest), once, 20 s in.
        var jumpedAt: Duration?
        r.daemon.onIteration = { _, _, _ in
            guard jumpedAt == nil, r.rig.clock.now >= r.start + .seconds(20) else { return }
            r.rig.clock.now += .seconds(20)
            jumpedAt = r.rig.clock.now
        }
        var waitsAtJump: [Duration] = []
        r.poller.onWait = { if let j = jumpedAt, r.rig.clock.now == j { waitsAtJump.append(r.rig.clock.now) } }
        _ = r.run()
        #expect(jumpedAt != nil)
        #expect(r.daemon.lateDeadlines >= 1, "the deadline that fell due during the pause was counted as late")
        #expect(waitsAtJump.count >= 2, "the loop ticked again at the moment the guest resumed, without waiting")
        #expect(r.rig.driver.actualPages == 48 << 8)
        #expect(r.wakeupsPerMinute(lastMinutes: 5) <= idleWakeupsPerMinute)
    }

    @Test("a report buffer the device never returns: no timer while it is in flight (H1's short version)")
    func reportNeverReturned() throws {
        var props = BalloonDeviceProperties()
        props.freePageReporting = true
        let r = try DaemonRig(props, runFor: 20 * minute)
        r.rig.device.faults.ignoreNotifications = true
        _ = r.run()
        #expect(r.rig.driver.counters.reportsSent == 1)
        #expect(r.wakeupsPerMinute(lastMinutes: 15) <= idleWakeupsPerMinute)
    }

    @Test("free page reporting with nothing more to report: passes back off to the resting interval")
    func reportingIdle() throws {
        var props = BalloonDeviceProperties()
        props.freePageReporting = true
        let r = try DaemonRig(props, runFor: 30 * minute)
        _ = r.run()
        #expect(r.rig.driver.counters.reportsSent >= 1)
        #expect(r.wakeupsPerMinute(lastMinutes: 20) <= idleWakeupsPerMinute)
    }

    @Test("an inflate buffer the device never returns: bounded wakeups")
    func inflateNeverReturned() throws {
        let r = try DaemonRig(runFor: 20 * minute)
        r.poller.at(secondsFromNow: 1) {
            r.rig.device.faults.ignoreNotifications = true
            r.rig.device.setTarget(bytes: (1 << 30) - (32 << 20))
        }
        _ = r.run()
        #expect(r.rig.driver.counters.inflateBuffers >= 1)
        #expect(r.rig.driver.actualPages == 0)
        #expect(r.wakeupsPerMinute(lastMinutes: 15) <= idleWakeupsPerMinute)
    }

    @Test("a stats buffer the host never returns: bounded wakeups")
    func statsNeverReturned() throws {
        let r = try DaemonRig(runFor: 20 * minute)
        r.rig.device.faults.ignoreNotifications = true
        _ = r.run()
        #expect(r.rig.driver.counters.statsBuffersSent == 1)
        #expect(r.wakeupsPerMinute(lastMinutes: 15) <= idleWakeupsPerMinute)
    }

    @Test("a device that raises NEEDS_RESET after every DRIVER_OK is retried with exponential backoff (M2)")
    func needsResetAfterEveryDriverOK() throws {
        let r = try DaemonRig(runFor: 30 * minute)
        r.rig.device.faults.needsResetAfterDriverOK = true
        _ = r.run()
        // 1, 2, 4, ... 60 s: about 7 attempts in the first two minutes, then one a minute.
        #expect(r.daemon.restarts >= 5)
        #expect(r.daemon.restarts <= 40)
        #expect(r.daemon.backoff == DaemonOptions().maxBackoff)
        #expect(r.wakeupsPerMinute(lastMinutes: 20) <= 2)
    }

    @Test("a bring-up that always fails is retried with exponential backoff, not every second (M2)")
    func failingBringUpBacksOff() throws {
        let r = try DaemonRig(runFor: 10 * minute)
        r.rig.device.faults.rejectFeaturesOK = true
        _ = r.run()
        #expect(!r.rig.driver.isRunning)
        // 0, 1, 3, 7, 15, 31, 63, 123, 183, ... s
        #expect(r.daemon.restarts <= 15)
        #expect(r.daemon.restarts >= 6)
    }

    @Test("a device that recovers after a failure is running again, and a long stable run resets the backoff")
    func recoversAfterFailure() throws {
        var props = BalloonDeviceProperties()
        props.freePageHint = true
        let r = try DaemonRig(props, runFor: 10 * minute)
        r.rig.device.faults.rejectFeaturesOK = true
        r.poller.at(secondsFromNow: 20) { r.rig.device.faults.rejectFeaturesOK = false }
        _ = r.run()
        #expect(r.rig.driver.isRunning)
        #expect(r.daemon.restarts >= 3)
    }

    @Test("POLLERR from the uio descriptor ends the daemon with a reason instead of retrying (M2)")
    func interruptSourceLost() throws {
        let r = try DaemonRig(runFor: 10 * minute)
        r.poller.interruptLostAt = r.start + .seconds(5)
        let exit = r.run()
        guard case .waitFailed(.interruptSourceLost(let revents)) = exit else {
            Issue.record("expected interruptSourceLost, got \(exit)")
            return
        }
        #expect(revents == 0x8)  // POLLERR
        #expect(PollerError.interruptSourceLost(revents: revents).description.contains("revents 0x8; was uio_pci_generic unbound"))
        #expect(r.daemon.wakeups <= 3)
    }

    @Test("a stop signal ends the loop at once")
    func stopSignal() throws {
        var props = BalloonDeviceProperties()
        props.freePageReporting = true
        let r = try DaemonRig(props, runFor: 10 * minute)
        r.poller.at(secondsFromNow: 3) { r.rig.device.setTarget(bytes: (1 << 30) - (16 << 20)) }
        let exit = r.run()
        #expect(exit == .stopSignal(15))
        #expect(r.rig.clock.now == r.poller.horizon)
    }

    @Test("a host that answers every config interrupt with a new hint round: the loop keeps serving, and settles when the host does")
    func hintCommandFlood() throws {
        var props = BalloonDeviceProperties()
        props.freePageHint = true
        let r = try DaemonRig(props, runFor: 10 * minute)
        r.rig.driver.hintOptions.maxRangeBytes = 64 << 10
        r.poller.at(secondsFromNow: 5) {
            r.rig.device.faults.newHintRoundOnConfigInterrupt = 200
            r.rig.device.startHintRound()
        }
        r.poller.at(secondsFromNow: 60) { r.rig.device.finishHinting() }
        r.run()
        #expect(r.rig.driver.counters.hintCommandsDeferred > 0)
        #expect(!r.rig.driver.hintCommandPending)
        #expect(!r.rig.device.broken)
        #expect(r.rig.driver.isRunning)
        #expect(r.wakeupsPerMinute(lastMinutes: 8) <= idleWakeupsPerMinute)
    }

    @Test("a stop signal during a hint round ends the round (the driver sees the daemon's stop check)")
    func stopEndsRound() throws {
        var props = BalloonDeviceProperties()
        props.freePageHint = true
        let r = try DaemonRig(props, runFor: 10 * minute)
        #expect(!r.rig.driver.shouldStop())
        r.poller.at(secondsFromNow: 1) { r.poller.requestStop(2) }
        r.run()
        #expect(r.rig.driver.shouldStop())
    }

    @Test("the driver runs on the daemon's clock")
    func oneClock() throws {
        let r = try DaemonRig(runFor: minute)
        r.rig.clock.now = .seconds(42)
        #expect(r.rig.driver.clock.now() == .seconds(42))
    }
}

@Suite("Daemon: a balloon larger than the guest's headroom is watched closely")
struct DaemonExposedBalloonTests {
    @Test("inflated beyond the headroom above the watermark: MemAvailable is checked every 500 ms instead of backing off, and a sudden drop leads to a deflate")
    func exposedBalloonIsWatched() throws {
        var props = BalloonDeviceProperties()
        props.deflateOnOOM = true
        let r = try DaemonRig(props, runFor: 5 * minute)
        let status = r.rig.memoryStatus
        // 64 MiB inflated; only 150 MiB available, 54 MiB above the 96 MiB watermark.
        status.available = 150 << 20 + 64 << 20
        r.poller.at(secondsFromNow: 1) { r.rig.device.setTarget(bytes: (1 << 30) - (64 << 20)) }
        var droppedAt: Duration = .zero
        r.poller.at(secondsFromNow: 200) { status.available = 60 << 20 + 64 << 20; droppedAt = r.rig.clock.now }
        r.run()
        // Before the drop: every 500 ms (120 a minute), not backing off to 15 s.
        let before = Double(r.poller.wakeups(from: r.start + .seconds(60), to: r.start + .seconds(180))) / 2
        #expect(before >= 100 && before <= 130, "wakeups per minute while exposed: \(before)")
        #expect(r.rig.driver.counters.pressureDeflates >= 1)
        #expect(droppedAt > .zero)
    }
}

@Suite("Daemon: the early-warning PSI trigger and real-time priority")
struct DaemonEarlyWarningTests {
    @Test("with the early-warning trigger armed, a balloon beyond the headroom is left to it (a few wakeups a minute), and its event with MemAvailable below the watermark deflates at once")
    func earlyWarningReplacesPolling() throws {
        var props = BalloonDeviceProperties()
        props.deflateOnOOM = true
        var options = BalloonDriverOptions()
        options.pressure.earlyWarningArmed = true
        let r = try DaemonRig(props, options: options, runFor: 5 * minute)
        let status = r.rig.memoryStatus
        // 64 MiB inflated; only 150 MiB available, 54 MiB above the 96 MiB watermark.
        status.available = 150 << 20 + 64 << 20
        r.poller.at(secondsFromNow: 1) { r.rig.device.setTarget(bytes: (1 << 30) - (64 << 20)) }
        r.poller.at(secondsFromNow: 200, ready: .pressureEarly) { status.available = 60 << 20 + 64 << 20 }
        var deflatesJustAfter = -1
        r.poller.at(secondsFromNow: 200.01) { deflatesJustAfter = Int(r.rig.driver.counters.pressureDeflates) }
        r.run()
        let before = Double(r.poller.wakeups(from: r.start + .seconds(60), to: r.start + .seconds(180))) / 2
        #expect(before <= idleWakeupsPerMinute, "wakeups per minute while exposed, with the early trigger armed: \(before)")
        #expect(deflatesJustAfter == 1, "the early-warning event did not deflate at once (deflates 10 ms later: \(deflatesJustAfter))")
    }

    @Test("an early-warning event with MemAvailable well above the watermark only looks: no deflate")
    func earlyWarningOnlyLooks() throws {
        var props = BalloonDeviceProperties()
        props.deflateOnOOM = true
        var options = BalloonDriverOptions()
        options.pressure.earlyWarningArmed = true
        let r = try DaemonRig(props, options: options, runFor: 2 * minute)
        r.rig.memoryStatus.available = 600 << 20
        r.poller.at(secondsFromNow: 1) { r.rig.device.setTarget(bytes: (1 << 30) - (32 << 20)) }
        r.poller.at(secondsFromNow: 30, ready: .pressureEarly)
        r.run()
        #expect(r.rig.driver.counters.pressureDeflates == 0)
        #expect(r.rig.driver.actualPages == 32 << 8)
    }

    @Test("the loop waits and handles pressure at raised priority; interrupts, inflating and hint rounds run lowered")
    func priorityAroundWork() throws {
        var props = BalloonDeviceProperties()
        props.freePageHint = true
        props.deflateOnOOM = true
        let r = try DaemonRig(props, runFor: 10 * minute)
        var changes: [Bool] = []
        r.daemon.setUrgentPriority = { changes.append($0) }
        var raisedAtWait = 0, loweredAtWait = 0
        r.poller.onWait = { if r.daemon.urgent { raisedAtWait += 1 } else { loweredAtWait += 1 } }
        var raisedInRound = 0, roundsSeen = 0
        let daemon = r.daemon
        r.rig.source.onBeginRound = { roundsSeen += 1; if daemon.urgent { raisedInRound += 1 } }
        var raisedAtPressureRead = 0
        r.rig.memoryStatus.onRead = { if daemon.urgent { raisedAtPressureRead += 1 } }
        r.poller.at(secondsFromNow: 1) { r.rig.device.setTarget(bytes: (1 << 30) - (32 << 20)) }
        r.poller.at(secondsFromNow: 5) { r.rig.device.startHintRound() }
        r.poller.at(secondsFromNow: 60) { r.rig.device.finishHinting() }
        r.poller.at(secondsFromNow: 90, ready: .pressure) { r.rig.memoryStatus.available = 50 << 20 }
        r.run()
        #expect(roundsSeen >= 1 && raisedInRound == 0, "hint rounds: \(roundsSeen), raised during \(raisedInRound)")
        #expect(loweredAtWait == 0 && raisedAtWait > 0, "waits raised \(raisedAtWait), lowered \(loweredAtWait)")
        #expect(raisedAtPressureRead > 0, "the PSI-triggered pressure check ran lowered")
        #expect(r.rig.driver.counters.pressureDeflates >= 1)
        #expect(changes.last == false, "the loop ends lowered")
        #expect(changes.count <= 2 * r.daemon.wakeups + 2, "\(changes.count) priority changes for \(r.daemon.wakeups) wakeups")
    }
}

/// The hint source's reserve (`--hint-reserve-mib`): topped up between rounds on a timer that
/// backs off, never a spin, and no timer at all for a source without one.
@Suite("Hint reserve passes in virtual time")
struct HintReserveDaemonTests {
    static func rig(runFor: Duration) throws -> DaemonRig {
        try DaemonRig(BalloonDeviceProperties(freePageHint: true), runFor: runFor)
    }

    /// When each reserve pass ran (virtual time).
    final class Passes { var times: [Duration] = [] }

    /// A rig whose hint source keeps a reserve whose passes report `script`.
    static func rig(runFor: Duration, reserve script: [ReserveProgress]) throws -> (DaemonRig, Passes) {
        let r = try rig(runFor: runFor)
        r.rig.source.reserveTarget = 1 << 30
        r.rig.source.reserveScript = script
        let passes = Passes()
        r.rig.source.onReplenish = { passes.times.append(r.rig.clock.now) }
        return (r, passes)
    }

    @Test("a reserve that cannot grow is retried after a minute, then ever more rarely (up to every 10 minutes), not in a loop")
    func stuckReserveRetriesSlowly() throws {
        let (r, passes) = try Self.rig(runFor: 60 * minute, reserve: [.stuck])
        r.run()
        #expect(r.rig.driver.negotiated.contains(.freePageHint))
        let gaps = zip(passes.times, passes.times.dropFirst()).map { ($1 - $0).whole(.seconds(1)) }
        #expect(gaps.prefix(5) == [60, 120, 240, 480, 600], "\(gaps)")
        #expect(gaps.dropFirst(4).allSatisfy { $0 == 600 }, "\(gaps)")
        #expect(r.wakeupsPerMinute(lastMinutes: 50) <= idleWakeupsPerMinute)
    }

    @Test("a reserve that grows is topped up every second until it is full, then no more timed wakeups")
    func growingReserveStopsWhenFull() throws {
        let (r, passes) = try Self.rig(runFor: 30 * minute, reserve: [.grew, .grew, .grew, .full])
        r.run()
        let times = passes.times
        #expect(r.rig.source.replenishCalls == 4)
        #expect(times.count == 4 && zip(times, times.dropFirst()).allSatisfy { $1 - $0 == .seconds(1) }, "\(times)")
        #expect(r.wakeupsPerMinute(lastMinutes: 25) == 0)
    }

    @Test("DONE keeps the reserve (hintingDone, not releaseAll) and tops it up a second later")
    func doneRearmsThePass() throws {
        let (r, passes) = try Self.rig(runFor: 10 * minute, reserve: [.full])
        var doneAt: Duration = .zero
        r.poller.at(secondsFromNow: 120, ready: .interrupt) { r.rig.device.startHintRound() }
        r.poller.at(secondsFromNow: 121, ready: .interrupt) {
            doneAt = r.rig.clock.now
            r.rig.device.finishHinting()
        }
        r.run()
        let times = passes.times
        #expect(r.rig.source.hintingDoneCalls == 1)
        #expect(times.count == 2, "one pass after bring-up, one after DONE: \(times)")
        #expect(times.last == doneAt + .seconds(1))
        #expect(r.wakeupsPerMinute(lastMinutes: 5) == 0)
    }

    @Test("memory pressure that takes reserve memory back defers the next pass by a minute")
    func pressureDefersThePass() throws {
        let (r, passes) = try Self.rig(runFor: 10 * minute, reserve: [.full])
        r.rig.source.heldUntilDone = 256 << 20
        var releases: [Duration] = []
        r.rig.source.onPressureRelease = { releases.append(r.rig.clock.now) }
        r.poller.at(secondsFromNow: 180) { r.rig.memoryStatus.available = 40 << 20 }
        r.poller.at(secondsFromNow: 185) { r.rig.memoryStatus.available = 800 << 20 }
        r.run()
        let times = passes.times
        let released = try #require(releases.first)
        #expect(r.rig.driver.counters.pressureHintReleases >= 1)
        #expect(times.count == 2, "one pass after bring-up, one after the pressure: \(times)")
        #expect(times.last == (releases.last ?? released) + .seconds(60), "passes \(times), releases \(releases)")
    }

    @Test("a source without a reserve adds no timed wakeup, before or after a migration")
    func noReserveNoTimer() throws {
        let r = try Self.rig(runFor: 30 * minute)
        r.poller.at(secondsFromNow: 60, ready: .interrupt) { r.rig.device.startHintRound() }
        r.poller.at(secondsFromNow: 61, ready: .interrupt) { r.rig.device.finishHinting() }
        r.run()
        #expect(r.rig.driver.counters.hintRounds == 1)
        #expect(r.rig.source.replenishCalls == 0)
        #expect(r.wakeupsPerMinute(lastMinutes: 25) == 0)
    }
}
