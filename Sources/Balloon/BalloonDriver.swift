import BalloonBlocks
import FreePages
import Logging
import VirtioCore
import VirtioQueue

/// Everything the balloon driver implements today.
public let balloonImplementedFeatures: FeatureBits = [.statsVQ, .freePageHint, .pagePoison, .deflateOnOOM, .reporting, .version1]

/// Configuration of the driver: what it may negotiate and how.
public struct BalloonDriverOptions: Sendable {
    /// Features balloond implements and may accept (the device's offer is intersected).
    public var wantedFeatures: FeatureBits
    /// What the guest kernel does to freed pages (decides PAGE_POISON and `poison_val`).
    public var poisonPolicy: PagePoisonPolicy
    /// Largest queue size to program (4 KiB-page DMA can hold at most 256 entries per part).
    public var maxQueueSize: UInt16
    /// How long a reset may take.
    public var resetTimeout: Duration
    /// Inflate/deflate, memory pressure and free page reporting policies.
    public var sizing = BalloonSizingOptions()
    public var pressure = PressurePolicy()
    public var reporting = ReportingPolicy()
    /// How the device reaches memory. `.guestPhysical` (uio): descriptors carry guest-physical
    /// addresses and ACCESS_PLATFORM is never accepted. `.iommu` (vfio): every address
    /// balloond gives the device is mapped in the IOMMU at that address (IOVA = GPA), so
    /// ACCESS_PLATFORM is accepted when offered; hint and report ranges then have to be
    /// mapped as well, else those features are left out.
    public var deviceAddressing: DeviceAddressing = .guestPhysical
    /// With ACCESS_PLATFORM: the smallest page the IOMMU maps (vfio's `iova_pgsizes`). QEMU may
    /// need one I/O vector per such page of a descriptor, and maps at most 1024 per element
    /// (`ElementVectorBudget`), so hint and report elements are sized for it.
    public var iommuPageBytes: UInt64 = 4096

    public init(wantedFeatures: FeatureBits = balloonImplementedFeatures,
                poisonPolicy: PagePoisonPolicy = .none, maxQueueSize: UInt16 = 1024, resetTimeout: Duration = .seconds(1)) {
        self.wantedFeatures = wantedFeatures
        self.poisonPolicy = poisonPolicy
        self.maxQueueSize = maxQueueSize
        self.resetTimeout = resetTimeout
    }
}

/// How the device reaches the memory balloond gives it (`BalloonDriverOptions.deviceAddressing`).
public enum DeviceAddressing: Hashable, Sendable {
    /// Descriptors carry guest-physical addresses (uio; no IOMMU in the way).
    case guestPhysical
    /// Descriptors carry IOVAs that balloond mapped at the guest-physical address (vfio).
    /// `hintsMapped`: the hint source maps what it hands out; `reportsMapped`: the balloon
    /// memory maps the blocks it reports.
    case iommu(hintsMapped: Bool, reportsMapped: Bool)
}

/// Counters the driver keeps (shown by `balloond status`).
public struct BalloonCounters: Sendable, Codable, Equatable {
    public var interrupts = 0
    public var configChanges = 0
    public var queueInterrupts = 0
    public var statsBuffersSent = 0
    public var deviceResets = 0
    public var errors = 0
    /// Free page hint rounds started (START sent).
    public var hintRounds = 0
    /// Hint descriptors (ranges) posted, and the bytes they covered.
    public var hintsSent = 0
    public var bytesHinted: UInt64 = 0
    /// Latest round: microseconds from reading the cmd id to posting the first hint, and to STOP.
    public var lastRoundFirstHintMicros: Int64?
    public var lastRoundStopMicros: Int64?
    /// Latest hint round: time from reading the command id to seeing its last hint used.
    public var lastRoundAppliedMicros: Int64?
    public var lastRoundBytes: UInt64 = 0
    /// Rounds ended because the ring stayed full with the device not consuming.
    public var hintRoundsTimedOut = 0
    /// Calls that left a hint command for later because the device kept changing it.
    public var hintCommandsDeferred = 0
    /// Inflate and deflate buffers sent, and pages acknowledged.
    public var inflateBuffers = 0
    public var deflateBuffers = 0
    public var pagesInflated: UInt64 = 0
    public var pagesDeflated: UInt64 = 0
    /// Inflate steps that fell short of the target (the guest could not spare the memory).
    public var inflateShortfalls = 0
    /// Blocks given back before sending because their frames had moved.
    public var balloonBlocksMoved = 0
    /// Blocks given back before sending because a frame was at or above 16 TiB (its PFN
    /// does not fit the queues' 32 bits).
    public var balloonBlocksUnaddressable = 0
    /// Deflates caused by memory pressure.
    public var pressureDeflates = 0
    /// Times memory pressure made the hint source give back memory it held until DONE.
    public var pressureHintReleases = 0
    /// Times an inflate made the hint source's reserve give memory back.
    public var inflateHintReserveReleases = 0
    /// Free page reports sent, and bytes reported.
    public var reportsSent = 0
    public var bytesReported: UInt64 = 0
    /// Milliseconds from the last `num_pages` change to the balloon reaching it.
    public var lastTargetMilliseconds: Int64?
    /// Time spent taking balloon memory from the guest (zeroing dominates under TCG).
    public var takeMicroseconds: UInt64 = 0
    public init() {}
}

/// A snapshot of one queue for status output.
public struct QueueStatus: Sendable, Codable, Equatable {
    public let role: String
    public let index: UInt16
    public let size: UInt16
    public let enabled: Bool
    public let availableIndex: UInt16
    public let usedIndex: UInt16
    public let inFlight: Int
}

/// The whole driver state for status output.
public struct BalloonDriverStatus: Sendable, Codable, Equatable {
    public let deviceStatus: String
    public let offeredFeatures: String
    public let negotiatedFeatures: String
    public let poisonValue: UInt32?
    public let numPages: UInt32
    public let actual: UInt32
    /// Bytes held for the balloon (inflated and in flight) and for free page reporting.
    public let balloonBytes: UInt64
    public let reportedBytes: UInt64
    /// Bytes the hint source holds now (owned sources, during a round until DONE).
    public let hintHeldBytes: UInt64
    public let balloonMemory: String?
    /// Why the target is not reached, when it is not.
    public let shortfall: String?
    public let hintCommand: String
    public let queues: [QueueStatus]
    public let counters: BalloonCounters
}

/// What a queue buffer is for; kept with each posted chain.
enum BufferToken {
    case stats
    /// An inflate or deflate PFN buffer (index into the driver's PFN buffers).
    case inflate(Int)
    case deflate(Int)
    /// A START or STOP cmd id buffer (index into the driver's id buffers).
    case hintID(Int)
    /// One hint element (its ranges, one descriptor each), of round `round`.
    case hint([GuestPhysicalRange], round: UInt32)
    case report
}

/// The virtio-balloon driver: brings the device up the way the spec and Linux do, keeps the
/// stats queue primed, and services interrupts. Generic over the transport, so the same
/// code runs against a real BAR4 and the simulator. It contains no unsafe code.
public final class BalloonDriver<Transport: VirtioTransport> {
    /// Everything this driver implements today.
    public static var implementedFeatures: FeatureBits { balloonImplementedFeatures }

    public let transport: Transport
    public let allocator: DMAAllocator
    public let options: BalloonDriverOptions
    public var logger: Logger
    public var hintOptions = HintOptions()
    /// Runs after every device reset in `bringUp`, once the device can no longer act on
    /// anything an earlier session queued (balloond onlines memory blocks a killed balloond
    /// left offline here, never earlier).
    public var afterDeviceReset: (() -> Void)?
    public let statsSource: BalloonStatsSource?
    /// Where free pages for hints come from (nil: FREE_PAGE_HINT is not negotiated).
    public let hintSource: FreePageSource?
    /// Where inflated and reported memory comes from (nil: the balloon stays empty and
    /// REPORTING is not negotiated).
    public let balloonMemory: BalloonMemory?
    /// MemAvailable/MemFree, for the pressure and reporting policies.
    public let memoryStatus: GuestMemoryStatus?
    /// Monotonic time (the daemon injects its clock, tests a fake one).
    public var clock: MonotonicClock = .system
    /// Whether a stop is pending (the event loop wires its signal pipe here). Long work
    /// inside one driver call (a hint round streaming hints, waiting on a full ring) checks
    /// it and ends early, so SIGTERM is honoured promptly.
    public var shouldStop: () -> Bool = { false }

    public private(set) var offered = FeatureBits()
    public private(set) var negotiated = FeatureBits()
    /// What QEMU needs to map what this device is given (per IOMMU page with ACCESS_PLATFORM).
    var elementVectors: ElementVectorBudget {
        ElementVectorBudget(iommuPageBytes: negotiated.contains(.accessPlatform) ? options.iommuPageBytes : nil)
    }
    /// Whether the features left out under ACCESS_PLATFORM were logged (once per run).
    private var loggedTranslatedFeatures = false
    public private(set) var indices = BalloonQueueIndices(offered: [])
    public private(set) var poisonValue: UInt32?
    public internal(set) var counters = BalloonCounters()
    /// `num_pages` as last read.
    public internal(set) var targetPages: UInt32 = 0
    /// `actual` as last written or read.
    public internal(set) var actualPages: UInt32 = 0
    /// The hint cmd id as last read after a config interrupt (Linux caches it the same way:
    /// while QEMU is in START the field reads 0 with no interrupt, so it must not be polled).
    public internal(set) var hintCommand = FreePageHintCommand.stop
    public private(set) var isRunning = false
    /// Set by a `shutdown` that could neither reset the device nor clear Bus Master: balloon,
    /// hint and DMA memory are still held, because the device may still write them.
    public private(set) var memoryKeptAfterShutdown = false
    /// Deliberate cycle set together with `memoryKeptAfterShutdown`: this driver (and so its
    /// DMA regions, balloon memory and hint source) is never freed.
    private var keptAliveWhileDeviceMayWrite: AnyObject?

    var queues: [BalloonQueueRole: SplitQueue<BufferToken>] = [:]
    /// The stats buffer (exactly one, reused: only posted while the device does not hold it).
    var statsBuffer: DMARegion?
    var statsOutstanding = false
    /// Free page hinting state (FreePageHinting.swift).
    var hinting = HintRoundState()
    /// Balloon size, pressure and reporting state (BalloonSizing.swift, MemoryPressurePolicy.swift).
    var sizing: SizingState
    var pressure: PressureState
    var reporting: ReportingState

    public init(transport: Transport, allocator: DMAAllocator, options: BalloonDriverOptions = BalloonDriverOptions(),
                statsSource: BalloonStatsSource? = nil, hintSource: FreePageSource? = nil, balloonMemory: BalloonMemory? = nil,
                memoryStatus: GuestMemoryStatus? = nil, logger: Logger = Logger(label: "balloond")) {
        self.hintSource = hintSource
        self.balloonMemory = balloonMemory
        self.memoryStatus = memoryStatus
        self.transport = transport
        self.allocator = allocator
        self.options = options
        self.statsSource = statsSource
        self.logger = logger
        sizing = SizingState(retry: Backoff(first: options.sizing.retryInitial, cap: options.sizing.retryMax))
        pressure = PressureState(checkInterval: Backoff(first: options.pressure.checkInterval, cap: options.pressure.restingCheckInterval))
        reporting = ReportingState(passInterval: Backoff(first: options.reporting.interval, cap: options.reporting.restingInterval))
    }

    // MARK: bring-up

    /// The features to ask for, from what the device offers and how the guest poisons pages
    /// (`PagePoisonPolicy.wantedFeatures`). ACCESS_PLATFORM only with IOMMU addressing (the
    /// uio backend programs guest-physical addresses), and then free page hinting and
    /// reporting only where their memory is mapped in the IOMMU too: QEMU translates every
    /// descriptor address through the vIOMMU, and an unmapped one breaks the device.
    public static func wantedFeatures(offered: FeatureBits, implemented: FeatureBits, poison: PagePoisonPolicy,
                                      addressing: DeviceAddressing = .guestPhysical) -> FeatureBits {
        var want = poison.wantedFeatures(implemented: implemented, offered: offered)
        switch addressing {
        case .guestPhysical:
            want.remove(.accessPlatform)
        case .iommu(let hintsMapped, let reportsMapped):
            if offered.contains(.accessPlatform) {
                want.insert(.accessPlatform)
                if !hintsMapped { want.remove(.freePageHint) }
                if !reportsMapped { want.remove(.reporting) }
            }
        }
        return want
    }

    /// Brings the device up (virtio 1.2 §3.1.1, Linux `virtio_dev_probe` + `virtballoon_probe`):
    /// Bus Master off; reset; Bus Master on; ACKNOWLEDGE; DRIVER; negotiate; FEATURES_OK (re-read); queues by QEMU's
    /// numbering; `poison_val`; prime stats; DRIVER_OK; then read `num_pages` and the cmd id
    /// (QEMU raises no config interrupt for changes made before DRIVER_OK).
    public func bringUp() throws(BalloonError) {
        if isRunning || negotiated != [] { counters.deviceResets += 1 }
        isRunning = false
        guard transport.virtioDeviceType == 5 else { throw .wrongDeviceType(transport.virtioDeviceType) }
        do {
            // Reset with Bus Master off and memory decoding on, and only then let the device
            // reach memory: after a SIGKILL the device still holds the dead process's ring
            // addresses, and Bus Master on before the reset would let it act on them.
            try transport.disableDMA()
            try transport.reset(timeoutMilliseconds: resetTimeoutMilliseconds)
            try transport.enableDMA()
        } catch { throw .transport(error) }
        // Only after the reset: the device can no longer apply a queued hint, so owned
        // pages may be given back.
        abandonHinting()
        abandonPFNBuffers()
        afterDeviceReset?()
        if let f = reporting.inFlight { balloonMemory?.release(f) }
        reporting.inFlight = nil
        for q in queues.values { q.resetAfterDeviceReset() }
        statsOutstanding = false
        transport.addStatus(.acknowledge)
        transport.addStatus(.driver)
        offered = transport.deviceFeatures()
        var want = Self.wantedFeatures(offered: offered, implemented: options.wantedFeatures, poison: options.poisonPolicy,
                                       addressing: options.deviceAddressing)
        if want.contains(.accessPlatform) {
            let dropped = options.wantedFeatures.intersection(offered).intersection([.freePageHint, .reporting]).subtracting(want)
            if !dropped.isEmpty, !loggedTranslatedFeatures {
                loggedTranslatedFeatures = true
                logger.warning("the device translates every address through the IOMMU (ACCESS_PLATFORM), and the memory behind these features is not mapped there: leaving out \(dropped.names.joined(separator: ", "))")
            }
        }
        if hintSource == nil { want.remove(.freePageHint) }
        if balloonMemory == nil { want.remove(.reporting) }
        do {
            negotiated = try transport.negotiate(wanted: want)
        } catch {
            transport.addStatus(.failed)
            throw .transport(error)
        }
        logger.info("features negotiated", metadata: ["offered": "\(offered)", "accepted": "\(negotiated)"])
        indices = BalloonQueueIndices(offered: offered)
        do { try transport.setUpInterrupts() } catch {
            transport.addStatus(.failed)
            throw .transport(error)
        }
        do {
            try setUpQueues()
        } catch {
            transport.addStatus(.failed)
            throw error
        }
        if negotiated.contains(.pagePoison), let value = options.poisonPolicy.poisonValue {
            // Before DRIVER_OK, as one 32-bit store (docs/virtio-balloon.md §3.3, §7).
            do { try transport.writeDeviceConfig32(value, at: BalloonConfigLayout.poisonVal) } catch { throw .transport(error) }
            poisonValue = value
            logger.info("page poisoning negotiated", metadata: ["poison_val": "0x\(String(value, radix: 16))", "policy": "\(options.poisonPolicy)"])
        } else {
            poisonValue = nil
        }
        if negotiated.contains(.statsVQ) { try postStats() }
        transport.addStatus(.driverOK)
        let s = transport.status()
        if s.contains(.needsReset) { throw .transport(.needsReset(s)) }
        isRunning = true
        hintCommand = .stop
        try readConfig(afterInterrupt: true)
        // `actual` survives a device reset (and a balloond restart): state what is really
        // held now, then move towards `num_pages`, which survives too (re-inflate).
        try writeActual()
        configureReporting()
        logger.info("device running", metadata: ["status": "\(s)", "num_pages": "\(targetPages)", "actual": "\(actualPages)", "cmd_id": "\(hintCommand)"])
        try adjustBalloonSize()
    }

    private func setUpQueues() throws(BalloonError) {
        let n = transport.numQueues
        var roles: [BalloonQueueRole] = [.inflate, .deflate]
        if negotiated.contains(.statsVQ) { roles.append(.stats) }
        if negotiated.contains(.freePageHint) { roles.append(.freePageHint) }
        if negotiated.contains(.reporting) { roles.append(.reporting) }
        for role in roles {
            guard let index = indices.index(of: role) else { continue }
            guard index < n else { throw .queueMissing(role: role, index: index, numQueues: n) }
            let deviceSize = transport.queueSize(index)
            guard deviceSize != 0 else { throw .transport(.queueUnavailable(queue: index)) }
            // The hint and reporting queues are told apart by size (1024 vs 32): a mismatch
            // means the device numbers queues differently from QEMU 7.2.
            if role == .freePageHint || role == .reporting, deviceSize != role.qemuSize {
                throw .transport(.queueSizeMismatch(queue: index, expected: role.qemuSize, found: deviceSize))
            }
            var size = min(deviceSize, options.maxQueueSize)
            while size > 1 && !QueueLayout.isValid(size: size) { size -= 1 }
            if let existing = queues[role], existing.size == size, existing.index == index {
                existing.resetAfterDeviceReset()
            } else {
                do {
                    queues[role] = try SplitQueue<BufferToken>(index: index, size: size, allocator: allocator)
                } catch { throw .queue(role: role, error) }
            }
            let q = queues[role]!
            do {
                try transport.enableQueue(index, size: size, descriptors: q.descriptorAreaAddress, driver: q.driverAreaAddress, device: q.deviceAreaAddress)
            } catch { throw .transport(error) }
            logger.debug("queue enabled", metadata: ["role": "\(role)", "index": "\(index)", "size": "\(size)"])
        }
        for role in BalloonQueueRole.allCases where !roles.contains(role) { queues[role] = nil }
    }

    func kick(_ role: BalloonQueueRole) throws(BalloonError) {
        guard let q = queues[role] else { return }
        if q.kickNeeded() {
            do { try transport.notify(queue: q.index) } catch { throw .transport(error) }
        }
    }

    // MARK: config

    /// Reads `num_pages`, `actual` and (only after a config interrupt) the hint cmd id, as
    /// one consistent snapshot.
    func readConfig(afterInterrupt: Bool) throws(BalloonError) {
        let hint = negotiated.contains(.freePageHint)
        do {
            let (pages, cmd) = try transport.readConsistent { () throws(TransportError) -> (UInt32, UInt32?) in
                let p = try transport.readDeviceConfig32(at: BalloonConfigLayout.numPages)
                let c = hint && afterInterrupt ? try transport.readDeviceConfig32(at: BalloonConfigLayout.freePageHintCmdID) : nil
                return (p, c)
            }
            if pages != targetPages {
                logger.info("balloon target changed", metadata: ["num_pages": "\(pages)", "previous": "\(targetPages)"])
                sizing.targetChangedAt = clock.now()
            }
            targetPages = pages
            if let cmd {
                let command = FreePageHintCommand(rawValue: cmd)
                if command != hintCommand { logger.info("free page hint command", metadata: ["cmd_id": "\(command)"]) }
                hintCommand = command
            }
        } catch { throw .transport(error) }
    }

    // MARK: interrupts

    /// Handles one interrupt: reads the ISR (which clears it), handles a config change and
    /// used buffers, unmasks the line, then re-checks the rings so no completion that raced
    /// the unmask is lost (docs/userspace-pci.md §1). A new hint cmd id then starts a hint round,
    /// which streams hints until the source runs dry or the device moves on.
    public func serviceInterrupt(line: InterruptLine?) throws(BalloonError) {
        guard isRunning else { throw .notRunning }
        try handleInterruptCauses(line: line)
        try actOnHintCommand(line: line)
        try adjustBalloonSize()
        try reportIfDue()
    }

    /// The ISR, config and used-ring part of servicing an interrupt (also used mid-round).
    func handleInterruptCauses(line: InterruptLine?) throws(BalloonError) {
        counters.interrupts += 1
        let isr = transport.readISR().union(line?.takeCauses() ?? [])
        let s = transport.status()
        if s.contains(.needsReset) {
            counters.errors += 1
            throw .transport(.needsReset(s))
        }
        if isr.contains(.configChange) {
            counters.configChanges += 1
            try readConfig(afterInterrupt: true)
        }
        if isr.contains(.queue) { counters.queueInterrupts += 1 }
        try processUsed()
        if let line { do { try line.unmask() } catch { throw .transport(error) } }
        try processUsed()
    }

    /// Takes used buffers from every queue.
    func processUsed() throws(BalloonError) {
        for (role, q) in queues where q.hasUsed {
            let used: [UsedBuffer<BufferToken>]
            do { used = try q.takeUsed() } catch {
                counters.errors += 1
                throw .queue(role: role, error)
            }
            for buffer in used {
                switch buffer.token {
                case .stats:
                    // The device wants fresh stats: refill and return the buffer at once.
                    statsOutstanding = false
                    try postStats()
                case .hintID(let i):
                    hinting.idBufferInFlight[i] = false
                case .hint(let ranges, let round):
                    hintUsed(ranges, round: round)
                case .inflate(let slot):
                    try pfnBufferUsed(slot: slot, inflate: true)
                case .deflate(let slot):
                    try pfnBufferUsed(slot: slot, inflate: false)
                case .report:
                    reportUsed()
                }
            }
        }
    }

    /// The transport's reset timeout: `options.resetTimeout` in whole milliseconds, rounded up.
    private var resetTimeoutMilliseconds: Int { Int(options.resetTimeout.roundedUp(to: .milliseconds(1))) }

    /// Resets the device and forgets every buffer (at shutdown, or before a re-init).
    ///
    /// Memory goes back to the guest only once the device cannot reach it any more: after a
    /// reset, or, when the reset fails, after Bus Master is cleared. When both fail, the
    /// balloon, hint and DMA memory are kept (`memoryKeptAfterShutdown`; this driver then
    /// keeps itself alive so its DMA regions are never unmapped), and the event loop must
    /// not hand the memory back either.
    public func shutdown() {
        isRunning = false
        do { try transport.reset(timeoutMilliseconds: resetTimeoutMilliseconds) } catch {
            logger.warning("device reset at shutdown failed; clearing Bus Master so the device cannot reach memory", metadata: ["error": "\(error)"])
            do { try transport.disableDMA() } catch let dmaError {
                memoryKeptAfterShutdown = true
                keptAliveWhileDeviceMayWrite = self
                let held = (balloonMemory?.heldBytes ?? 0) + (hintSource?.heldBytes ?? 0)
                logger.critical("""
                    the device could not be reset and Bus Master could not be cleared: keeping \(held >> 20) MiB of balloon \
                    and hint memory and all DMA memory, because the device may still write it; \
                    reset the device (unbind/rebind, or reboot the guest) before reusing that memory
                    """, metadata: ["reset_error": "\(error)", "bus_master_error": "\(dmaError)"])
                return
            }
        }
        // After the reset, as in bringUp: no queued hint can be applied any more.
        abandonHinting()
        releaseBalloon()
        for q in queues.values { q.resetAfterDeviceReset() }
        statsOutstanding = false
    }

    /// Status for `balloond status`.
    public func statusSnapshot() -> BalloonDriverStatus {
        let qs = BalloonQueueRole.allCases.compactMap { role -> QueueStatus? in
            guard let q = queues[role] else { return nil }
            return QueueStatus(role: role.rawValue, index: q.index, size: q.size, enabled: transport.queueEnabled(q.index),
                               availableIndex: q.availableIndex, usedIndex: q.usedIndexConsumed, inFlight: q.inFlight)
        }
        return BalloonDriverStatus(deviceStatus: "\(transport.status())", offeredFeatures: "\(offered)", negotiatedFeatures: "\(negotiated)",
                                   poisonValue: poisonValue, numPages: targetPages, actual: actualPages,
                                   balloonBytes: UInt64(sizing.inflatedPages + sizing.inflatingPages) * balloonPageSize,
                                   reportedBytes: UInt64(reporting.heldPages) * balloonPageSize, hintHeldBytes: hintSource?.heldBytes ?? 0,
                                   balloonMemory: balloonMemory?.name,
                                   shortfall: committedPages < effectiveTargetPages ? sizing.lastShortfall : nil, hintCommand: "\(hintCommand)",
                                   queues: qs, counters: counters)
    }

    /// Test support: the driver's queue for a role.
    public func queueForTesting(_ role: BalloonQueueRole) -> (index: UInt16, size: UInt16)? {
        queues[role].map { ($0.index, $0.size) }
    }
}
