import BalloonBlocks
import FreePages
import VirtioCore
import VirtioQueue

/// Free page reporting by report-then-hold (docs/virtio-balloon.md §8): balloond takes free 2 MiB
/// blocks while MemFree stays above `keepFreeBytes`, reports them (QEMU discards them on the
/// host), and holds them, so they cannot be reused while reported. When MemFree falls below
/// `releaseBelowFreeBytes` (or PSI fires) it gives back `releaseStepBytes` and waits
/// `cooldown` before reporting again. Held blocks are also the first source for
/// inflating: they are already discarded on the host. QEMU ignores reports when
/// `poison_val` is non-zero, so then nothing is reported.
public struct ReportingPolicy: Sendable, Equatable {
    public var keepFreeBytes: UInt64 = 256 << 20
    public var releaseBelowFreeBytes: UInt64 = 128 << 20
    public var releaseStepBytes: UInt64 = 64 << 20
    public var maxHeldBytes: UInt64?
    /// Time between passes; each pass that reports nothing doubles it, up to
    /// `restingInterval` (an idle guest is not woken every couple of seconds; a smaller
    /// `restingInterval` means `interval`).
    public var interval: Duration = .seconds(2)
    public var restingInterval: Duration = .seconds(30)
    public var cooldown: Duration = .seconds(10)
    public init() {}
}

struct ReportingState {
    /// Reported and acknowledged blocks, held until given back.
    var held: [BalloonBlock] = []
    /// The one report buffer in flight.
    var inFlight: [BalloonBlock]?
    var nextPass: Duration = .zero
    /// The wait between passes: `interval`, doubling while passes find nothing to report.
    var passInterval: Backoff
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
        reporting.nextPass = clock.now() + options.reporting.cooldown
        reporting.passInterval.reset()
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
        let now = clock.now()
        guard reporting.inFlight == nil, now >= reporting.nextPass else { return }
        // Until this pass reports something, the next one waits twice as long as the last.
        reporting.nextPass = now + reporting.passInterval.next()
        // Not while the balloon is still moving towards its target: the target comes first.
        guard committedPages == effectiveTargetPages, sizing.inflatingPages == 0, sizing.deflatingPages == 0 else { return }
        guard let m = memoryStatus?.read(), m.free > options.reporting.keepFreeBytes else { return }
        var spare = (m.free - options.reporting.keepFreeBytes) / balloonHugeBlockSize
        if let cap = options.reporting.maxHeldBytes {
            let held = UInt64(reporting.heldPages) * balloonPageSize
            spare = min(spare, cap > held ? (cap - held) / balloonHugeBlockSize : 0)
        }
        // Reported blocks are whole 2 MiB huge pages, contiguous in guest-physical memory (and
        // mapped at IOVA = GPA under vfio), so QEMU maps each as one I/O vector even through an
        // IOMMU that maps 4 KiB pages (it joins translations that land on contiguous memory):
        // 32 per report stay far below its 1024 (`ElementVectorBudget`).
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
        reporting.passInterval.reset()
        try kick(.reporting)
        // More to report: the next pass follows the device's acknowledgement (an interrupt)
        // rather than a whole interval; no timer runs while the report is in flight.
        if ok.count == blocksWanted { reporting.nextPass = now }
    }

    /// The device used the report buffer: the blocks are discarded on the host; keep holding.
    func reportUsed() {
        guard let blocks = reporting.inFlight else { return }
        reporting.inFlight = nil
        reporting.held += blocks
        counters.bytesReported += blocks.reduce(0) { $0 + $1.byteCount }
    }

    /// Decides at bring-up whether reporting can work (`PagePoisonPolicy.reportingRefusal`).
    func configureReporting() {
        reporting.loggedDisabled = false
        if let refusal = PagePoisonPolicy.reportingRefusal(poisonValue: poisonValue) {
            reporting.disabledReason = refusal
        } else if balloonMemory == nil {
            reporting.disabledReason = "no balloon memory backend"
        } else {
            reporting.disabledReason = nil
        }
    }
}
