import VirtioCore
import VirtioPCI
import VirtioQueue

/// A software virtio-balloon PCI function with QEMU 7.2's behaviour (docs/virtio-balloon.md).
///
/// It runs in-process and synchronously: a notify write calls straight into the queue
/// handler, so tests are deterministic and single-threaded. It models the capability layout
/// and BAR4 regions, common config, ISR and config-change interrupts, feature offers by
/// property, QEMU's queue numbering, ring walking with QEMU's checks (a violation sets
/// NEEDS_RESET), inflate/deflate accounting, the stats buffer, the free page hint state
/// machine, reporting, `poison_val`, and the Command register's bus-master coupling.
public final class SimulatedBalloonDevice {
    public let properties: BalloonDeviceProperties
    public var faults = BalloonDeviceFaults()
    public let memory: SimulatedGuestMemory
    public private(set) lazy var configSpace = SimulatedConfigSpace(device: self)
    public private(set) lazy var bar4 = SimulatedBAR4(device: self)

    // MARK: device state

    public private(set) var status = DeviceStatus()
    /// Set by `virtio_error`; cleared by reset.
    public private(set) var broken = false
    /// The last `virtio_error` message.
    public private(set) var lastError: DeviceRingError?
    public private(set) var isr: UInt8 = 0
    public private(set) var generation: UInt8 = 0
    /// Driver features as last written (raw, unmasked, as QEMU reads them back).
    var driverFeatureWords: [UInt32] = [0, 0]
    /// What the device uses: the written value masked by the offer.
    public private(set) var negotiatedFeatures = FeatureBits()
    var deviceFeatureSelect: UInt32 = 0
    var driverFeatureSelect: UInt32 = 0
    var queueSelect: UInt16 = 0
    let queues: [DeviceQueue]
    /// Bus Master (Command bit 2); QEMU treats the device as disabled without it.
    public var busMaster: Bool { configSpace.command & PCIConfig.commandBusMaster != 0 }

    // MARK: balloon state

    /// Target in 4 KiB pages. Survives reset.
    public private(set) var numPages: UInt32 = 0
    /// Pages the driver says are in the balloon. Survives reset.
    public private(set) var actual: UInt32 = 0
    public private(set) var poisonVal: UInt32 = 0
    /// Config writes land in a cached buffer, as in QEMU.
    var configCache: [UInt8] = Array(repeating: 0, count: 16)
    /// PFNs currently inflated (4 KiB units).
    public private(set) var inflatedPFNs: Set<UInt32> = []
    /// Every inflate buffer as received (PFN lists), in order.
    public private(set) var inflateBuffers: [[UInt32]] = []
    /// Every deflate buffer as received.
    public private(set) var deflateBuffers: [[UInt32]] = []
    /// Process inflate/deflate buffers as soon as they are notified (QEMU does, in its main
    /// loop); off: they wait for `drainPFNQueues`.
    public var processPFNsOnNotify = true
    /// Host pages discarded, for a host whose guest RAM is backed by `hostPageSize` pages:
    /// as QEMU's `PartiallyBalloonedPage`, a host page larger than 4 KiB is discarded only when
    /// all its subpages arrive in one inflate element without another host page in between.
    public var hostPageSize: UInt64 = 4096
    public private(set) var discardedHostPages: Set<UInt64> = []
    /// PFNs that were neither RAM nor DMA memory (QEMU skips them: `virtio_balloon_bad_addr`).
    public private(set) var badPFNs: [UInt32] = []

    /// The stats element QEMU holds until it wants fresh stats.
    var heldStats: DeviceElement?
    /// The last stats received, by tag (missing tags read as UInt64.max, as QEMU resets them).
    public private(set) var stats: [UInt16: UInt64] = [:]
    /// How many stats buffers arrived.
    public private(set) var statsUpdates = 0
    /// Stats buffers returned because a second arrived while one was held.
    public private(set) var statsBuffersReturnedEarly = 0

    /// Free page hint state (`FREE_PAGE_HINT_S_*`).
    public enum HintState: Equatable, Sendable { case stop, requested, start, done }
    public private(set) var hintState = HintState.stop
    /// QEMU's id counter (`free_page_report_cmd_id`), starting at 0x80000000.
    public private(set) var hintCmdID: UInt32 = 0x8000_0000
    /// Ranges hinted while in START, per round id.
    public private(set) var hintedRanges: [UInt32: [GuestPhysicalRange]] = [:]
    /// Hints that arrived outside START (acked and ignored).
    public private(set) var ignoredHints = 0
    /// OUT ids received on the hint queue, in order.
    public private(set) var receivedHintIDs: [UInt32] = []
    /// Called after each hint element is processed (tests use it to move the state machine
    /// mid-round, e.g. STOP while hints are queued).
    public var onHintElement: ((SimulatedBalloonDevice) -> Void)?
    /// While false the hint queue is not processed on notify (QEMU's iothread is slower than
    /// the driver); `drainHintQueue()` processes what is queued.
    public var processHintsOnNotify = true

    /// Ranges reported (free page reporting), in order.
    public private(set) var reportedRanges: [GuestPhysicalRange] = []
    /// Reports skipped because `poison_val != 0`.
    public private(set) var reportsSkippedForPoison = 0

    /// What the driver did, in order (for bring-up order tests).
    public enum Event: Equatable, Sendable {
        case status(DeviceStatus)
        case driverFeatures(FeatureBits)
        case queueEnabled(UInt16, size: UInt16)
        case configWrite(offset: Int, bytes: [UInt8])
        case notify(UInt16)
        case busMaster(Bool)
    }
    public private(set) var events: [Event] = []
    func record(_ e: Event) { events.append(e) }
    /// Forgets the event log (tests look at what follows).
    public func clearEvents() { events = [] }

    /// The PCI Command register at each reset the driver requested (status written 0).
    public private(set) var commandAtResets: [UInt16] = []

    /// What the kernel does when the process holding `/dev/uioN` dies (SIGKILL, OOM kill):
    /// uio_pci_generic's release clears Bus Master. Queue addresses stay programmed.
    public func simulateDriverKilled() {
        let cmd = configSpace.command & ~PCIConfig.commandBusMaster
        try? configSpace.write16(cmd, at: PCIConfig.command)
    }

    /// With `iommuPlatform`: the IOMMU's page size, and the ranges whose memory behind the
    /// IOMMU is contiguous (QEMU maps a descriptor inside one as one I/O vector; everywhere
    /// else one per IOMMU page: scattered pages, the worst case).
    public var iommuPageBytes: UInt64 = 4096
    public var iommuContiguous: [GuestPhysicalRange] = []

    /// Every notify written, by queue.
    public private(set) var notifyCount: [UInt16: Int] = [:]

    public init(properties: BalloonDeviceProperties = BalloonDeviceProperties(), memory: SimulatedGuestMemory? = nil) {
        self.properties = properties
        self.memory = memory ?? SimulatedGuestMemory(ram: GuestPhysicalRange(start: 0, length: properties.ramSize))
        var qs: [DeviceQueue] = [DeviceQueue(index: 0, size: 128), DeviceQueue(index: 1, size: 128), DeviceQueue(index: 2, size: 128)]
        if properties.freePageHint { qs.append(DeviceQueue(index: UInt16(qs.count), size: 1024)) }
        if properties.freePageReporting { qs.append(DeviceQueue(index: UInt16(qs.count), size: 32)) }
        queues = qs
    }

    /// The queue indices as QEMU created them.
    public var queueIndices: BalloonQueueIndices { BalloonQueueIndices(offered: properties.offeredFeatures) }

    /// A transport over this device's registers, exactly as balloond builds one over a real BAR4.
    public func makeTransport() throws(TransportError) -> ModernPCITransport {
        try ModernPCITransport(config: configSpace, barSizes: configSpace.barSizes, mapBAR: { (bar) throws(PCIError) -> MMIORegion in
            guard bar == 4 else { throw PCIError.bar(index: bar, reason: PCIAccessProblem.notMapped) }  // only BAR4
            return self.bar4
        }, pause: { _ in })  // the simulated device acts at once: no time passes between polls
    }

    /// A DMA allocator whose memory this device can reach.
    public func makeDMAAllocator() -> HeapDMAAllocator { HeapDMAAllocator(memory: memory) }

    /// A uio-like interrupt line for this device.
    public func makeInterruptLine() -> SimulatedInterruptLine { SimulatedInterruptLine(device: self) }

    // MARK: errors and interrupts

    /// `virtio_error`: the device is broken; with VERSION_1, NEEDS_RESET and a config interrupt.
    func virtioError(_ error: DeviceRingError) {
        broken = true
        lastError = error
        if negotiatedFeatures.contains(.version1) {
            status.insert(.needsReset)
            notifyConfig(force: true)
        }
    }

    /// `virtio_notify_config`: nothing unless DRIVER_OK; then ISR |= 3 and generation++.
    func notifyConfig(force: Bool = false) {
        guard status.contains(.driverOK) else { return }
        generation &+= 1
        if busMaster || force { isr |= 3 }
    }

    func notifyQueue() {
        guard busMaster, !broken else { return }
        isr |= 1
    }

    /// INTx level: ISR bit 0 (or any ISR bit after a config change), unless INTx is disabled.
    public var interruptAsserted: Bool { isr != 0 && configSpace.command & PCIConfig.commandINTxDisable == 0 }

    func readISR() -> UInt8 {
        let v = isr
        isr = 0
        if v & 2 != 0, faults.newHintRoundOnConfigInterrupt > 0, negotiatedFeatures.contains(.freePageHint) {
            faults.newHintRoundOnConfigInterrupt -= 1
            startHintRound()
        }
        return v
    }

    /// `config_generation` as the driver reads it.
    func readGeneration() -> UInt8 {
        if faults.unstableGenerationReads > 0 {
            faults.unstableGenerationReads -= 1
            generation &+= 1
        }
        return generation
    }

    // MARK: status

    func writeStatus(_ value: UInt8) {
        record(.status(DeviceStatus(rawValue: value)))
        if value == 0 {
            commandAtResets.append(configSpace.command)
            if faults.neverResets { return }
            reset()
            return
        }
        var new = DeviceStatus(rawValue: value)
        if new.contains(.featuresOK) && !status.contains(.featuresOK) {
            let written = FeatureBits(low: driverFeatureWords[0], high: driverFeatureWords[1])
            record(.driverFeatures(written))
            negotiatedFeatures = written.intersection(properties.offeredFeatures)
            if faults.rejectFeaturesOK { new.remove(.featuresOK) }
        }
        if broken { new.insert(.needsReset) }
        let becameReady = new.contains(.driverOK) && !status.contains(.driverOK)
        status = new
        if becameReady, faults.needsResetAfterDriverOK {
            virtioError(.injectedNeedsReset)
            return
        }
        if becameReady, heldStats == nil, queues[2].inflight > 0 {
            // virtio_balloon_set_status: with no element held (it was dropped while the VM
            // was stopped or migrated) rewind the last popped one and receive it again.
            queues[2].unpop()
            processStats()
        }
    }

    /// Sets status without the FEATURES_OK / reset side effects (bus-master coupling).
    func writeStatusDirect(_ s: DeviceStatus) { status = s }

    /// Device reset: queues, features, ISR and status cleared; `num_pages` and `actual` kept.
    func reset() {
        status = []
        broken = false
        isr = 0
        driverFeatureWords = [0, 0]
        negotiatedFeatures = []
        deviceFeatureSelect = 0
        driverFeatureSelect = 0
        queueSelect = 0
        for q in queues { q.reset() }
        heldStats = nil
        poisonVal = 0
        if hintState != .done { hintState = .stop }
    }

    // MARK: host-side controls (what QMP and migration do)

    /// QMP `balloon value=<bytes>`: sets `num_pages` and raises a config interrupt.
    public func setTarget(bytes: UInt64) {
        let target = min(bytes, properties.ramSize)
        numPages = UInt32((properties.ramSize - target) >> 12)
        notifyConfig()
    }

    /// `query-balloon`'s `actual`: bytes left to the guest.
    public var guestMemoryBytes: UInt64 { properties.ramSize - UInt64(actual) * 4096 }

    /// PRECOPY_NOTIFY_AFTER_BITMAP_SYNC with the VM running: a new round id, REQUESTED.
    /// Does nothing unless FREE_PAGE_HINT was negotiated.
    public func startHintRound() {
        guard negotiatedFeatures.contains(.freePageHint) else { return }
        hintCmdID = hintCmdID == UInt32.max ? 0x8000_0000 : hintCmdID + 1
        hintState = .requested
        notifyConfig()
    }

    /// PRECOPY_NOTIFY_BEFORE_BITMAP_SYNC: STOP (if not already).
    public func stopHintRound() {
        guard negotiatedFeatures.contains(.freePageHint), hintState != .stop else { return }
        hintState = .stop
        notifyConfig()
    }

    /// PRECOPY_NOTIFY_CLEANUP (or the final sync): DONE.
    public func finishHinting() {
        guard negotiatedFeatures.contains(.freePageHint), hintState != .done else { return }
        hintState = .done
        notifyConfig()
    }

    /// QEMU's stats timer firing: returns the held stats buffer so the driver refills it.
    public func requestStats() {
        guard let held = heldStats else { return }
        heldStats = nil
        push(queue: 2, head: held.head)
    }

    // MARK: device config

    func configValue(at offset: Int) -> UInt32 {
        switch offset {
        case BalloonConfigLayout.numPages: return numPages
        case BalloonConfigLayout.actual: return actual
        case BalloonConfigLayout.freePageHintCmdID:
            if let forced = faults.forcedCmdID { return forced }
            switch hintState {
            case .requested: return hintCmdID
            case .stop, .start: return FreePageHintCommand.stopID
            case .done: return FreePageHintCommand.doneID
            }
        case BalloonConfigLayout.poisonVal: return poisonVal
        default: return 0
        }
    }

    /// `get_config` refreshes the whole buffer; bytes at or past the config size read 0xff.
    func readConfigByte(_ offset: Int) -> UInt8 {
        guard offset >= 0, offset < properties.configSize else { return 0xff }
        let word = configValue(at: offset & ~3)
        return UInt8(truncatingIfNeeded: word >> (8 * UInt32(offset & 3)))
    }

    func writeConfig(bytes: [UInt8], at offset: Int) {
        record(.configWrite(offset: offset, bytes: bytes))
        guard offset >= 0, offset + bytes.count <= properties.configSize else { return }
        // Refresh the cache from device state, merge the write, then apply set_config.
        for w in stride(from: 0, to: 16, by: 4) {
            let v = configValue(at: w)
            for b in 0..<4 { configCache[w + b] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(b))) }
        }
        for (i, b) in bytes.enumerated() { configCache[offset + i] = b }
        func word(_ o: Int) -> UInt32 { (0..<4).reduce(UInt32(0)) { $0 | UInt32(configCache[o + $1]) << (8 * UInt32($1)) } }
        actual = word(BalloonConfigLayout.actual)
        poisonVal = 0
        if negotiatedFeatures.contains(.pagePoison) { poisonVal = word(BalloonConfigLayout.poisonVal) }
    }

    // MARK: queues

    func queue(_ index: UInt16) -> DeviceQueue? { Int(index) < queues.count ? queues[Int(index)] : nil }

    func queueSizeRead(_ index: UInt16) -> UInt16 {
        guard let q = queue(index), !faults.zeroSizedQueues.contains(index) else { return 0 }
        return q.size
    }

    var numQueues: UInt16 {
        var highest = -1
        for q in queues where !faults.zeroSizedQueues.contains(q.index) && q.size != 0 { highest = Int(q.index) }
        return UInt16(highest + 1)
    }

    func push(queue index: UInt16, head: UInt16, length: UInt32 = 0) {
        guard let q = queue(index) else { return }
        let id = faults.corruptNextUsedID.removeValue(forKey: index) ?? UInt32(head)
        let jump = faults.jumpNextUsedIndex.removeValue(forKey: index) ?? 0
        let len = faults.corruptNextUsedLength.removeValue(forKey: index) ?? length
        do {
            try q.push(memory, head: id, length: len, extraIndexAdvance: jump)
        } catch {
            virtioError(error)
            return
        }
        notifyQueue()
    }

    /// A notify write for queue `index` (`virtio_queue_notify`).
    func notify(queue index: UInt16) {
        notifyCount[index, default: 0] += 1
        record(.notify(index))
        guard !faults.ignoreNotifications, !broken, busMaster, let q = queue(index), q.enabled else { return }
        let idx = queueIndices
        switch index {
        case idx.inflate: if processPFNsOnNotify { processPFNQueue(q, inflate: true) }
        case idx.deflate: if processPFNsOnNotify { processPFNQueue(q, inflate: false) }
        case idx.stats: processStats()
        case idx.freePageHint: if processHintsOnNotify { drainHintQueue() }
        case idx.reporting: processReports(q)
        default: break
        }
    }

    private func popAll(_ q: DeviceQueue, _ body: (DeviceElement) -> Void) {
        var unlimited = Int.max
        popAll(q, limit: &unlimited, body)
    }

    private func popAll(_ q: DeviceQueue, limit: inout Int, _ body: (DeviceElement) -> Void) {
        while limit > 0 {
            limit -= 1
            let element: DeviceElement?
            do { element = try q.pop(memory, iommuPageBytes: negotiatedFeatures.contains(.accessPlatform) ? iommuPageBytes : nil, contiguous: iommuContiguous) } catch {
                virtioError(error)
                return
            }
            guard let element else { return }
            body(element)
            if broken { return }
        }
    }

    private func readPFNs(_ ranges: [GuestPhysicalRange]) -> [UInt32]? {
        var pfns: [UInt32] = []
        for r in ranges {
            guard let bytes = memory.read(r.start, count: Int(r.length)) else { return nil }
            var i = 0
            while i + 4 <= bytes.count {
                pfns.append(UInt32(bytes[i]) | UInt32(bytes[i + 1]) << 8 | UInt32(bytes[i + 2]) << 16 | UInt32(bytes[i + 3]) << 24)
                i += 4
            }
        }
        return pfns
    }

    /// Processes the inflate and deflate queues now (when `processPFNsOnNotify` is off: a
    /// busy main loop).
    public func drainPFNQueues() {
        guard !broken, busMaster else { return }
        if let q = queue(queueIndices.inflate), q.enabled { processPFNQueue(q, inflate: true) }
        if let q = queue(queueIndices.deflate), q.enabled { processPFNQueue(q, inflate: false) }
    }

    private func processPFNQueue(_ q: DeviceQueue, inflate: Bool) {
        popAll(q) { element in
            guard let pfns = readPFNs(element.readable) else {
                virtioError(.bogusDescriptor)
                return
            }
            for pfn in pfns {
                let address = PhysicalAddress(UInt64(pfn) << 12)
                guard memory.isMappable(address, length: 4096) else {
                    badPFNs.append(pfn)
                    continue
                }
                if inflate { inflatedPFNs.insert(pfn) } else { inflatedPFNs.remove(pfn) }
            }
            if inflate { discardHostPages(pfns) }
            if inflate { inflateBuffers.append(pfns) } else { deflateBuffers.append(pfns) }
            push(queue: q.index, head: element.head)
        }
    }

    private func discardHostPages(_ pfns: [UInt32]) {
        let sub = Int(hostPageSize / 4096)
        guard sub > 1 else {
            for p in pfns { discardedHostPages.insert(UInt64(p) << 12) }
            return
        }
        var current: UInt64?
        var seen = Set<UInt32>()
        for p in pfns {
            let host = (UInt64(p) << 12) & ~(hostPageSize - 1)
            if host != current {
                current = host
                seen = []
            }
            seen.insert(p)
            if seen.count == sub { discardedHostPages.insert(host) }
        }
    }

    /// `virtio_balloon_receive_stats`: hold the buffer, parse 10-byte `{le16 tag, le64 val}`.
    private func processStats() {
        let q = queues[2]
        popAll(q) { element in
            if let old = heldStats {
                // "should never happen": a second buffer while one is held; return the old one.
                statsBuffersReturnedEarly += 1
                heldStats = nil
                push(queue: 2, head: old.head)
            }
            var parsed: [UInt16: UInt64] = [:]
            var bytes: [UInt8] = []
            for r in element.readable {
                guard let b = memory.read(r.start, count: Int(r.length)) else {
                    virtioError(.bogusDescriptor)
                    return
                }
                bytes += b
            }
            var i = 0
            while i + 10 <= bytes.count {
                let tag = UInt16(bytes[i]) | UInt16(bytes[i + 1]) << 8
                var val: UInt64 = 0
                for k in 0..<8 { val |= UInt64(bytes[i + 2 + k]) << (8 * UInt64(k)) }
                if tag < properties.qemuVersion.statTagCount { parsed[tag] = val }
                i += 10
            }
            stats = parsed
            statsUpdates += 1
            heldStats = element
        }
    }

    /// The free page hint queue (`get_free_page_hints`), processed until empty.
    public func drainHintQueue() { drainHintQueueOnce(limit: Int.max) }

    /// Processes at most `limit` hint-queue elements (a slow iothread).
    public func drainHintQueueOnce(limit: Int) {
        guard let index = queueIndices.freePageHint, let q = queue(index), q.enabled, !broken, busMaster else { return }
        var remaining = limit
        popAll(q, limit: &remaining) { element in
            if !element.readable.isEmpty {
                let first = element.readable[0]
                guard first.length >= 4, let bytes = memory.read(first.start, count: 4) else {
                    virtioError(.incorrectCommandID)
                    return
                }
                let id = UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24
                receivedHintIDs.append(id)
                if hintState == .requested && id == hintCmdID {
                    hintState = .start
                } else if hintState == .start {
                    hintState = .stop
                }
            }
            if !element.writable.isEmpty {
                if hintState == .start {
                    hintedRanges[hintCmdID, default: []].append(contentsOf: element.writable)
                } else {
                    ignoredHints += 1
                }
            }
            push(queue: index, head: element.head)
            onHintElement?(self)
        }
    }

    private func processReports(_ q: DeviceQueue) {
        popAll(q) { element in
            if poisonVal != 0 {
                reportsSkippedForPoison += 1
            } else {
                reportedRanges.append(contentsOf: element.writable)
            }
            push(queue: q.index, head: element.head)
        }
    }

    /// Test view: all hinted ranges of every round.
    public var allHintedRanges: [GuestPhysicalRange] { hintedRanges.keys.sorted().flatMap { hintedRanges[$0]! } }

    /// Test view: whether queue `index` is enabled on the device side.
    public func isQueueEnabled(_ index: UInt16) -> Bool { queue(index)?.enabled ?? false }
    /// Test view: the size the driver programmed.
    public func programmedQueueSize(_ index: UInt16) -> UInt16? { queue(index).map(\.size) }
    /// Test view: whether a stats buffer is held.
    public var holdsStatsBuffer: Bool { heldStats != nil }
}
