import Logging
import VirtioCore

/// Timing of the daemon's own decisions (the driver's are in `BalloonDriverOptions`).
public struct DaemonOptions: Sendable, Equatable {
    /// First wait before re-initialising a device that failed; doubled on each failure
    /// that follows within `stable` of the last bring-up, up to `maxBackoff` (a smaller
    /// `maxBackoff` means `initialBackoff`).
    public var initialBackoff: Duration = .seconds(1)
    public var maxBackoff: Duration = .seconds(60)
    /// How long the device must run without error before the backoff starts over.
    public var stable: Duration = .seconds(120)
    /// A deadline that is still in the past after the driver handled it is a driver bug; the
    /// loop then waits at least this long instead of spinning, and says so once.
    public var pastDeadlineFloor: Duration = .seconds(1)
    /// A deadline that was in the future when the driver's `tick` returned but has passed by
    /// the next wait fell due meanwhile: during the work after the tick (a hint command), or
    /// while the guest was paused (a live migration's downtime makes the guest's clock jump
    /// by the pause). The loop runs again at once, at most this many times in a row.
    public var maxLateDeadlineIterations = 8
    public init() {}
}

/// How the daemon stopped.
public enum DaemonExit: Equatable, Sendable {
    /// A stop signal (the normal end): the caller resets the device and cleans up.
    case stopSignal(Int32)
    /// The wait for events failed: the interrupt source went away (driving the device is
    /// impossible) or poll(2) failed.
    case waitFailed(PollerError)
}

/// The event loop of `balloond run`, as a library type with injected time and events, so its
/// behaviour over time is a tested property (Tests/BalloonTests/DaemonTests.swift drives it in
/// virtual time, as swift-nio's EmbeddedEventLoop does).
///
/// Each iteration: (re)initialise the device when due, then block in one `wait` until the
/// interrupt, the PSI trigger, a stop signal, or the driver's next deadline, then service
/// the interrupt and `tick` the policies. It never polls with a timeout of zero twice for the
/// same reason: a device that keeps failing is retried with exponential backoff, and a
/// deadline the driver does not move forward is floored and logged.
public final class Daemon<Transport: VirtioTransport> {
    public let driver: BalloonDriver<Transport>
    public let line: InterruptLine?
    public let poller: EventPoller
    public let clock: MonotonicClock
    public let options: DaemonOptions
    public var logger: Logger
    /// Called after every iteration with the driver's state, the restart count and whether
    /// the state must be published now (bring-up, failure); the caller decides how often to
    /// write it.
    public var onIteration: ((BalloonDriverStatus, _ restarts: Int, _ force: Bool) -> Void)?
    /// Runs before every bring-up; an error fails that bring-up (retried with backoff), e.g.
    /// a check that the ring pages have not moved.
    public var beforeBringUp: (() throws -> Void)?
    /// Raises (true) or lowers (false) the process's scheduling priority. The loop waits, and
    /// handles memory pressure, raised (so a wakeup preempts the allocating task at once);
    /// everything else (interrupts, inflating, reporting, hint rounds, bring-up) runs lowered,
    /// so bulk work never starves the guest. Called only on a change. nil: never changed.
    public var setUrgentPriority: ((Bool) -> Void)?
    /// Whether the priority is raised now (as far as this loop set it).
    public private(set) var urgent = false

    /// Loop iterations that returned from `wait` (tests count these).
    public private(set) var wakeups = 0
    /// Device re-initialisations after an error.
    public private(set) var restarts = 0
    /// The wait before the next re-initialisation attempt.
    public var backoff: Duration { retries.upcoming }
    /// The waits between re-initialisation attempts: `initialBackoff` doubling up to
    /// `maxBackoff`, starting over after a run of `stable`.
    private var retries: Backoff
    /// Times a deadline was still in the past after the driver handled it (a driver bug the
    /// loop floors instead of spinning on; tests assert it stays 0).
    public private(set) var pastDeadlines = 0
    /// Times a deadline fell due between the driver's tick and the next wait (a paused guest,
    /// slow work after the tick): handled at once, not a bug.
    public private(set) var lateDeadlines = 0
    /// Whether the device is to be (re)initialised.
    public private(set) var needsBringUp = true

    private var retryAt: Duration?
    private var runningSince: Duration?
    private var loggedPastDeadline = false
    private var pendingIterations = 0
    /// When the driver's last `tick` returned (nil before the first, and while re-initialising).
    private var tickedAt: Duration?
    private var lateIterations = 0
    /// What the last published snapshot was built from (cheap to compare: no register reads).
    private var lastPublishedKey: PublishKey?
    private var lastPublished: Duration = .zero
    /// How often the state is published when nothing in it changed.
    public var republishInterval: Duration = .seconds(5)

    private struct PublishKey: Equatable {
        let counters: BalloonCounters
        let target: UInt32
        let actual: UInt32
        let command: FreePageHintCommand
    }

    /// Publishes the driver's state when its counters, target, size or hint command changed,
    /// or every `republishInterval`. A status snapshot reads device registers (each an exit to
    /// the hypervisor), so a wakeup that changed nothing does not build one.
    private func publishIfChanged() {
        guard let onIteration else { return }
        let key = PublishKey(counters: driver.counters, target: driver.targetPages, actual: driver.actualPages, command: driver.hintCommand)
        let now = clock.now()
        guard key != lastPublishedKey || now - lastPublished >= republishInterval else { return }
        lastPublishedKey = key
        lastPublished = now
        onIteration(driver.statusSnapshot(), restarts, false)
    }

    /// Acts on a hint command the last interrupt left for later (bounded work per call).
    private func serviceHintCommandIfPending() throws {
        if driver.hintCommandPending { try driver.serviceHintCommand(line: line) }
    }

    /// - Parameter clock: also becomes the driver's clock, so every timed decision runs on
    ///   one clock.
    public init(driver: BalloonDriver<Transport>, line: InterruptLine?, poller: EventPoller, clock: MonotonicClock,
                options: DaemonOptions = DaemonOptions(), logger: Logger = Logger(label: "balloond")) {
        self.driver = driver
        self.line = line
        self.poller = poller
        self.clock = clock
        self.options = options
        self.logger = logger
        self.retries = Backoff(first: options.initialBackoff, cap: options.maxBackoff)
        driver.clock = clock
        let p = poller
        driver.shouldStop = { p.stopSignal != 0 }
    }

    private func setUrgent(_ on: Bool) {
        guard let setUrgentPriority, on != urgent else { return }
        setUrgentPriority(on)
        urgent = on
    }

    /// Runs until a stop signal or until the device cannot be driven any more.
    public func run() -> DaemonExit {
        defer { setUrgent(false) }
        while true {
            let signal = poller.stopSignal
            if signal != 0 { return .stopSignal(signal) }
            let now = clock.now()
            if needsBringUp, retryAt.map({ now >= $0 }) ?? true {
                setUrgent(false)
                bringUp(now: now)
            }

            let timeout = waitTimeout(now: now)
            setUrgent(true)
            let ready: Readiness
            do { ready = try poller.wait(timeout: timeout) } catch {
                logger.critical("\(error)")
                return .waitFailed(error)
            }
            wakeups += 1
            if ready.contains(.stop) || poller.stopSignal != 0 { continue }
            guard !needsBringUp else {
                // Take the event off the line (uio's count) so a device that keeps
                // interrupting while it waits for its retry does not keep the wait returning.
                if ready.contains(.interrupt) { _ = try? line?.wait(timeoutMilliseconds: 0) }
                continue
            }
            do {
                // Memory back to a guest under pressure first, still at the raised priority.
                try driver.tickPressure(psiFired: ready.contains(.pressure), earlyWarning: ready.contains(.pressureEarly))
                setUrgent(false)
                if ready.contains(.interrupt), let line, try line.wait(timeoutMilliseconds: 0) {
                    try driver.serviceInterrupt(line: line)
                }
                try driver.tick()
                tickedAt = clock.now()
                try serviceHintCommandIfPending()
                publishIfChanged()
            } catch {
                deviceFailed(error, now: clock.now())
            }
        }
    }

    /// How long to wait: until the re-initialisation retry or the driver's next deadline;
    /// without either, until an event (an idle daemon does not wake).
    private func waitTimeout(now: Duration) -> Duration? {
        // Hint commands left over from a call that hit its bound are handled next, without
        // waiting; a driver that stays pending without progress is floored like a deadline.
        if !needsBringUp, driver.hintCommandPending {
            pendingIterations += 1
            if pendingIterations <= 64 { return .zero }
        } else {
            pendingIterations = 0
        }
        let deadline = needsBringUp ? retryAt : driver.nextDeadline
        guard let deadline else { return nil }
        if deadline > now {
            loggedPastDeadline = false
            lateIterations = 0
            return deadline - now
        }
        if needsBringUp { return .zero }
        // Due since the tick that set it returned: the guest was paused or work after the tick
        // took long. Tick again now (bounded, so a driver that keeps doing so cannot spin).
        if let tickedAt, deadline > tickedAt, lateIterations < options.maxLateDeadlineIterations {
            lateIterations += 1
            lateDeadlines += 1
            return .zero
        }
        // The driver has just been ticked (or brought up) and still asks to be called in the
        // past: waiting zero would spin. Floor it and say so once.
        pastDeadlines += 1
        if !loggedPastDeadline {
            logger.error("internal: the driver's next deadline is \((now - deadline).whole(.milliseconds(1))) ms in the past after it was handled; waiting \(options.pastDeadlineFloor.whole(.milliseconds(1))) ms instead of spinning")
            loggedPastDeadline = true
        }
        return options.pastDeadlineFloor
    }

    private func bringUp(now: Duration) {
        do {
            try beforeBringUp?()
            try driver.bringUp()
            // The policies run once before the first wait, so every deadline they set is
            // already in the future when the loop computes its timeout.
            try driver.tick()
            tickedAt = clock.now()
            // A cmd id read at bring-up is acted on now, as Linux does at probe.
            try serviceHintCommandIfPending()
            needsBringUp = false
            retryAt = nil
            runningSince = now
            onIteration?(driver.statusSnapshot(), restarts, true)
        } catch {
            logger.error("device bring-up failed: \(error); retrying in \(secondsText(backoff))")
            scheduleRetry(now: now)
        }
    }

    private func deviceFailed(_ error: Error, now: Duration) {
        // A device that ran long enough starts the backoff over; one that fails again soon
        // after a re-initialisation keeps backing off.
        if let since = runningSince, now - since >= options.stable { retries.reset() }
        logger.error("device error: \(error); resetting and re-initialising the device in \(secondsText(backoff))")
        needsBringUp = true
        runningSince = nil
        tickedAt = nil
        scheduleRetry(now: now)
    }

    private func scheduleRetry(now: Duration) {
        restarts += 1
        retryAt = now + retries.next()
        onIteration?(driver.statusSnapshot(), restarts, true)
    }
}

private func secondsText(_ d: Duration) -> String {
    d.attoseconds % Duration.seconds(1).attoseconds == 0 ? "\(d.whole(.seconds(1))) s" : "\(d.whole(.milliseconds(1))) ms"
}

