import FreePages
import VirtioCore
import VirtioQueue

/// Driver-side state of free page hinting (docs/virtio-balloon.md §6).
struct HintRoundState {
    /// The id of the round we sent START for (Linux `cmd_id_active`), nil before any.
    var activeRound: UInt32?
    /// Whether this round's STOP buffer has been sent.
    var stopSent = false
    /// 4-byte id buffers (START/STOP), each used only when the device has returned it.
    var idBuffers: [DMARegion] = []
    var idBufferInFlight: [Bool] = []
    /// Hint elements posted in the active round and not yet used.
    var outstandingElements = 0
    /// When the active round's cmd id was read (on the driver's clock).
    var roundStart: Duration = .zero
    var firstHintPosted = false
    var roundBytes: UInt64 = 0
    /// When each of the active round's outstanding hints was posted (by start address), and
    /// what came back: how long QEMU took to apply them (it applies a hint under its migration
    /// bitmap lock, which its sender holds for up to 50 ms at a time).
    var postedAt: [UInt64: Duration] = [:]
    var applied = AppliedHints()
    /// When the source's reserve is to be topped up next (nil: full, or no reserve).
    var reserveNextPass: Duration?
    /// The waits after passes that could take nothing (`reserveRetryInterval` doubling while
    /// passes stay stuck); nil while they take memory.
    var reserveRetry: Backoff?
}

/// The device's returns of one round's hints, as the driver saw them (at its next look at the
/// used ring: after each batch during the round, at interrupts after it).
struct AppliedHints: Equatable {
    var count = 0
    var bytes: UInt64 = 0
    /// Sum and longest of posted-to-seen-used times.
    var latencySum: Duration = .zero
    var latencyMax: Duration = .zero
    /// The last return seen, from the round's cmd id.
    var lastSince: Duration = .zero

    mutating func record(bytes: UInt64, latency: Duration, sinceRoundStart: Duration) {
        count += 1
        self.bytes += bytes
        latencySum += latency
        latencyMax = max(latencyMax, latency)
        lastSince = max(lastSince, sinceRoundStart)
    }
}

/// Tunables for hinting.
public struct HintOptions: Sendable {
    /// Ranges asked of the source at a time (one descriptor each).
    public var batchRanges = 64
    /// Most ranges (descriptors) in one hint element; QEMU maps at most 1024 per element and
    /// treats more as a device error.
    public var maxRangesPerElement = 256
    /// Longest single hint descriptor. Owned memory behind a hint element is released once
    /// the device has used the element.
    public var maxRangeBytes: UInt64 = 4 << 20
    /// How long a round may wait for the device to return descriptors when the ring is full
    /// before it sends STOP and ends the round (the device keeps its hints; nothing hangs).
    public var fullRingTimeout: Duration = .seconds(2)
    /// A control experiment (`balloond run --hint-control`): take memory from the source
    /// exactly as a real round would (same churn in the guest) but post no hint; each batch
    /// is handed back as if applied. A migration that still goes wrong with this on was not
    /// broken by a hint.
    public var controlNoHints = false
    /// Most hint commands (new ids, STOP, DONE) one `actOnHintCommand` call acts on; the
    /// rest waits for the next interrupt or `serviceHintCommand`.
    public var maxCommandChangesPerCall = 4
    /// A source with a reserve (`FreePageSource.replenishReserve`) is topped up between rounds:
    /// again after this long while each call still takes memory…
    public var reserveStepInterval: Duration = .seconds(1)
    /// …after this long when a call could take nothing, doubling while they stay stuck up to
    /// `reserveMaxRetryInterval` (each stuck pass reads the candidate blocks' page flags)…
    public var reserveRetryInterval: Duration = .seconds(60)
    public var reserveMaxRetryInterval: Duration = .seconds(600)
    /// …and not before this long after memory pressure made it give memory back.
    public var reserveAfterPressure: Duration = .seconds(60)
    public init() {}

    /// The longest descriptor a round posts for `source`: the longer of `maxRangeBytes` and
    /// the source's own unit (`FreePageSource.preferredMaxRangeBytes`). Fewer, longer
    /// descriptors where the source gives memory back in larger units: QEMU applies each
    /// under its migration bitmap lock, which its sender holds for up to 50 ms.
    public func maxRangeBytes(for source: any FreePageSource) -> UInt64 {
        max(maxRangeBytes, source.preferredMaxRangeBytes ?? 0)
    }
}

extension BalloonDriver {
    /// Reacts to the cached cmd id (Linux `report_free_page_func`): DONE releases
    /// everything; a new round id starts a round; STOP ends the active one.
    ///
    /// Bounded: a round can end because a new id arrived mid-round, so this acts again until
    /// the command it acted on is the current one, but on at most
    /// `hintOptions.maxCommandChangesPerCall` commands per call, and not at all once
    /// `shouldStop` says so. What is left is `hintCommandPending`, for the next interrupt or
    /// `serviceHintCommand` (a host that posts a new id on every config interrupt must not
    /// keep one call running forever).
    func actOnHintCommand(line: InterruptLine?) throws(BalloonError) {
        guard negotiated.contains(.freePageHint), let source = hintSource else { return }
        var handled: FreePageHintCommand?
        var acted = 0
        while handled != hintCommand {
            if shouldStop() { return }
            if acted >= max(1, hintOptions.maxCommandChangesPerCall) {
                counters.hintCommandsDeferred += 1
                if counters.hintCommandsDeferred == 1 || counters.hintCommandsDeferred % 100 == 0 {
                    logger.warning("free page hint command changed \(acted) times in one call; leaving \(hintCommand) for the next interrupt or tick", metadata: [
                        "deferred_total": "\(counters.hintCommandsDeferred)",
                    ])
                }
                return
            }
            acted += 1
            let command = hintCommand
            handled = command
            switch command {
            case .done:
                if hinting.activeRound != nil || source.heldBytes > 0 {
                    try finishRound(sendStop: false)
                    source.hintingDone()
                    logger.info("free page hinting done: hinted pages released")
                }
                hinting.activeRound = nil
                // The reserve is topped up again for the next migration (not at once: the
                // migration is still ending).
                armHintReserve(after: hintOptions.reserveStepInterval)
            case .stop:
                if hinting.activeRound != nil, !hinting.stopSent { try finishRound(sendStop: true) }
            case .round(let id):
                guard id != hinting.activeRound else { continue }
                if hinting.activeRound != nil, !hinting.stopSent { try finishRound(sendStop: true) }
                try runRound(id: id, source: source, line: line)
            }
        }
    }

    /// Whether the current hint cmd id still needs acting on (a call to `actOnHintCommand`
    /// stopped early, or the id was read at bring-up with no interrupt to follow). The event
    /// loop then calls `serviceHintCommand` without waiting for an interrupt.
    /// Each case turns false once acted on, so an event loop that polls while this is true
    /// cannot spin.
    public var hintCommandPending: Bool {
        guard isRunning, negotiated.contains(.freePageHint), hintSource != nil, queues[.freePageHint] != nil else { return false }
        switch hintCommand {
        case .done: return hinting.activeRound != nil
        case .stop: return hinting.activeRound != nil && !hinting.stopSent
        case .round(let id): return id != hinting.activeRound
        }
    }

    /// Acts on the current hint cmd id without an interrupt (bounded as `actOnHintCommand`).
    public func serviceHintCommand(line: InterruptLine?) throws(BalloonError) {
        guard isRunning else { throw .notRunning }
        try actOnHintCommand(line: line)
    }

    /// One 4-byte buffer holding `value`, in memory the device has returned (or fresh).
    private func idBuffer(holding value: UInt32) throws(BalloonError) -> (Int, DMARegion) {
        let i: Int
        if let free = hinting.idBufferInFlight.firstIndex(of: false) {
            i = free
        } else {
            do { hinting.idBuffers.append(try allocator.allocate(byteCount: 4, alignment: 4)) } catch { throw .dma(error) }
            hinting.idBufferInFlight.append(false)
            i = hinting.idBuffers.count - 1
        }
        hinting.idBuffers[i].store32(value, at: 0)
        return (i, hinting.idBuffers[i])
    }

    private func postID(_ value: UInt32, queue q: SplitQueue<BufferToken>) throws(BalloonError) {
        let (i, buffer) = try idBuffer(holding: value)
        do {
            try q.add(readable: [GuestPhysicalRange(start: buffer.physicalAddress, length: 4)], token: .hintID(i))
        } catch { throw .queue(role: .freePageHint, error) }
        hinting.idBufferInFlight[i] = true
        try kick(.freePageHint)
    }

    /// A hint element came back: QEMU has applied its ranges (or ignored them); owned memory
    /// behind them may be given back.
    func hintUsed(_ ranges: [GuestPhysicalRange], round: UInt32) {
        if round == hinting.activeRound, let first = ranges.first {
            hinting.outstandingElements -= 1
            if let posted = hinting.postedAt.removeValue(forKey: first.start.value) {
                let now = clock.now()
                let bytes = ranges.reduce(UInt64(0)) { $0 + $1.length }
                hinting.applied.record(bytes: bytes, latency: now - posted, sinceRoundStart: now - hinting.roundStart)
                logger.trace("hint used", metadata: ["ranges": "\(ranges.count)", "mib": "\(bytes >> 20)",
                                                     "low_mib": "\((ranges.map(\.start.value).min() ?? 0) >> 20)",
                                                     "high_mib": "\((ranges.map { $0.start.value + $0.length }.max() ?? 0) >> 20)",
                                                     "posted_ms": "\((posted - hinting.roundStart).whole(.milliseconds(1)))",
                                                     "used_ms": "\((now - hinting.roundStart).whole(.milliseconds(1)))"])
            }
            if hinting.outstandingElements == 0, hinting.stopSent { logApplied(round: round) }
        }
        hintSource?.hintsApplied(ranges)
    }

    /// Once every hint of a finished round is back: how quickly QEMU applied them.
    private func logApplied(round: UInt32) {
        let a = hinting.applied
        guard a.count > 0 else { return }
        counters.lastRoundAppliedMicros = a.lastSince.whole(.microseconds(1))
        logger.info("free page hints applied", metadata: [
            "round": "0x\(String(round, radix: 16))", "hints": "\(a.count)", "mib": "\(a.bytes >> 20)",
            "last_ms": "\(a.lastSince.whole(.milliseconds(1)))",
            "latency_mean_ms": "\((a.latencySum / a.count).whole(.milliseconds(1)))",
            "latency_max_ms": "\(a.latencyMax.whole(.milliseconds(1)))",
        ])
    }

    /// Streams one round: START with the id, then the source's free ranges, until the source
    /// runs dry (then STOP) or the device moves on (new id, STOP, DONE). One ring slot is
    /// always kept free for the STOP buffer.
    ///
    /// Ranges leave as **hint elements**: one buffer whose chain of writable descriptors holds
    /// every range gathered since the last element left. A new element is posted once the
    /// device has used every earlier one (or the chain is full, or the source ran dry), and
    /// meanwhile the source goes on producing. Why: QEMU applies each range under its migration
    /// bitmap lock, which the sender holds for up to 50 ms at a time, and its iothread gets
    /// the lock about once per such window for each element, but keeps it for all of one
    /// element's ranges. Measured on QEMU 10.0 (4 GiB, one range per element): the first
    /// elements applied 55 ms after the cmd id, then one every 52 ms, so most of a round's
    /// ranges were applied only when the live phase ended. One element per window carries
    /// everything found by then.
    private func runRound(id: UInt32, source: FreePageSource, line: InterruptLine?) throws(BalloonError) {
        guard let q = queues[.freePageHint] else { return }
        let start = clock.now()
        try processUsed()
        hinting.activeRound = id
        hinting.stopSent = false
        hinting.outstandingElements = 0
        hinting.firstHintPosted = false
        hinting.roundBytes = 0
        hinting.roundStart = start
        hinting.postedAt = [:]
        hinting.applied = AppliedHints()
        counters.hintRounds += 1
        try postID(id, queue: q)
        do {
            try source.beginRound(id: id)
        } catch {
            logger.warning("free page source \(source.name) cannot start round 0x\(String(id, radix: 16)): \(error)")
            try finishRound(sendStop: true)
            return
        }
        var fullSince: Duration?
        let budget = elementVectors
        let maxRangeBytes = budget.longestRange(hintOptions.maxRangeBytes(for: source))
        let maxChain = max(1, hintOptions.maxRangesPerElement)
        var gathered: [GuestPhysicalRange] = []
        var gatheredVectors = 0
        var loggedTooLong = false
        var sourceDry = false
        while hintCommand == .round(id) && isRunning {
            if shouldStop() {
                logger.info("stop requested: ending free page hint round 0x\(String(id, radix: 16))")
                break
            }
            // Room for more ranges: the ring keeps one slot for STOP and the gathered chain
            // needs one descriptor per range.
            // An element is full at `maxChain` descriptors or at QEMU's I/O vectors per
            // element (through an IOMMU, one per IOMMU page): what is gathered beyond that
            // leaves in further elements at once.
            let room = min(q.freeDescriptors - 1 - gathered.count, maxChain - gathered.count)
            let elementFull = room <= 0 || gatheredVectors >= ElementVectorBudget.maxPerElement
            if !gathered.isEmpty && (hinting.outstandingElements == 0 || sourceDry || elementFull) {
                let n = budget.prefixFitting(gathered, maxRanges: maxChain)
                try postElement(Array(gathered.prefix(n)), round: id, queue: q)
                gathered.removeFirst(n)
                gatheredVectors = budget.vectors(gathered)
                try pollDuringRound(line: line, wait: .zero)
                continue
            }
            if sourceDry { break }
            if room <= 0 {
                // The device has not returned enough descriptors yet; QEMU's iothread polls
                // the queue during START, so wait briefly, watching for STOP/DONE meanwhile.
                let now = clock.now()
                if fullSince == nil { fullSince = now }
                if now - fullSince! > hintOptions.fullRingTimeout {
                    counters.hintRoundsTimedOut += 1
                    logger.warning("hint ring stayed full for \(hintOptions.fullRingTimeout.whole(.milliseconds(1))) ms; ending round 0x\(String(id, radix: 16))")
                    break
                }
                try pollDuringRound(line: line, wait: .milliseconds(1))
                continue
            }
            fullSince = nil
            let batch: [GuestPhysicalRange]
            do {
                batch = try source.nextBatch(maxRanges: min(room, hintOptions.batchRanges), maxRangeBytes: maxRangeBytes)
            } catch {
                logger.warning("free page source \(source.name) failed mid-round: \(error)")
                break
            }
            if batch.isEmpty {
                sourceDry = true
                continue
            }
            if hintOptions.controlNoHints {
                hinting.roundBytes += batch.reduce(0) { $0 + $1.length }
                source.hintsApplied(batch)
                try pollDuringRound(line: line, wait: .zero)
                continue
            }
            for range in batch {
                precondition(range.start.value % balloonPageSize == 0 && range.length % balloonPageSize == 0 && range.length > 0,
                             "free page source returned an unaligned range")
            }
            // A range longer than asked could need more I/O vectors than an element may have;
            // it goes back unhinted (the sources split at `maxRangeBytes`, so this is a bug).
            let tooLong = batch.filter { $0.length > maxRangeBytes }
            if !tooLong.isEmpty {
                if !loggedTooLong {
                    loggedTooLong = true
                    logger.error("free page source \(source.name) returned ranges longer than the \(maxRangeBytes) bytes asked; not hinting them (logged once per round)")
                }
                source.hintsApplied(tooLong)
            }
            let fitting = tooLong.isEmpty ? batch : batch.filter { $0.length <= maxRangeBytes }
            gathered += fitting
            gatheredVectors += budget.vectors(fitting)
            // Nothing out: the loop's top posts this batch at once (the first hints of a round
            // most of all); otherwise look for elements the device has used meanwhile.
            if hinting.outstandingElements > 0 { try pollDuringRound(line: line, wait: .zero) }
        }
        // Linux sends the STOP id after its loop whatever ended it; with a new id QEMU is in
        // REQUESTED and ignores it, with DONE it is ignored too. Ranges gathered but not posted
        // were never given to the device: the source takes them back as applied (nothing
        // refers to them).
        if !gathered.isEmpty { source.hintsApplied(gathered) }
        if hintCommand != .done { try finishRound(sendStop: true) } else { try finishRound(sendStop: false) }
    }

    /// Posts one hint element: a chain of writable descriptors, one per range, and kicks.
    private func postElement(_ ranges: [GuestPhysicalRange], round id: UInt32, queue q: SplitQueue<BufferToken>) throws(BalloonError) {
        do { try q.add(writable: ranges, token: .hint(ranges, round: id)) } catch { throw .queue(role: .freePageHint, error) }
        hinting.postedAt[ranges[0].start.value] = clock.now()
        hinting.outstandingElements += 1
        let bytes = ranges.reduce(UInt64(0)) { $0 + $1.length }
        hinting.roundBytes += bytes
        counters.hintsSent += ranges.count
        counters.bytesHinted += bytes
        try kick(.freePageHint)
        if !hinting.firstHintPosted {
            hinting.firstHintPosted = true
            counters.lastRoundFirstHintMicros = (clock.now() - hinting.roundStart).whole(.microseconds(1))
        }
    }

    /// Mid-round: take used hints, and service a pending interrupt (a config change may
    /// carry STOP, DONE or a new id; the stats queue may want a refill).
    private func pollDuringRound(line: InterruptLine?, wait: Duration) throws(BalloonError) {
        try processUsed()
        guard let line else { return }
        let fired: Bool
        do { fired = try line.wait(timeoutMilliseconds: Int(wait.roundedUp(to: .milliseconds(1)))) } catch { throw .transport(error) }
        if fired { try handleInterruptCauses(line: line) }
    }

    /// Ends the active round: sends the STOP id when asked (Linux always does after its
    /// loop), tells the source, and records timing.
    private func finishRound(sendStop: Bool) throws(BalloonError) {
        guard let round = hinting.activeRound else { return }
        // DONE after STOP finishes the same round again: keep STOP's timing.
        let firstFinish = !hinting.stopSent
        if sendStop, !hinting.stopSent, let q = queues[.freePageHint], isRunning {
            try postID(FreePageHintCommand.stopID, queue: q)
        }
        hinting.stopSent = true
        hintSource?.endRound()
        guard firstFinish else { return }
        counters.lastRoundStopMicros = (clock.now() - hinting.roundStart).whole(.microseconds(1))
        counters.lastRoundBytes = hinting.roundBytes
        logger.info("free page hint round ended", metadata: [
            "round": "0x\(String(round, radix: 16))", "hinted_mib": "\(hinting.roundBytes >> 20)",
            "first_hint_us": "\(counters.lastRoundFirstHintMicros.map(String.init) ?? "-")",
            "stop_us": "\(counters.lastRoundStopMicros ?? 0)",
        ])
        if hinting.outstandingElements == 0 { logApplied(round: round) }
    }

    /// Tops up the hint source's reserve when due (`tick`): between rounds only, each call a
    /// bounded amount of work, then again after `reserveStepInterval` while it grows, after
    /// `reserveRetryInterval` (doubling) when it could take nothing, and not at all once full (DONE, a
    /// bring-up or memory pressure arm it again).
    func replenishHintReserveIfDue() {
        guard let due = hinting.reserveNextPass, let source = hintSource, negotiated.contains(.freePageHint) else { return }
        let now = clock.now()
        guard now >= due else { return }
        if hintRoundOpen {
            hinting.reserveNextPass = now + hintOptions.reserveStepInterval
            return
        }
        switch source.replenishReserve() {
        case .notWanted, .full:
            hinting.reserveNextPass = nil
            hinting.reserveRetry = nil
        case .grew:
            hinting.reserveNextPass = clock.now() + hintOptions.reserveStepInterval
            hinting.reserveRetry = nil
        case .stuck:
            var retry = hinting.reserveRetry ?? Backoff(first: hintOptions.reserveRetryInterval, cap: hintOptions.reserveMaxRetryInterval)
            hinting.reserveNextPass = clock.now() + retry.next()
            hinting.reserveRetry = retry
        }
    }

    /// The host wants memory back (an inflate): a hint reserve only makes a future migration
    /// cheaper, so it gives way first, as it does under memory pressure, and refills no sooner
    /// than `reserveAfterPressure` later (from what the guest has left then). Not during a
    /// round: its blocks may be hinted right now.
    func yieldHintReserve(toInflatePages pages: Int) {
        guard pages > 0, let source = hintSource, source.reserveTargetBytes > 0, source.heldBytes > 0, !hintRoundOpen else { return }
        let freed = source.releaseUnderPressure(bytes: UInt64(pages) * balloonPageSize)
        guard freed > 0 else { return }
        counters.inflateHintReserveReleases += 1
        armHintReserve(after: hintOptions.reserveAfterPressure)
        logger.notice("inflate: the hint reserve gave way", metadata: [
            "released_mib": "\(freed >> 20)", "still_held_mib": "\(source.heldBytes >> 20)", "inflate_mib": "\(pages >> 8)",
        ])
    }

    /// A round is running: START sent and no STOP yet (its hints may be applied right now).
    private var hintRoundOpen: Bool { hinting.activeRound != nil && !hinting.stopSent }

    /// Schedules a reserve pass `delay` from now, for a source that keeps a reserve (one
    /// without never gets a timed wakeup for it).
    func armHintReserve(after delay: Duration) {
        guard let source = hintSource, source.reserveTargetBytes > 0 else { return }
        hinting.reserveNextPass = clock.now() + delay
        hinting.reserveRetry = nil
    }

    /// After a device reset (or at shutdown): the device holds no buffer any more, so every
    /// hinted page can be given back.
    func abandonHinting() {
        if hinting.activeRound != nil || (hintSource?.heldBytes ?? 0) > 0 {
            hintSource?.endRound()
            hintSource?.releaseAll()
        }
        hinting.activeRound = nil
        hinting.stopSent = false
        hinting.outstandingElements = 0
        // A bring-up that follows starts the reserve over.
        armHintReserve(after: hintOptions.reserveStepInterval)
        for i in hinting.idBufferInFlight.indices { hinting.idBufferInFlight[i] = false }
    }
}
