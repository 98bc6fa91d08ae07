import BalloonBlocks
import FreePages
import VirtioCore
import VirtioQueue

/// The guest's free memory now (from /proc/meminfo), as the pressure and reporting policies
/// need it.
public protocol GuestMemoryStatus: AnyObject {
    /// MemAvailable and MemFree in bytes (nil when they cannot be read).
    func read() -> (available: UInt64, free: UInt64)?
}

/// /proc/meminfo read into one reused buffer and scanned as bytes for MemFree and
/// MemAvailable: no String, no dictionary. This runs on every pressure check, so its cost is
/// most of what a watched guest pays for balloond between events.
public final class ProcMemoryStatus: GuestMemoryStatus {
    /// Fills the buffer from the start of /proc/meminfo; returns the bytes read, nil on error.
    let readInto: (inout [UInt8]) -> Int?
    private var buffer = [UInt8](repeating: 0, count: 8192)
    public init(readInto: @escaping (inout [UInt8]) -> Int?) { self.readInto = readInto }
    public func read() -> (available: UInt64, free: UInt64)? {
        guard let n = readInto(&buffer), n > 0 else { return nil }
        return parseMeminfoAvailableFree(buffer[0..<min(n, buffer.count)])
    }
}

/// MemAvailable and MemFree (bytes) from /proc/meminfo's text ("MemFree:   356392 kB"
/// lines), or nil when either is missing or malformed. Pure; stops once it has both.
public func parseMeminfoAvailableFree(_ text: ArraySlice<UInt8>) -> (available: UInt64, free: UInt64)? {
    let availableKey = Array("MemAvailable".utf8), freeKey = Array("MemFree".utf8)
    var available: UInt64?
    var free: UInt64?
    var malformed = false
    scanKeyValues(text, separator: UInt8(ascii: ":")) { key, value in
        let isAvailable = key.elementsEqual(availableKey)
        guard isAvailable || key.elementsEqual(freeKey) else { return true }
        // The kernel prints kB; a value too big for bytes is malformed.
        guard let value, value <= UInt64.max / 1024 else {
            malformed = true
            return false
        }
        if isAvailable { available = value * 1024 } else { free = value * 1024 }
        return available == nil || free == nil
    }
    guard !malformed, let available, let free else { return nil }
    return (available, free)
}

/// Deflate under memory pressure (DEFLATE_ON_OOM; docs/virtio-balloon.md §4).
///
/// Linux deflates 1 MiB per OOM-killer invocation, which is after the guest has already
/// failed. balloond acts earlier: a PSI trigger on /proc/pressure/memory (tasks stalled on
/// memory for `psiStall` within `psiWindow`) or MemAvailable below
/// `deflateBelowAvailableBytes` gives back memory: first blocks held for free page
/// reporting (always), then, when DEFLATE_ON_OOM is negotiated, balloon pages: at least
/// `deflateStepBytes`, plus whatever MemAvailable is short of the watermark. The balloon then
/// stays at most that small for `hold`, and afterwards re-inflates only while
/// MemAvailable stays above `reinflateAboveAvailableBytes` (hysteresis: no inflate/deflate
/// ping-pong). Without DEFLATE_ON_OOM the host's target is binding and only reporting backs
/// off.
public struct PressurePolicy: Sendable, Equatable {
    public var deflateBelowAvailableBytes: UInt64 = 96 << 20
    public var deflateStepBytes: UInt64 = 64 << 20
    /// How long the balloon stays deflated after a pressure event.
    public var hold: Duration = .seconds(60)
    public var reinflateAboveAvailableBytes: UInt64 = 192 << 20
    public var psiStall: Duration = .milliseconds(100)
    public var psiWindow: Duration = .seconds(1)
    /// How often MemAvailable is checked while balloond holds memory and it is moving (or
    /// PSI fired), or while balloond holds more than the guest has left above the deflate
    /// watermark. Otherwise each check that finds it moved less than `movementBytes` doubles
    /// the interval, up to `restingCheckInterval` (at least `checkInterval`): a guest at rest
    /// with headroom costs a few wakeups a minute, one whose memory is draining or short is
    /// watched closely (and PSI wakes at once).
    public var checkInterval: Duration = .milliseconds(250)
    /// The interval while memory is still but balloond holds more than the guest's headroom:
    /// the first check after a sudden allocation comes at most this late; from then on the
    /// memory moves and checks run every `checkInterval`.
    public var exposedCheckInterval: Duration = .milliseconds(500)
    public var restingCheckInterval: Duration = .seconds(15)
    /// Whether an early-warning PSI trigger (any stall at all) wakes the daemon: then a
    /// balloon larger than the guest's headroom is not polled every
    /// `exposedCheckInterval` but left to that trigger, backing off as at rest.
    public var earlyWarningArmed = false
    public var movementBytes: UInt64 = 16 << 20
    public init() {}
}

struct PressureState {
    /// While `holdUntil` has not passed, the balloon stays at most `ceilingPages` big.
    var ceilingPages: Int?
    var holdUntil: Duration?
    /// After a hold expired: re-inflate only while MemAvailable stays above the watermark,
    /// until the balloon is back at the host's target.
    var reinflateLimited = false
    /// The next MemAvailable check, its interval (`checkInterval` doubling up to
    /// `restingCheckInterval` while memory stays still), and what the last one read.
    var nextCheck: Duration = .zero
    var checkInterval: Backoff
    var lastReading: (available: UInt64, free: UInt64)?
    var lastReadingAt: Duration = .zero
    /// What balloond itself held at that reading (`ownHeldBytes`).
    var lastReadingHeld: UInt64 = 0
}


extension BalloonDriver {
    /// Called by the event loop after every wakeup: on a PSI trigger (`psiFired`), when the
    /// MemAvailable check or a reporting pass is due, or when a pressure hold ends. Gives memory
    /// back under pressure, runs a reporting pass when one is due, and retries the target.
    public func tick(psiFired: Bool = false, earlyWarning: Bool = false) throws(BalloonError) {
        guard isRunning else { return }
        try tickPressure(psiFired: psiFired, earlyWarning: earlyWarning)
        try adjustBalloonSize()
        try reportIfDue()
        replenishHintReserveIfDue()
        // Memory taken just now (inflate, report) is watched from now on, closely at first.
        // The work above can take longer than an interval (releasing memory under pressure):
        // a check that fell due meanwhile runs one interval from now, not in the past.
        let after = clock.now()
        if holdsMemory, pressure.nextCheck <= after {
            pressure.checkInterval.reset()
            pressure.nextCheck = after + pressure.checkInterval.next()
        }
    }

    /// The urgent part of `tick`, which the event loop runs first (at real-time priority
    /// when it has it): ends an expired hold and, on a PSI trigger (`psiFired`: the stall
    /// trigger; `earlyWarning`: any stall) or when the MemAvailable check is due, checks and
    /// gives memory back. Does no bulk work (no inflating, no reporting pass).
    public func tickPressure(psiFired: Bool = false, earlyWarning: Bool = false) throws(BalloonError) {
        guard isRunning else { return }
        let now = clock.now()
        if let until = pressure.holdUntil, now >= until {
            // The hold is over: from now on the balloon may grow again, watermarked.
            pressure.holdUntil = nil
            pressure.ceilingPages = nil
            pressure.reinflateLimited = true
            logger.info("memory pressure hold ended; re-inflating while MemAvailable stays above \(options.pressure.reinflateAboveAvailableBytes >> 20) MiB")
        }
        if psiFired || (holdsMemory && (earlyWarning || now >= pressure.nextCheck)) {
            try checkPressure(psiFired: psiFired, earlyWarning: earlyWarning, now: now)
        }
    }

    /// Whether balloond holds guest memory that pressure could make it give back (the
    /// balloon's, or a hint source's held until DONE).
    private var holdsMemory: Bool { (balloonMemory?.heldBytes ?? 0) > 0 || (hintSource?.heldBytes ?? 0) > 0 }

    /// Guest memory balloond itself holds: the balloon's, a hint source's, reported pages.
    /// Taking it lowers MemAvailable exactly as much, and pressure can make balloond give it
    /// back, so a fall in MemAvailable that this grew by is balloond's own doing, not a drain.
    private var ownHeldBytes: UInt64 {
        (balloonMemory?.heldBytes ?? 0) &+ (hintSource?.heldBytes ?? 0) &+ UInt64(reporting.heldPages) * balloonPageSize
    }
    private func checkPressure(psiFired: Bool, earlyWarning: Bool = false, now: Duration) throws(BalloonError) {
        let p = options.pressure
        let m = memoryStatus?.read()
        let moved: Bool
        // How fast MemAvailable fell since the last reading (bytes per second; 0 if it rose),
        // not counting what balloond itself took meanwhile (an inflate of offline memory blocks
        // takes hundreds of MiB a second: read as a drain, it would deflate what it just took).
        var drainPerSecond: UInt64 = 0
        let held = ownHeldBytes
        if let m, let last = pressure.lastReading {
            moved = absDiff(m.available, last.available) >= p.movementBytes || absDiff(m.free, last.free) >= p.movementBytes
            let elapsed = now > pressure.lastReadingAt ? now - pressure.lastReadingAt : .zero
            let before = last.available &+ pressure.lastReadingHeld, after = m.available &+ held
            if before > after, elapsed > .zero {
                let fell = Double(before - after)
                drainPerSecond = UInt64(min(fell / (elapsed / .seconds(1)), Double(UInt64.max / 4)))
            }
        } else {
            moved = true
        }
        pressure.lastReading = m
        pressure.lastReadingAt = now
        pressure.lastReadingHeld = held
        // While balloond holds more than the guest has left above the deflate watermark, one
        // allocation burst can exhaust the guest between two checks. With nothing to reclaim,
        // PSI records only a few ms of stall before the OOM killer acts: only the early-warning
        // trigger (any stall) comes in time, and only for a daemon that gets the CPU at once
        // (real-time priority). Without that trigger the check stays at the fast interval
        // there; with it, or with headroom to spare, it backs off.
        let headroom = m.map { $0.available > p.deflateBelowAvailableBytes ? $0.available - p.deflateBelowAvailableBytes : 0 }
        let exposed = !p.earlyWarningArmed && (headroom.map { (balloonMemory?.heldBytes ?? 0) > $0 } ?? false)
        let interval: Duration
        if psiFired || earlyWarning || moved || (pressure.checkInterval.current ?? .zero) == .zero {
            pressure.checkInterval.reset()
            interval = pressure.checkInterval.next()
        } else if exposed {
            interval = max(p.checkInterval, p.exposedCheckInterval)
            pressure.checkInterval.restart(from: interval)
        } else {
            interval = pressure.checkInterval.next()
        }
        pressure.nextCheck = now + interval
        // Memory draining at this rate until the check after next: if that would take the
        // guest below the watermark, act now rather than one interval too late.
        let horizon = UInt64(Double(drainPerSecond) * Double((interval * 2).whole(.nanoseconds(1))) / 1e9)
        let low = m.map { $0.available < p.deflateBelowAvailableBytes } ?? false
        let predictedLow = m.map { $0.available < p.deflateBelowAvailableBytes &+ horizon } ?? false
        if psiFired || low || predictedLow {
            let why = psiFired ? "PSI memory trigger" : low ? "MemAvailable below the watermark"
                : "MemAvailable falling \(drainPerSecond >> 20) MiB/s, below the watermark within \((interval * 2).whole(.milliseconds(1))) ms"
            try relievePressure(available: m?.available, drainBytes: horizon, why: why)
        }
        if let m, !reporting.held.isEmpty, m.free < options.reporting.releaseBelowFreeBytes {
            releaseReported(bytes: options.reporting.releaseStepBytes, why: "MemFree \(m.free >> 20) MiB below \(options.reporting.releaseBelowFreeBytes >> 20) MiB")
        }
    }

    /// When the event loop should call `tick` next, at the latest (on `clock`); nil when
    /// nothing is timed (only an interrupt or PSI can change anything). Every deadline here
    /// moves past the current time once `tick` has handled it.
    public var nextDeadline: Duration? {
        var d: [Duration] = []
        if let s = sizingDeadline { d.append(s) }
        // While a report is in flight the device's interrupt ends it, not a timer.
        if negotiated.contains(.reporting), reporting.disabledReason == nil, reporting.inFlight == nil { d.append(reporting.nextPass) }
        if let h = pressure.holdUntil { d.append(h) }
        if holdsMemory { d.append(pressure.nextCheck) }
        if let r = hinting.reserveNextPass, hintSource != nil, negotiated.contains(.freePageHint) { d.append(r) }
        return d.min()
    }

    /// Gives back at least `deflateStepBytes`, plus what MemAvailable is short of the
    /// watermark, plus `drainBytes` (what the current drain would take before the check after
    /// next).
    private func relievePressure(available: UInt64?, drainBytes: UInt64 = 0, why: String) throws(BalloonError) {
        let p = options.pressure
        var need = p.deflateStepBytes &+ drainBytes
        if let a = available, a < p.deflateBelowAvailableBytes { need += p.deflateBelowAvailableBytes - a }
        // Memory held for free page hinting first: it only makes a migration cheaper.
        if let source = hintSource, source.heldBytes > 0 {
            let freed = source.releaseUnderPressure(bytes: need)
            if freed > 0 {
                counters.pressureHintReleases += 1
                // No refill straight back into the pressure.
                armHintReserve(after: hintOptions.reserveAfterPressure)
                logger.notice("memory pressure: gave back memory held for free page hinting", metadata: [
                    "why": "\(why)", "released_mib": "\(freed >> 20)", "still_held_mib": "\(source.heldBytes >> 20)",
                ])
            }
            need = need > freed ? need - freed : 0
        }
        if !reporting.held.isEmpty {
            let before = reporting.heldPages
            releaseReported(bytes: need, why: why)
            let freed = UInt64(before - reporting.heldPages) * balloonPageSize
            need = need > freed ? need - freed : 0
        }
        guard need > 0, negotiated.contains(.deflateOnOOM), committedPages > 0 else { return }
        let pages = min(committedPages, Int((need + balloonPageSize - 1) / balloonPageSize))
        let ceiling = committedPages - pages
        pressure.ceilingPages = min(pressure.ceilingPages ?? Int.max, ceiling)
        pressure.holdUntil = clock.now() + p.hold
        pressure.reinflateLimited = false
        counters.pressureDeflates += 1
        // Memory first, words after: writing the log line can itself wait for memory (a log
        // file on tmpfs grows), and the guest may have none left until the deflate.
        let deflated = Result { () throws(BalloonError) in try adjustBalloonSize() }
        logger.notice("memory pressure: deflated the balloon", metadata: [
            "why": "\(why)", "available_mib": "\(available.map { String($0 >> 20) } ?? "?")",
            "deflate_mib": "\(pages >> 8)", "hold_s": "\(p.hold.whole(.seconds(1)))",
        ])
        try deflated.get()
    }
}

private func absDiff(_ a: UInt64, _ b: UInt64) -> UInt64 { a > b ? a - b : b - a }
