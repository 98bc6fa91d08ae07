import BalloonBlocks
import FreePages
import VirtioCore
import VirtioQueue

/// Tunables for inflating and deflating (docs/virtio-balloon.md §4).
public struct BalloonSizingOptions: Sendable {
    /// Most PFNs per inflate/deflate buffer. A multiple of 512, so every 2 MiB block's 512
    /// PFNs travel in one buffer (QEMU discards a 2 MiB host page only when all its subpages
    /// arrive in one element; Linux's 256-PFN buffers never free anything there).
    public var pagesPerBuffer = 8192
    /// Buffers in flight per queue: memory is taken for the next while QEMU discards the last.
    public var buffersInFlight = 3
    /// Pages taken from the guest per step (keeps the event loop responsive).
    public var takeStepPages = 4096
    /// First and longest wait before retrying a target that could not be reached (the wait
    /// doubles while retries fall short; a smaller `retryMax` means `retryInitial`).
    public var retryInitial: Duration = .seconds(1)
    public var retryMax: Duration = .seconds(30)

    public init() {}
}

/// Driver-side state of the balloon's size.
/// A PFN buffer in flight: an inflate holds its blocks until the device acknowledges them;
/// a deflate has already given its blocks back and only counts its pages (so inflating
/// waits until the host has seen the deflate).
enum PFNBufferUse {
    case inflate([BalloonBlock])
    case deflate(pages: Int)
}

struct SizingState {
    /// Acknowledged inflated blocks (the balloon), oldest first.
    var inflated: [BalloonBlock] = []
    var inflatedPages = 0
    /// PFN buffers, each either free or carrying blocks to the device.
    var buffers: [DMARegion] = []
    /// What each PFN buffer carries while the device has it (nil: free).
    var bufferUse: [PFNBufferUse?] = []
    var inflatingPages = 0
    var deflatingPages = 0
    /// Not before this time (on the driver's clock) try to inflate again after a shortfall.
    var retryAt: Duration?
    /// The wait before that retry: `retryInitial` doubling up to `retryMax`, starting over
    /// once the balloon is at the size it aims for.
    var retry: Backoff
    var shortfallLogged = false
    /// Why the last inflate step fell short.
    var lastShortfall: String?
    /// When `num_pages` last changed (on the driver's clock), until the balloon got there.
    var targetChangedAt: Duration?
    /// Acknowledged blocks a deflate must still send because another block of their group
    /// went (`BalloonMemory.releaseGroup`): out of `inflated`, still counted in `inflatedPages`.
    var deflateCarry: [BalloonBlock] = []
    var deflateCarryPages: Int { deflateCarry.reduce(0) { $0 + $1.pageCount } }
}

extension BalloonDriver {
    /// PFNs per inflate/deflate buffer: `pagesPerBuffer`, fewer when the DMA allocator cannot
    /// hand out that much in one piece (single 4 KiB pages without hugepages: 1024), always
    /// whole 2 MiB blocks (512 PFNs, 2 KiB). 0 when not even one block's PFNs fit.
    var pfnsPerBuffer: Int {
        let fit = min(options.sizing.pagesPerBuffer, allocator.largestAllocation / 4)
        return fit / balloonPagesPerHugeBlock * balloonPagesPerHugeBlock
    }

    /// Pages committed to the balloon once the buffers in flight are acknowledged (a deflate
    /// takes its pages out of `inflatedPages` when it is posted).
    var committedPages: Int { sizing.inflatedPages + sizing.inflatingPages }

    /// The size the balloon aims for now: the host's target, capped while memory pressure
    /// holds it smaller (deflate on OOM).
    var effectiveTargetPages: Int {
        var t = Int(targetPages)
        if let cap = pressure.ceilingPages, let until = pressure.holdUntil, clock.now() < until { t = min(t, cap) }
        return t
    }

    /// Moves the balloon towards its target (Linux `update_balloon_size_func`): inflates by
    /// taking memory and sending its PFNs, deflates by sending PFNs and releasing the memory
    /// at once (MUST_TELL_HOST is never negotiated). Never blocks on the device: buffers in
    /// flight are finished by `processUsed`, which calls this again.
    public func adjustBalloonSize() throws(BalloonError) {
        guard isRunning, let memory = balloonMemory, queues[.inflate] != nil, queues[.deflate] != nil else { return }
        let target = effectiveTargetPages
        if committedPages < target, sizing.deflateCarry.isEmpty {
            if sizing.deflatingPages > 0 { return }  // let the deflate finish first
            if let at = sizing.retryAt, clock.now() < at { return }
            sizing.retryAt = nil
            yieldHintReserve(toInflatePages: target - committedPages)
            guard pfnsPerBuffer > 0 else {
                noteShortfall("the DMA allocator hands out at most \(allocator.largestAllocation) bytes at once, less than the \(balloonPagesPerHugeBlock * 4) bytes one 2 MiB block's PFNs need in one buffer", target: target)
                return
            }
            while committedPages < target, let slot = freePFNBuffer() {
                var want = min(target - committedPages, pfnsPerBuffer)
                var blocks: [BalloonBlock] = []
                var got = 0
                var shortBy: String?
                // Blocks held for free page reporting come first: already discarded on the host.
                let recycled = refusingUnaddressable(takeReportedForInflate(maxPages: want), from: memory)
                blocks += recycled
                got += recycled.reduce(0) { $0 + $1.pageCount }
                var plan = target - committedPages - got
                if let floor = reinflateFloorPages() {
                    if want - got > floor {
                        shortBy = "memory pressure earlier: re-inflating only while MemAvailable stays above \(options.pressure.reinflateAboveAvailableBytes >> 20) MiB"
                        want = got + floor
                    }
                    plan = min(plan, floor)
                }
                // What the rest of this inflate wants, so memory taken in large units (whole
                // offline blocks) is taken only when all of it will be sent.
                memory.planInflate(pages: plan)
                while got < want {
                    let step = min(want - got, options.sizing.takeStepPages)
                    let take: BalloonTake
                    let t0 = clock.now()
                    defer { counters.takeMicroseconds += UInt64(clamping: (clock.now() - t0).whole(.microseconds(1))) }
                    do { take = try memory.take(maxPages: step, hugeOnly: false) } catch {
                        shortBy = "\(memory.name): \(error)"
                        break
                    }
                    // QEMU discards a PFN the moment it sees it: re-check that no frame moved
                    // since it was resolved, and give back any block that did.
                    let (inPlace, movedBlocks) = partition(take.blocks) { memory.stillInPlace($0) }
                    if !movedBlocks.isEmpty {
                        memory.release(movedBlocks)
                        counters.balloonBlocksMoved += movedBlocks.count
                    }
                    // The queues carry 32-bit PFNs: frames at or above 16 TiB are given back.
                    let kept = refusingUnaddressable(inPlace, from: memory)
                    blocks += kept
                    got += kept.reduce(0) { $0 + $1.pageCount }
                    if kept.isEmpty, !inPlace.isEmpty {
                        shortBy = shortBy ?? "\(memory.name) gave only frames at or above 16 TiB, which a 32-bit PFN cannot name"
                        break
                    }
                    if take.pageCount < step || kept.isEmpty {
                        shortBy = shortBy ?? take.limitedBy ?? "\(memory.name) gave \(take.pageCount) of \(step) pages"
                        break
                    }
                }
                if !blocks.isEmpty { try postPFNs(blocks, slot: slot, inflate: true) }
                if let shortBy {
                    noteShortfall(shortBy, target: target)
                    break
                }
            }
        } else if committedPages > target || !sizing.deflateCarry.isEmpty {
            memory.planInflate(pages: 0)
            if sizing.inflatingPages > 0 { return }  // only acknowledged pages may be deflated
            while committedPages - sizing.deflateCarryPages > target || !sizing.deflateCarry.isEmpty, let slot = freePFNBuffer() {
                var chosen: [BalloonBlock] = []
                var chosenPages = 0
                // First what earlier deflates owe their groups.
                takeFromDeflateCarry(into: &chosen, pages: &chosenPages)
                var excess = committedPages - sizing.deflateCarryPages - chosenPages - target
                // Newest first; skip blocks larger than what is left unless nothing fits, so
                // a small excess does not give back a whole 2 MiB block when 4 KiB pages exist.
                var i = sizing.inflated.count - 1
                while sizing.deflateCarry.isEmpty, i >= 0, excess > 0, chosenPages + sizing.inflated[i].pageCount <= pfnsPerBuffer {
                    let b = sizing.inflated[i]
                    if b.pageCount <= excess {
                        chosen.append(b)
                        chosenPages += b.pageCount
                        excess -= b.pageCount
                        sizing.inflated.remove(at: i)
                    }
                    i -= 1
                }
                if chosen.isEmpty, sizing.deflateCarry.isEmpty, let b = sizing.inflated.last {
                    // Only blocks larger than the excess are left: give one back whole; the
                    // next step inflates the difference with smaller pages.
                    chosen = [b]
                    chosenPages = b.pageCount
                    sizing.inflated.removeLast()
                }
                guard !chosen.isEmpty else { break }
                // A block that goes back to the guest only with its group (an offline memory
                // block's pieces) takes the rest of the group along, in this buffer or the next.
                let groups = Set(chosen.compactMap { memory.releaseGroup(of: $0) })
                if !groups.isEmpty {
                    _ = moveGroupsToDeflateCarry(groups, memory: memory)
                    takeFromDeflateCarry(into: &chosen, pages: &chosenPages)
                }
                sizing.inflatedPages -= chosenPages
                try postPFNs(chosen, slot: slot, inflate: false)
            }
        } else {
            memory.planInflate(pages: 0)
            if sizing.inflatingPages == 0, sizing.deflatingPages == 0, case let stranded = Set(memory.strandedGroups()), !stranded.isEmpty {
                // At the target with part of an offline block unused (the inflate ended early:
                // recycled reported blocks, a lowered target, a reset): the guest gets nothing
                // of that block back until the sent part is deflated. Deflate it; the
                // difference (less than a block) comes from page memory.
                let members = moveGroupsToDeflateCarry(stranded, memory: memory)
                if !members.isEmpty {
                    logger.info("deflating the used part of memory blocks the inflate did not use whole, so they can go back to the guest", metadata: [
                        "groups": "\(stranded.count)", "pages": "\(members.reduce(0) { $0 + $1.pageCount })",
                    ])
                    return try adjustBalloonSize()
                }
            }
            if let t = sizing.targetChangedAt, sizing.inflatingPages == 0, sizing.deflatingPages == 0 {
                sizing.targetChangedAt = nil
                counters.lastTargetMilliseconds = (clock.now() - t).whole(.milliseconds(1))
                logger.info("balloon at its target", metadata: ["actual": "\(sizing.inflatedPages)", "ms": "\(counters.lastTargetMilliseconds ?? 0)"])
            }
            sizing.retry.reset()
            if committedPages == Int(targetPages) {
                pressure.ceilingPages = nil
                pressure.reinflateLimited = false
            }
            if sizing.shortfallLogged {
                logger.info("balloon target reached", metadata: ["actual": "\(sizing.inflatedPages)", "num_pages": "\(targetPages)"])
                sizing.shortfallLogged = false
            }
        }
    }

    /// Moves every inflated block of `groups` into the deflate carry; returns them.
    private func moveGroupsToDeflateCarry(_ groups: Set<UInt64>, memory: BalloonMemory) -> [BalloonBlock] {
        let (members, others) = partition(sizing.inflated) { b in memory.releaseGroup(of: b).map(groups.contains) ?? false }
        sizing.inflated = others
        sizing.deflateCarry += members
        return members
    }

    /// Adds blocks from the deflate carry to a deflate buffer's `chosen` while they fit.
    private func takeFromDeflateCarry(into chosen: inout [BalloonBlock], pages chosenPages: inout Int) {
        while let b = sizing.deflateCarry.first, chosenPages + b.pageCount <= pfnsPerBuffer {
            chosen.append(b)
            chosenPages += b.pageCount
            sizing.deflateCarry.removeFirst()
        }
    }

    /// After a pressure deflate (DEFLATE_ON_OOM), how many more pages inflating may take:
    /// only what keeps MemAvailable above the re-inflate watermark (nil: no limit).
    private func reinflateFloorPages() -> Int? {
        guard pressure.ceilingPages != nil || pressure.reinflateLimited, negotiated.contains(.deflateOnOOM), let m = memoryStatus?.read() else { return nil }
        let floor = options.pressure.reinflateAboveAvailableBytes
        return m.available > floor ? Int((m.available - floor) / balloonPageSize) : 0
    }

    private func partition(_ blocks: [BalloonBlock], _ keep: (BalloonBlock) -> Bool) -> ([BalloonBlock], [BalloonBlock]) {
        var a: [BalloonBlock] = [], b: [BalloonBlock] = []
        for x in blocks { if keep(x) { a.append(x) } else { b.append(x) } }
        return (a, b)
    }

    /// A target that cannot be reached now: report `actual` honestly, log once per episode,
    /// count it, and retry later with a growing delay (no busy loop; Linux retries every
    /// 200 ms forever).
    private func noteShortfall(_ why: String, target: Int) {
        counters.inflateShortfalls += 1
        sizing.lastShortfall = why
        let wait = sizing.retry.next()
        sizing.retryAt = clock.now() + wait
        if !sizing.shortfallLogged {
            logger.warning("cannot reach the balloon target now; retrying with backoff", metadata: [
                "num_pages": "\(targetPages)", "committed": "\(committedPages)", "aim": "\(target)", "reason": "\(why)",
                "retry_ms": "\(wait.whole(.milliseconds(1)))",
            ])
            sizing.shortfallLogged = true
        }
    }

    private func freePFNBuffer() -> Int? {
        if let i = sizing.bufferUse.firstIndex(where: { $0 == nil }) { return i }
        guard sizing.buffers.count < options.sizing.buffersInFlight, pfnsPerBuffer > 0 else { return nil }
        do {
            sizing.buffers.append(try allocator.allocate(byteCount: pfnsPerBuffer * 4, alignment: 64))
        } catch {
            logger.warning("no DMA memory for another PFN buffer: \(error)")
            return nil
        }
        sizing.bufferUse.append(nil)
        return sizing.buffers.count - 1
    }

    /// Writes the blocks' PFNs (le32) into buffer `slot` and posts it as one chain of one
    /// device-readable descriptor.
    private func postPFNs(_ blocks: [BalloonBlock], slot: Int, inflate: Bool) throws(BalloonError) {
        let role: BalloonQueueRole = inflate ? .inflate : .deflate
        guard let q = queues[role] else { return }
        // Checked conversion only: a truncated PFN would name another frame. Callers have
        // already given such blocks back; this is the last line.
        let blocks = balloonMemory.map { refusingUnaddressable(blocks, from: $0) } ?? blocks.filter(\.pfnsFitIn32Bits)
        let buffer = sizing.buffers[slot]
        var offset = 0
        for block in blocks {
            guard let pfns = block.checkedPFNs else { continue }
            for pfn in pfns {
                buffer.store32(pfn, at: offset)
                offset += 4
            }
        }
        guard offset > 0 else { return }
        precondition(offset <= buffer.size)
        do {
            try q.add(readable: [GuestPhysicalRange(start: buffer.physicalAddress, length: UInt64(offset))], token: inflate ? .inflate(slot) : .deflate(slot))
        } catch { throw .queue(role: role, error) }
        let pages = offset / 4
        if inflate {
            sizing.bufferUse[slot] = .inflate(blocks)
            sizing.inflatingPages += pages
            counters.inflateBuffers += 1
        } else {
            // MUST_TELL_HOST is never negotiated, so the driver may reuse a page before the
            // device has acknowledged its removal (virtio 1.2 §5.5.6.1; docs/virtio-balloon.md
            // §4): the host's deflate only advises (QEMU: MADV_WILLNEED), it never writes or
            // discards the page. Giving the memory back now, not one interrupt later, is what
            // gets it to a guest under sudden pressure in time. The buffer stays the device's
            // until used.
            sizing.bufferUse[slot] = .deflate(pages: pages)
            sizing.deflatingPages += pages
            balloonMemory?.release(blocks)
            counters.pagesDeflated += UInt64(pages)
            counters.deflateBuffers += 1
        }
        try kick(role)
    }

    /// Gives back (and counts, and logs) the blocks whose frames a 32-bit PFN cannot name,
    /// and returns the rest.
    func refusingUnaddressable(_ blocks: [BalloonBlock], from memory: BalloonMemory) -> [BalloonBlock] {
        let (fit, refused) = partition(blocks) { $0.pfnsFitIn32Bits }
        guard !refused.isEmpty else { return blocks }
        memory.release(refused)
        counters.balloonBlocksUnaddressable += refused.count
        let first = refused.first?.ranges.first?.start.value ?? 0
        logger.warning("balloon memory at or above 16 TiB given back: the virtio-balloon PFN is 32 bits and cannot name it", metadata: [
            "blocks": "\(refused.count)", "first_address": "0x\(String(first, radix: 16))", "total": "\(counters.balloonBlocksUnaddressable)",
        ])
        return fit
    }

    /// The device acknowledged a PFN buffer.
    func pfnBufferUsed(slot: Int, inflate: Bool) throws(BalloonError) {
        guard let use = sizing.bufferUse[slot] else { return }
        sizing.bufferUse[slot] = nil
        switch use {
        case .inflate(let blocks):
            let pages = blocks.reduce(0) { $0 + $1.pageCount }
            sizing.inflatingPages -= pages
            sizing.inflated += blocks
            sizing.inflatedPages += pages
            counters.pagesInflated += UInt64(pages)
        case .deflate(let pages):
            sizing.deflatingPages -= pages
        }
        try writeActual()
    }

    /// `actual` = acknowledged inflated pages, as one 32-bit store (docs/virtio-balloon.md §3.3).
    func writeActual() throws(BalloonError) {
        let value = UInt32(clamping: sizing.inflatedPages)
        do { try transport.writeDeviceConfig32(value, at: BalloonConfigLayout.actual) } catch { throw .transport(error) }
        actualPages = value
    }

    /// After a device reset: buffers in flight are gone. Their blocks are given back (the
    /// host may or may not have discarded them; the guest can reuse them either way, since
    /// QEMU does not need to be told, MUST_TELL_HOST is never offered). Acknowledged blocks
    /// stay held: they are still the balloon, and `actual` is rewritten at bring-up.
    func abandonPFNBuffers() {
        // Still acknowledged balloon blocks: back among the inflated ones.
        sizing.inflated += sizing.deflateCarry
        sizing.deflateCarry = []
        for i in sizing.bufferUse.indices {
            if case .inflate(let blocks) = sizing.bufferUse[i] { balloonMemory?.release(blocks) }
            sizing.bufferUse[i] = nil
        }
        sizing.inflatingPages = 0
        sizing.deflatingPages = 0
    }

    /// Shutdown: everything goes back to the guest (after the device reset).
    func releaseBalloon() {
        abandonPFNBuffers()
        balloonMemory?.release(sizing.inflated)
        sizing.inflated = []
        sizing.inflatedPages = 0
        reporting.abandon(memory: balloonMemory)
    }

    /// When `adjustBalloonSize` wants to be called again (a retry after a shortfall).
    var sizingDeadline: Duration? {
        guard committedPages < effectiveTargetPages else { return nil }
        return sizing.retryAt
    }
}
