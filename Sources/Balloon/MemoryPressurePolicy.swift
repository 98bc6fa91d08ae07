import FreePages
import VirtioCore
import VirtioQueue

/// The guest's free memory now (from /proc/meminfo), as the pressure and reporting policies
/// need it.
public protocol GuestMemoryStatus: AnyObject {
    /// MemAvailable and MemFree in bytes (nil when they cannot be read).
    func read() -> (available: UInt64, free: UInt64)?
}

/// /proc/meminfo through a file reader.
public final class ProcMemoryStatus: GuestMemoryStatus {
    let readFile: (String) -> String?
    public init(readFile: @escaping (String) -> String?) { self.readFile = readFile }
    public func read() -> (available: UInt64, free: UInt64)? {
        guard let text = readFile("/proc/meminfo") else { return nil }
        let m = parseKeyValues(text, separator: ":")
        guard let a = m["MemAvailable"], let f = m["MemFree"] else { return nil }
        return (a * 1024, f * 1024)
    }
}

/// Deflate under memory pressure (DEFLATE_ON_OOM; docs/virtio-balloon.md §4).
///
/// Linux deflates 1 MiB per OOM-killer invocation, which is after the guest has already
/// failed. balloond acts earlier: a PSI trigger on /proc/pressure/memory (tasks stalled on
/// memory for `psiStallMicroseconds` within `psiWindowMicroseconds`) or MemAvailable below
/// `deflateBelowAvailableBytes` gives back memory: first blocks held for free page
/// reporting (always), then, when DEFLATE_ON_OOM is negotiated, balloon pages: at least
/// `deflateStepBytes`, plus whatever MemAvailable is short of the watermark. The balloon then
/// stays at most that small for `holdNanos`, and afterwards re-inflates only while
/// MemAvailable stays above `reinflateAboveAvailableBytes` (hysteresis: no inflate/deflate
/// ping-pong). Without DEFLATE_ON_OOM the host's target is binding and only reporting backs
/// off.
public struct PressurePolicy: Sendable, Equatable {
    public var deflateBelowAvailableBytes: UInt64 = 96 << 20
    public var deflateStepBytes: UInt64 = 64 << 20
    /// How long the balloon stays deflated after a pressure event.
    public var holdNanos: UInt64 = 60_000_000_000
    public var reinflateAboveAvailableBytes: UInt64 = 192 << 20
    public var psiStallMicroseconds = 100_000
    public var psiWindowMicroseconds = 1_000_000
    /// How often MemAvailable is checked while balloond holds memory and it is moving (or
    /// PSI fired), or while balloond holds more than the guest has left above the deflate
    /// watermark. Otherwise each check that finds it moved less than `movementBytes` doubles
    /// the interval, up to `restingCheckIntervalNanos`: a guest at rest with headroom costs a
    /// few wakeups a minute, one whose memory is draining or short is watched closely (and
    /// PSI wakes at once).
    public var checkIntervalNanos: UInt64 = 250_000_000
    /// The interval while memory is still but balloond holds more than the guest's headroom:
    /// the first check after a sudden allocation comes at most this late; from then on the
    /// memory moves and checks run every `checkIntervalNanos`.
    public var exposedCheckIntervalNanos: UInt64 = 500_000_000
    public var restingCheckIntervalNanos: UInt64 = 15_000_000_000
    public var movementBytes: UInt64 = 16 << 20
    public init() {}
}

struct PressureState {
    /// While `holdUntilNanos` has not passed, the balloon stays at most `ceilingPages` big.
    var ceilingPages: Int?
    var holdUntilNanos: UInt64?
    /// After a hold expired: re-inflate only while MemAvailable stays above the watermark,
    /// until the balloon is back at the host's target.
    var reinflateLimited = false
    /// The next MemAvailable check, its interval, and what the last one read.
    var nextCheckNanos: UInt64 = 0
    var checkIntervalNanos: UInt64 = 0
    var lastReading: (available: UInt64, free: UInt64)?
}


extension BalloonDriver {
    /// Called by the event loop after every wakeup: on a PSI trigger (`psiFired`), when the
    /// MemAvailable check or a reporting pass is due, or when a pressure hold ends. Gives memory
    /// back under pressure, runs a reporting pass when one is due, and retries the target.
    public func tick(psiFired: Bool = false) throws(BalloonError) {
        guard isRunning else { return }
        let now = clock()
        if let until = pressure.holdUntilNanos, now >= until {
            // The hold is over: from now on the balloon may grow again, watermarked.
            pressure.holdUntilNanos = nil
            pressure.ceilingPages = nil
            pressure.reinflateLimited = true
            logger.info("memory pressure hold ended; re-inflating while MemAvailable stays above \(options.pressure.reinflateAboveAvailableBytes >> 20) MiB")
        }
        if psiFired || (holdsMemory && now >= pressure.nextCheckNanos) { try checkPressure(psiFired: psiFired, now: now) }
        try adjustBalloonSize()
        try reportIfDue()
        // Memory taken just now (inflate, report) is watched from now on, closely at first.
        if holdsMemory, pressure.nextCheckNanos <= now {
            pressure.checkIntervalNanos = options.pressure.checkIntervalNanos
            pressure.nextCheckNanos = now + pressure.checkIntervalNanos
        }
    }

    /// Whether balloond holds guest memory that pressure could make it give back.
    private var holdsMemory: Bool { (balloonMemory?.heldBytes ?? 0) > 0 }

    private func checkPressure(psiFired: Bool, now: UInt64) throws(BalloonError) {
        let p = options.pressure
        let m = memoryStatus?.read()
        let moved: Bool
        if let m, let last = pressure.lastReading {
            moved = absDiff(m.available, last.available) >= p.movementBytes || absDiff(m.free, last.free) >= p.movementBytes
        } else {
            moved = true
        }
        pressure.lastReading = m
        // While balloond holds more than the guest has left above the deflate watermark, one
        // allocation burst can exhaust the guest between two checks; no kernel event reliably
        // precedes that (with nothing to reclaim, PSI records little stall before the OOM
        // killer acts, and an OOM kill of balloond returns its memory only once the guardian
        // has stopped the device, by when the OOM killer may have taken a second victim). So
        // there the check stays at the fast interval; with headroom to spare it backs off.
        let headroom = m.map { $0.available > p.deflateBelowAvailableBytes ? $0.available - p.deflateBelowAvailableBytes : 0 }
        let exposed = headroom.map { (balloonMemory?.heldBytes ?? 0) > $0 } ?? false
        if psiFired || moved || pressure.checkIntervalNanos == 0 {
            pressure.checkIntervalNanos = p.checkIntervalNanos
        } else if exposed {
            pressure.checkIntervalNanos = max(p.checkIntervalNanos, p.exposedCheckIntervalNanos)
        } else {
            pressure.checkIntervalNanos = min(pressure.checkIntervalNanos * 2, max(p.restingCheckIntervalNanos, p.checkIntervalNanos))
        }
        pressure.nextCheckNanos = now + pressure.checkIntervalNanos
        let low = m.map { $0.available < p.deflateBelowAvailableBytes } ?? false
        if psiFired || low { try relievePressure(available: m?.available, why: psiFired ? "PSI memory trigger" : "MemAvailable below the watermark") }
        if let m, !reporting.held.isEmpty, m.free < options.reporting.releaseBelowFreeBytes {
            releaseReported(bytes: options.reporting.releaseStepBytes, why: "MemFree \(m.free >> 20) MiB below \(options.reporting.releaseBelowFreeBytes >> 20) MiB")
        }
    }

    /// When the event loop should call `tick` next, at the latest (monotonic ns); nil when
    /// nothing is timed (only an interrupt or PSI can change anything). Every deadline here
    /// moves past the current time once `tick` has handled it.
    public var nextDeadlineNanos: UInt64? {
        var d: [UInt64] = []
        if let s = sizingDeadlineNanos { d.append(s) }
        // While a report is in flight the device's interrupt ends it, not a timer.
        if negotiated.contains(.reporting), reporting.disabledReason == nil, reporting.inFlight == nil { d.append(reporting.nextPassNanos) }
        if let h = pressure.holdUntilNanos { d.append(h) }
        if holdsMemory { d.append(pressure.nextCheckNanos) }
        return d.min()
    }

    private func relievePressure(available: UInt64?, why: String) throws(BalloonError) {
        let p = options.pressure
        var need = p.deflateStepBytes
        if let a = available, a < p.deflateBelowAvailableBytes { need += p.deflateBelowAvailableBytes - a }
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
        pressure.holdUntilNanos = clock() + p.holdNanos
        pressure.reinflateLimited = false
        counters.pressureDeflates += 1
        logger.notice("memory pressure: deflating the balloon", metadata: [
            "why": "\(why)", "available_mib": "\(available.map { String($0 >> 20) } ?? "?")",
            "deflate_mib": "\(pages >> 8)", "hold_s": "\(p.holdNanos / 1_000_000_000)",
        ])
        try adjustBalloonSize()
    }
}

private func absDiff(_ a: UInt64, _ b: UInt64) -> UInt64 { a > b ? a - b : b - a }
