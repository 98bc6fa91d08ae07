import FreePages
import VirtioCore
import VirtioPCI
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

/// Deflate under memory pressure (DEFLATE_ON_OOM; virtio-balloon.md §4, field-notes F11).
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
    /// PSI fired). Each check that finds it moved less than `movementBytes` doubles the
    /// interval, up to `restingCheckIntervalNanos`: a guest at rest costs a few wakeups a
    /// minute, one whose memory is draining is watched closely (and PSI wakes at once).
    public var checkIntervalNanos: UInt64 = 250_000_000
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

/// Free page reporting by report-then-hold (virtio-balloon.md §8): balloond takes free 2 MiB
/// blocks while MemFree stays above `keepFreeBytes`, reports them (QEMU discards them on the
/// host), and holds them, so they cannot be reused while reported. When MemFree falls below
/// `releaseBelowFreeBytes` (or PSI fires) it gives back `releaseStepBytes` and waits
/// `cooldownNanos` before reporting again. Held blocks are also the first source for
/// inflating: they are already discarded on the host. QEMU ignores reports when
/// `poison_val` is non-zero, so then nothing is reported.
public struct ReportingPolicy: Sendable, Equatable {
    public var keepFreeBytes: UInt64 = 256 << 20
    public var releaseBelowFreeBytes: UInt64 = 128 << 20
    public var releaseStepBytes: UInt64 = 64 << 20
    public var maxHeldBytes: UInt64?
    /// Time between passes; each pass that reports nothing doubles it, up to
    /// `restingIntervalNanos` (an idle guest is not woken every couple of seconds).
    public var intervalNanos: UInt64 = 2_000_000_000
    public var restingIntervalNanos: UInt64 = 30_000_000_000
    public var cooldownNanos: UInt64 = 10_000_000_000
    public init() {}
}

struct ReportingState {
    /// Reported and acknowledged blocks, held until given back.
    var held: [BalloonBlock] = []
    /// The one report buffer in flight.
    var inFlight: [BalloonBlock]?
    var nextPassNanos: UInt64 = 0
    /// The current wait between passes (grows while passes find nothing to report).
    var passIntervalNanos: UInt64 = 0
    var disabledReason: String?
    var loggedDisabled = false

    var heldPages: Int { held.reduce(0) { $0 + $1.pageCount } }

    mutating func abandon(memory: BalloonMemory?) {
        if let f = inFlight { memory?.release(f) }
        inFlight = nil
        memory?.release(held)
        held = []
    }
}

/// 32 descriptors per report, as Linux (`PAGE_REPORTING_CAPACITY`) and QEMU's queue size.
let reportCapacity = 32

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
        pressure.checkIntervalNanos = psiFired || moved || pressure.checkIntervalNanos == 0
            ? p.checkIntervalNanos : min(pressure.checkIntervalNanos * 2, max(p.restingCheckIntervalNanos, p.checkIntervalNanos))
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

    /// Gives back reported blocks (no device interaction: QEMU need not be told).
    func releaseReported(bytes: UInt64, why: String) {
        var freed: UInt64 = 0
        var blocks: [BalloonBlock] = []
        while freed < bytes, let b = reporting.held.popLast() {
            blocks.append(b)
            freed += b.byteCount
        }
        guard !blocks.isEmpty else { return }
        balloonMemory?.release(blocks)
        reporting.nextPassNanos = clock() + options.reporting.cooldownNanos
        reporting.passIntervalNanos = 0
        logger.info("free page reporting: gave back \(freed >> 20) MiB", metadata: ["why": "\(why)", "still_held_mib": "\(UInt64(reporting.heldPages) >> 8)"])
    }

    /// Takes up to `maxPages` from the blocks held for reporting (already discarded on the
    /// host), for inflating.
    func takeReportedForInflate(maxPages: Int) -> [BalloonBlock] {
        var out: [BalloonBlock] = []
        var pages = 0
        while let b = reporting.held.last, pages + b.pageCount <= maxPages {
            reporting.held.removeLast()
            out.append(b)
            pages += b.pageCount
        }
        return out
    }

    /// One reporting pass when due: take huge blocks above the watermark and report them in
    /// one buffer of up to 32 device-writable descriptors.
    func reportIfDue() throws(BalloonError) {
        guard negotiated.contains(.reporting), let q = queues[.reporting], let memory = balloonMemory else { return }
        if let reason = reporting.disabledReason {
            if !reporting.loggedDisabled {
                logger.notice("free page reporting off: \(reason)")
                reporting.loggedDisabled = true
            }
            return
        }
        let now = clock()
        guard reporting.inFlight == nil, now >= reporting.nextPassNanos else { return }
        // Until this pass reports something, the next one waits twice as long as the last.
        let r = options.reporting
        reporting.passIntervalNanos = reporting.passIntervalNanos == 0 ? r.intervalNanos : min(reporting.passIntervalNanos * 2, max(r.restingIntervalNanos, r.intervalNanos))
        reporting.nextPassNanos = now + reporting.passIntervalNanos
        // Not while the balloon is still moving towards its target: the target comes first.
        guard committedPages == effectiveTargetPages, sizing.inflatingPages == 0, sizing.deflatingPages == 0 else { return }
        guard let m = memoryStatus?.read(), m.free > options.reporting.keepFreeBytes else { return }
        var spare = (m.free - options.reporting.keepFreeBytes) / balloonHugeBlockSize
        if let cap = options.reporting.maxHeldBytes {
            let held = UInt64(reporting.heldPages) * balloonPageSize
            spare = min(spare, cap > held ? (cap - held) / balloonHugeBlockSize : 0)
        }
        let blocksWanted = min(Int(spare), reportCapacity, q.freeDescriptors)
        guard blocksWanted > 0 else { return }
        let take: BalloonTake
        do { take = try memory.take(maxPages: blocksWanted * balloonPagesPerHugeBlock, hugeOnly: true) } catch {
            logger.warning("free page reporting: \(memory.name) failed: \(error)")
            return
        }
        let ok = take.blocks.filter { $0.isHuge && memory.stillInPlace($0) }
        let bad = take.blocks.filter { !($0.isHuge && memory.stillInPlace($0)) }
        memory.release(bad)
        guard !ok.isEmpty else { return }
        do { try q.add(writable: ok.map { $0.ranges[0] }, token: .report) } catch {
            memory.release(ok)
            throw .queue(role: .reporting, error)
        }
        reporting.inFlight = ok
        counters.reportsSent += 1
        reporting.passIntervalNanos = 0
        try kick(.reporting)
        // More to report: the next pass follows the device's acknowledgement (an interrupt)
        // rather than a whole interval; no timer runs while the report is in flight.
        if ok.count == blocksWanted { reporting.nextPassNanos = now }
    }

    /// The device used the report buffer: the blocks are discarded on the host; keep holding.
    func reportUsed() {
        guard let blocks = reporting.inFlight else { return }
        reporting.inFlight = nil
        reporting.held += blocks
        counters.bytesReported += blocks.reduce(0) { $0 + $1.byteCount }
    }

    /// Decides at bring-up whether reporting can work (QEMU skips reports when poison_val
    /// is non-zero).
    func configureReporting() {
        reporting.loggedDisabled = false
        if let v = poisonValue, v != 0 {
            reporting.disabledReason = "poison_val is 0x\(String(v, radix: 16)) (page poisoning): QEMU ignores reports then, so reporting would only hold memory"
        } else if balloonMemory == nil {
            reporting.disabledReason = "no balloon memory backend"
        } else {
            reporting.disabledReason = nil
        }
    }
}

private func absDiff(_ a: UInt64, _ b: UInt64) -> UInt64 { a > b ? a - b : b - a }
