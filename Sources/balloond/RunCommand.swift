import ArgumentParser
import Balloon
import BalloonBlocks
import FreePages
import GuestMemoryLinux
import HintSourcesLinux
import BalloonMemoryLinux
import Logging
import PlatformLinux
import VirtioCore
import VirtioPCI
import VirtioQueue
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Find the balloon, bind it to vfio-pci or uio_pci_generic, and drive it in the foreground until SIGTERM/SIGINT.",
        discussion: """
        Needs root. Picks a backend (--backend): vfio-pci when the device is behind an IOMMU \
        and vfio-pci is available, else uio_pci_generic. Loads the backend's modules if needed, \
        unbinds the current driver (normally virtio-pci), maps BAR4 (through sysfs, or through \
        the vfio device, whose DMA goes through IOMMU mappings), puts the virtqueues in one locked 2 MiB hugepage (reserving one \
        through nr_hugepages if none is free; falling back to locked 4 KiB pages with queues of at \
        most 256 entries), negotiates features and page poisoning from the guest's configuration, \
        and serves the device. Logs go to stderr. On SIGTERM/SIGINT it resets the device, frees its \
        memory and rebinds the previous driver (unless --keep-bound). All memory the device can \
        reach is also held by a small guardian process (`balloond guardian`), which stops the \
        device before that memory goes back to the kernel if balloond is killed. After a crash \
        or SIGKILL, run it again: it resets and re-initialises the device.
        """
    )

    @OptionGroup var device: DeviceOption
    @Option(help: ArgumentHelp("How to reach the device: auto, uio or vfio.", discussion: """
        vfio (vfio-pci) needs the device behind an IOMMU (a virtual one in a VM: QEMU -device \
        intel-iommu,intremap=on, guest intel_iommu=on): every address the device uses is then \
        mapped by balloond, it gets MSI-X interrupts where the device has them, and it works \
        under kernel lockdown. uio (uio_pci_generic) needs no IOMMU, or a passthrough one \
        (iommu=pt). auto picks vfio when the device has an IOMMU group and vfio-pci is \
        available, else uio, and logs why. With a device that translates its addresses \
        (iommu_platform=on, VIRTIO_F_ACCESS_PLATFORM), vfio leaves free page hinting and \
        reporting off: their memory is not mapped in the IOMMU yet.
        """))
    var backend: DeviceBackend = .auto
    @Flag(help: "Leave the device bound to uio_pci_generic or vfio-pci at exit instead of restoring the previous driver.")
    var keepBound = false
    @Flag(help: ArgumentHelp("Take the device even from a driver other than virtio-pci or uio_pci_generic (e.g. vfio-pci).", discussion: """
        Without it, balloond refuses a device another driver holds, before changing anything: \
        that driver's user would lose the device under its feet.
        """))
    var force = false
    @Flag(inversion: .prefixedNo, help: "Negotiate FREE_PAGE_HINT when the device offers it.")
    var freePageHint = true
    @Option(help: ArgumentHelp("Where free pages for hints come from: auto, hugetlb, anonymous, offline, kpageflags.", discussion: """
        hugetlb and anonymous hint memory balloond owns (safe on any host). offline takes whole \
        memory blocks whose pages are all free offline (/sys/devices/system/memory, needs \
        CONFIG_MEMORY_HOTREMOVE) and onlines them at DONE (all but a --hint-reserve-mib reserve): owned too, and nothing is zeroed. kpageflags hints pages the \
        kernel's buddy allocator reports free without owning them: fastest, but safe only under TCG, \
        where QEMU dirty-logs every later write. auto picks kpageflags on TCG guests without page \
        poisoning or init_on_free, else offline where memory blocks can be offlined (measured faster \
        than hugetlb: nothing is zeroed), else hugetlb, else anonymous, and logs why; under TCG it \
        never picks hugetlb or anonymous (their memory churn during a migration corrupts TCG \
        destinations even with no hint sent) and turns hinting off instead.
        """))
    var hintSource: HintSource = .auto
    @Flag(help: ArgumentHelp("Allow --hint-source kpageflags on KVM.", discussion: """
        DANGEROUS: on KVM with manual dirty-log protect, a page the guest writes between balloond's \
        scan and QEMU applying the hint is dropped from the migration: the destination silently gets \
        stale memory. Use only on hosts whose dirty logging you know survives hints.
        """))
    var unsafeHintsOnKVM = false
    @Option(help: ArgumentHelp("Memory (MiB) the offline hint source keeps offline between migrations (0: none).", discussion: """
        With --hint-source offline (or auto, which then picks offline), free memory blocks (at most 8 MiB \
        of movable pages in use) are \
        taken offline ahead of time, highest addresses first, and kept at DONE, so a migration's \
        first hint round hints them the moment it starts instead of offlining blocks while QEMU is \
        already sending. The guest cannot use that memory (MemTotal shrinks by it) until memory \
        pressure, an inflate or balloond's exit gives it back, and the reserve never takes MemFree \
        below 128 MiB. With it, auto picks offline wherever memory blocks can be offlined; an \
        explicit other source ignores it, with a warning.
        """))
    var hintReserveMib: UInt64 = 0
    @Flag(help: ArgumentHelp("Control experiment: run hint rounds that take memory from the hint source as usual but send no hint.", discussion: """
        For telling a wrong hint from the guest-side churn of taking and releasing memory during \
        a migration (docs/virtio-balloon.md §9's bench caveat). Nothing is saved with it on.
        """))
    var hintControl = false
    @Flag(inversion: .prefixedNo, help: ArgumentHelp("Inflate and deflate to the host's target (QMP `balloon`).", discussion: """
        Inflated memory is taken as 2 MiB hugetlb pages (surplus pages, which go back to the guest \
        the moment balloond exits), else as locked 4 KiB pages, and shows as balloond's own \
        memory: MemTotal does not shrink.
        """))
    var balloon = true
    @Flag(inversion: .prefixedNo, help: ArgumentHelp("Inflate with whole free memory blocks taken offline where it can (about 3x faster under TCG).", discussion: """
        While an inflate still wants 128 MiB or more, balloond takes a memory block whose pages are \
        free (at most 8 MiB of movable pages in use, which the kernel copies away) offline through \
        /sys/devices/system/memory and sends it as 2 MiB pieces: no page is zeroed, where every other \
        way to take memory zeroes it (init_on_alloc). The rest comes from hugetlb or locked anonymous \
        pages. A block comes back online once all of it is deflated (a deflate that touches one piece \
        gives back the whole block); after a SIGKILL the guardian or the next start onlines it. \
        Off by default: a block the guest never touched is not resident on the host, so inflating it \
        frees no host memory now (it still caps what the guest can use); the page allocator hands out \
        recently freed, resident memory first. Measured on a fresh 1 GiB guest that dirtied and freed \
        500 MiB: QEMU's RSS fell by 262 MiB of 512 with it, by 494 without.
        """))
    var offlineBalloon = false
    @Flag(inversion: .prefixedNo, help: "Negotiate REPORTING when offered: hold free 2 MiB blocks above --report-keep-free-mib and report them to the host.")
    var freePageReporting = true
    @Option(help: "Free page reporting keeps at least this much MemFree (MiB) for the guest.")
    var reportKeepFreeMib: UInt64 = 256
    @Option(help: "Free page reporting gives held blocks back when MemFree falls below this (MiB; less than --report-keep-free-mib).")
    var reportReleaseBelowMib: UInt64 = 128
    @Option(help: "Most memory (MiB) held for free page reporting (default: no cap).")
    var reportMaxMib: UInt64?
    @Option(help: ArgumentHelp("With DEFLATE_ON_OOM: deflate when MemAvailable falls below this (MiB).", discussion: """
        Also on a PSI trigger (--psi-stall-ms within --psi-window-ms). Each time at least \
        --deflate-step-mib is given back (blocks held for reporting first), the balloon stays that \
        small for --pressure-hold-seconds, and then re-inflates only while MemAvailable stays above \
        --reinflate-above-mib.
        """))
    var deflateBelowMib: UInt64 = 96
    @Option(help: "Memory (MiB) given back per pressure event (at least 1).")
    var deflateStepMib: UInt64 = 64
    @Option(help: "Seconds the balloon stays deflated after a pressure event (0-86400).")
    var pressureHoldSeconds: Double = 60
    @Option(help: "After a pressure event, re-inflate only while MemAvailable stays above this (MiB; at least --deflate-below-mib).")
    var reinflateAboveMib: UInt64 = 192
    @Option(help: "PSI trigger: stall time (ms) of some task within the window that counts as pressure (1 to the window).")
    var psiStallMs: Int = 100
    @Option(help: "PSI trigger window (ms, 500-10000, the kernel's range).")
    var psiWindowMs: Int = 1000
    @Option(help: ArgumentHelp("Early-warning PSI trigger: any task stalled this long (ms) on memory within 500 ms makes balloond look at MemAvailable at once (0: off; 1-500).", discussion: """
        With nothing left to reclaim, a guest goes from its first memory stall to the OOM killer         within a few ms of stall, long before --psi-stall-ms: this trigger, and balloond running         at real-time priority (--realtime) to act on it at once, are what deflate the balloon in         time. With both, a balloon larger than the guest's headroom is not polled every 500 ms.
        """))
    var psiEarlyStallMs: Int = 1
    @Flag(inversion: .prefixedNo, help: ArgumentHelp("Wait for events and handle memory pressure at real-time priority (SCHED_FIFO 1).", discussion: """
        Only the wait and the pressure check run raised: interrupts, inflating, free page         reporting and hint rounds run at normal priority, so bulk work never starves the guest.         The kernel's real-time throttling (sched_rt_runtime_us) bounds it in any case.
        """))
    var realtime = true
    @Option(help: "Where to publish state for `balloond status` (root-only JSON).")
    var stateFile: String = DaemonState.defaultPath
    @Option(help: ArgumentHelp("Also write Prometheus metrics to this file (node_exporter's textfile collector, e.g. /var/lib/prometheus/node-exporter/balloond.prom).", discussion: """
        Replaced atomically (mode 0644) every few seconds while balloond is woken and at every \
        hint round; removed at exit.
        """, valueName: "path"))
    var metricsTextfile: String?
    @OptionGroup var logging: LoggingOptions

    /// Largest memory size an option may name (1 TiB), so MiB-to-byte shifts cannot overflow.
    static let maxMib: UInt64 = 1 << 20

    /// Every option is checked here, before `run` loads a module, unbinds a driver or takes
    /// memory.
    func validate() throws {
        _ = try logging.makeLogger()
        if let metricsTextfile { try MetricsTextfile.validate(path: metricsTextfile) }
        for (name, value) in [("--report-keep-free-mib", reportKeepFreeMib), ("--report-release-below-mib", reportReleaseBelowMib),
                              ("--report-max-mib", reportMaxMib ?? 0), ("--deflate-below-mib", deflateBelowMib),
                              ("--deflate-step-mib", deflateStepMib), ("--reinflate-above-mib", reinflateAboveMib),
                              ("--hint-reserve-mib", hintReserveMib)] where value > Self.maxMib {
            throw ValidationError("\(name) \(value) is more than \(Self.maxMib) MiB (1 TiB)")
        }
        guard reportReleaseBelowMib < reportKeepFreeMib else {
            throw ValidationError("--report-release-below-mib (\(reportReleaseBelowMib)) must be below --report-keep-free-mib (\(reportKeepFreeMib)), or reporting would give back what it just took")
        }
        guard deflateStepMib >= 1 else { throw ValidationError("--deflate-step-mib must be at least 1") }
        guard reinflateAboveMib >= deflateBelowMib else {
            throw ValidationError("--reinflate-above-mib (\(reinflateAboveMib)) must be at least --deflate-below-mib (\(deflateBelowMib)), or the balloon would re-inflate straight back into pressure")
        }
        guard pressureHoldSeconds.isFinite, pressureHoldSeconds >= 0, pressureHoldSeconds <= 86400 else {
            throw ValidationError("--pressure-hold-seconds must be a number of seconds from 0 to 86400, not \(pressureHoldSeconds)")
        }
        guard (500...10_000).contains(psiWindowMs) else {
            throw ValidationError("--psi-window-ms must be from 500 to 10000 (the kernel's PSI window range), not \(psiWindowMs)")
        }
        guard (0...500).contains(psiEarlyStallMs) else {
            throw ValidationError("--psi-early-stall-ms must be from 0 (off) to 500 (the early trigger's window), not \(psiEarlyStallMs)")
        }
        guard (1...psiWindowMs).contains(psiStallMs) else {
            throw ValidationError("--psi-stall-ms must be from 1 to --psi-window-ms (\(psiWindowMs)), not \(psiStallMs)")
        }
        if unsafeHintsOnKVM, hintSource != .kpageflags {
            throw ValidationError("--unsafe-hints-on-kvm only applies to --hint-source kpageflags")
        }
        if hintSource == .simulated {
            throw ValidationError("--hint-source simulated is only for `balloond simulate`: its addresses are not free guest memory; use auto, hugetlb, anonymous, offline or kpageflags")
        }
    }

    /// The driver's policies from the options (valid after `validate`).
    func driverOptions(poisonPolicy: PagePoisonPolicy) -> BalloonDriverOptions {
        var options = BalloonDriverOptions(poisonPolicy: poisonPolicy)
        if !freePageHint { options.wantedFeatures.remove(.freePageHint) }
        if !freePageReporting { options.wantedFeatures.remove(.reporting) }
        options.pressure.deflateBelowAvailableBytes = deflateBelowMib << 20
        options.pressure.deflateStepBytes = deflateStepMib << 20
        options.pressure.hold = .nanoseconds(UInt64(pressureHoldSeconds * 1e9))
        options.pressure.reinflateAboveAvailableBytes = reinflateAboveMib << 20
        options.pressure.psiStall = .milliseconds(psiStallMs)
        options.pressure.psiWindow = .milliseconds(psiWindowMs)
        options.reporting.keepFreeBytes = reportKeepFreeMib << 20
        options.reporting.releaseBelowFreeBytes = reportReleaseBelowMib << 20
        options.reporting.maxHeldBytes = reportMaxMib.map { $0 << 20 }
        return options
    }

    func run() throws {
        let logger = try logging.makeLogger()
        let preflight = Preflight()
        try preflight.checkRoot()
        let function = try device.select()
        let facts = try BackendFacts.read(function.address)
        let backendChoice: BackendChoice
        switch chooseBackend(requested: backend, facts: facts, bdf: function.bdf) {
        case .failure(let e): throw e
        case .success(let c): backendChoice = c
        }
        if backendChoice.backend == .vfio, let group = facts.group {
            // vfio owns whole groups: refuse before unbinding anything.
            let blockers = group.blockers(besides: function.address)
            if !blockers.isEmpty { throw VFIOError.groupNotViable(group: group.number, blockers: blockers) }
        }
        if backendChoice.backend == .vfio {
            // vfio needs no BAR access through sysfs (so lockdown does not matter) and takes
            // translated devices; it still reads guest-physical addresses for inflate PFNs.
            try preflight.checkPagemap()
        } else {
            try preflight.checkLockdown()
            try preflight.run(for: function.address)
        }
        logger.notice("backend: \(backendChoice.backend.rawValue): \(backendChoice.reason)")
        // Decided before anything changes: a refused --hint-source stops here.
        let debugSources = KernelMemoryDebugSources.read()
        let memoryConfig = GuestMemoryDebugConfig.detect(cmdline: debugSources.cmdline, kernelConfig: debugSources.kernelConfig,
                                                         kernelLog: debugSources.memAutoInitLog)
        let hintChoice = try chooseHints(memoryConfig: memoryConfig, logger: logger)
        let lock = try DeviceLock(address: function.address)
        defer { lock.unlock() }
        // A balloond killed earlier may have left the hugetlb pool grown or sysctls changed:
        // put them back first, whatever this run's options (before our ring page is taken).
        // Memory blocks a killed offline hint source left offline wait for the device reset
        // (the driver's afterDeviceReset): the old session's hints may still be queued.
        let recovery = try recoverAfterCrash(root: .host, logger: logger, offlineBlocks: false)
        logger.debug("crash recovery: \(recovery)")
        let binder = DriverBinder(logger: logger)
        let binding: DeviceBinding
        switch backendChoice.backend {
        case .vfio:
            let b = try binder.bindVFIO(function.address, force: force)
            logger.info("device bound", metadata: ["binding": "\(b)"])
            binding = .vfio(b)
        case .uio, .auto:
            let b = try binder.bind(function.address, force: force)
            logger.info("device bound", metadata: ["binding": "\(b)"])
            binding = .uio(b)
        }

        var exitError: Error?
        do {
            try serve(function: function, binding: binding, memoryConfig: memoryConfig, hintChoice: hintChoice, logger: logger)
        } catch {
            exitError = error
        }
        DaemonState.remove(at: stateFile)
        if keepBound {
            logger.info("leaving the device bound to \(binding.driver) (--keep-bound); `balloond unbind` restores \(binding.previousDriver ?? "the kernel's choice")")
        } else {
            do {
                let now = try binder.restore(function.address)
                logger.info("driver restored", metadata: ["driver": "\(now ?? "none")"])
            } catch {
                logger.error("could not restore the previous driver: \(error); run `balloond unbind`")
                if exitError == nil { exitError = error }
            }
        }
        if let exitError { throw exitError }
    }

    /// Everything that holds the device open lives in here, so it is all closed (uio fd, BAR
    /// mapping, DMA memory after the device reset) before the driver is restored.
    private func serve(function: PCIFunction, binding: DeviceBinding, memoryConfig: GuestMemoryDebugConfig,
                       hintChoice: (source: HintSource, reason: String)?, logger: Logger) throws {
        // Issue 9 H2: all memory the device may touch comes from these memfds, which the
        // guardian also holds until the device is stopped, even if this process is killed.
        let arena = try DeviceMemoryArena()
        let guardian = try GuardianLink.start(arena: arena, device: function.address, logLevel: logging.logLevel,
                                              vfio: binding.driver == vfioPCIDriver)
        let signals = try SignalPipe()
        let access = try DeviceAccess.open(binding, function: function, logger: logger)
        let config = access.config
        let transport = try ModernPCITransport(config: config, barSizes: access.barSizes, mapBAR: access.mapBAR, pause: Sys.sleep(microseconds:))
        let line = try access.interruptLine(transport: transport, logger: logger)
        defer { guardian.markQuiescedIfStopped(deviceStatus: transport.status().rawValue, config: config) }  // after driver.shutdown()
        let compaction = CompactionHold(logger: logger)
        // What balloond holds, shared by the hint source and the balloon memory.
        let holdings = GuestMemoryHoldings()
        let (allocator, dmaDescription) = try makeDMAAllocator(arena: arena, migrationHold: compaction, deviceMapper: access.deviceMapper, logger: logger)
        logger.info("DMA memory", metadata: ["memory": "\(dmaDescription)"])
        logger.info("guest memory debugging", metadata: ["config": "\(memoryConfig)", "poison": "\(memoryConfig.poisonPolicy)"])
        // With vfio and a device that translates every address (ACCESS_PLATFORM), hint and
        // report ranges must be mapped in the IOMMU: only memory balloond owns and has mapped
        // can be (the anonymous source; the balloon's hugetlb pages).
        let translated = access.deviceMapper != nil && transport.deviceFeatures().contains(.accessPlatform)
        var hintChoice = hintChoice
        if translated, let choice = hintChoice, choice.source != .anonymous {
            if hintSource == .auto {
                logger.notice("free page hint source: anonymous instead of \(choice.source.rawValue): the device translates every address through the IOMMU (ACCESS_PLATFORM), and only the anonymous source's memory can be mapped there (its mapping also pins the pages, so they cannot move while hinted)")
                hintChoice = (.anonymous, "ACCESS_PLATFORM under vfio")
            } else {
                logger.warning("--hint-source \(choice.source.rawValue) cannot hint a device that translates every address through the IOMMU (ACCESS_PLATFORM): its pages are not mapped there (only anonymous's are); free page hinting is off")
                hintChoice = nil
            }
        }
        let hints = try hintChoice.map { (name: $0.source.rawValue, source: try makeHintSource($0.source, allocator: allocator, arena: arena, compaction: compaction, holdings: holdings, logger: logger)) }
        if hintReserveMib > 0, let h = hints, h.source.reserveTargetBytes == 0 {
            logger.warning("--hint-reserve-mib \(hintReserveMib) is ignored: only the offline hint source keeps a reserve, and this run hints from \(h.name)")
        }
        var hintsMapped = !translated
        if translated, let anonymous = hints?.source as? AnonymousSource {
            anonymous.deviceMapper = access.deviceMapper
            hintsMapped = true
        }
        var options = driverOptions(poisonPolicy: memoryConfig.poisonPolicy)
        if allocator is PageDMAAllocator { options.maxQueueSize = 256 }
        if let vfio = access.deviceMapper as? VFIODevice { options.iommuPageBytes = vfio.iommu.minimumPageSize }
        let memory = balloon ? try makeBalloonMemory(arena: arena, compaction: compaction, holdings: holdings, logger: logger) : nil
        var reportsMapped = !translated
        let pageMemory = (memory as? OfflineFirstBalloonMemory)?.rest ?? memory
        if translated, let huge = ((pageMemory as? TieredBalloonMemory)?.huge ?? pageMemory) as? HugeTLBBalloonMemory {
            huge.deviceMapper = access.deviceMapper
            reportsMapped = true
        }
        if case .iommu = access.addressing {
            options.deviceAddressing = .iommu(hintsMapped: hintsMapped, reportsMapped: reportsMapped)
        } else {
            options.deviceAddressing = access.addressing
        }
        var psi: PressureTrigger?
        do {
            psi = try PressureTrigger(stallMicroseconds: Int(options.pressure.psiStall.whole(.microseconds(1))), windowMicroseconds: Int(options.pressure.psiWindow.whole(.microseconds(1))))
        } catch {
            logger.warning("no PSI memory trigger (\(error)); memory pressure is watched through MemAvailable only")
        }
        let (early, raisePriority) = armEarlyWarning(logger: logger)
        options.pressure.earlyWarningArmed = early != nil && raisePriority != nil
        logger.info("memory pressure watch", metadata: [
            "psi": "\(psi.map { _ in "\(psiStallMs) ms in \(psiWindowMs) ms" } ?? "off")",
            "psi_early": "\(early.map { _ in "\(psiEarlyStallMs) ms in 500 ms" } ?? "off")",
            "realtime": "\(raisePriority != nil)",
        ])
        // /proc/meminfo stays open: each pressure check is one pread, scanned as bytes.
        let meminfo: OpenFile
        do { meminfo = try OpenFile(path: "/proc/meminfo", flags: Sys.openReadOnly) } catch {
            throw Failure.noMeminfo(error)
        }
        let memoryStatus = ProcMemoryStatus { buffer in try? meminfo.pread(into: &buffer, offset: 0) }
        let driver = BalloonDriver(transport: transport, allocator: allocator, options: options,
                                   statsSource: ProcStatsSource(readFile: readTextFile), hintSource: hints?.source,
                                   balloonMemory: memory, memoryStatus: memoryStatus, logger: logger)
        driver.hintOptions.controlNoHints = hintControl
        var blocksRecovered = false
        driver.afterDeviceReset = {
            guard !blocksRecovered else { return }
            blocksRecovered = true
            recoverOfflineBlocksAfterReset(logger: logger)
        }
        if hintControl { logger.warning("--hint-control: hint rounds take memory but send no hints (control experiment)") }
        defer { driver.shutdown() }

        let poller = LinuxEventPoller(signals: signals, interruptDescriptor: line.pollDescriptor, pressureDescriptor: psi?.pollDescriptor,
                                      earlyPressureDescriptor: early?.pollDescriptor)
        // The platform's CLOCK_MONOTONIC, for the daemon and (through it) the driver.
        let clock = MonotonicClock { .nanoseconds(Sys.monotonicNanos()) }
        let daemon = Daemon(driver: driver, line: line, poller: poller, clock: clock, logger: logger)
        daemon.setUrgentPriority = raisePriority
        // Ring pages must still be where the device was told they are (4 KiB pages could move).
        daemon.beforeBringUp = { try allocator.verifyPlacement() }
        let started = wallClockSeconds()
        var lastPublished: BalloonDriverStatus?
        var lastPublishTime = 0.0
        // The state file is rewritten at least this often (on the wall clock its times use).
        let statePublishInterval: Duration = .seconds(5)
        var textfile = metricsTextfile.map { MetricsTextfile(path: $0) }
        defer { textfile?.remove() }
        daemon.onIteration = { snapshot, restarts, force in
            let now = wallClockSeconds()
            let state = DaemonState(pid: Sys.processID, device: function.bdf, pciID: "\(hex4(function.vendorID)):\(hex4(function.deviceID))",
                                    previousDriver: binding.previousDriver, uioDevice: access.interruptPath, dmaMemory: dmaDescription,
                                    hintSource: hints?.name, startedAt: started, updatedAt: now, restarts: restarts, driver: snapshot)
            let wasFailing = textfile?.failing ?? false
            do { try textfile?.update(state, now: now, force: force, version: Balloond.configuration.version) } catch {
                if !wasFailing { logger.warning("\(error)") }
            }
            guard force || snapshot != lastPublished || now - lastPublishTime >= statePublishInterval / .seconds(1) else { return }
            do { try state.write(to: stateFile) } catch { logger.warning("cannot publish state: \(error)") }
            lastPublished = snapshot
            lastPublishTime = now
        }
        switch daemon.run() {
        case .stopSignal(let signal):
            logger.info("signal \(signal) received; stopping: resetting the device")
        case .waitFailed(let error):
            throw Failure.eventWait(error)
        }
    }
}

/// `--hint-source`: parsed (and so checked) before anything changes.
extension HintSource: ExpressibleByArgument {
    /// What `--help` lists: `simulated` parses only to be refused with a reason.
    public static var allValueStrings: [String] { allCases.filter { $0 != .simulated }.map(\.rawValue) }
}

extension RunCommand {
    /// Chooses the free page source (`--hint-source`) and logs the choice and why; nil when
    /// hinting is off. Reads only, so a refusal stops `run` before anything changed.
    func chooseHints(memoryConfig: GuestMemoryDebugConfig, logger: Logger) throws -> (source: HintSource, reason: String)? {
        guard freePageHint else { return nil }
        let choice: HintSourceChoice
        switch chooseHintSource(requested: hintSource, hypervisor: detectHypervisor(),
                                memoryDebug: memoryConfig,
                                unsafeHintsOnKVM: unsafeHintsOnKVM, hugetlbAvailable: hugetlbHintSourceUsable(),
                                offlineAvailable: offlineHintSourceUsable(), reserveRequested: hintReserveMib > 0) {
        case .failure(let e): throw Failure.hintSource(e)
        case .success(let c): choice = c
        }
        if let warning = choice.warning { logger.warning("\(warning)") }
        guard let source = choice.source else {
            logger.warning("\(choice.reason)")
            return nil
        }
        logger.notice("free page hint source: \(source.rawValue): \(choice.reason)")
        return (source, choice.reason)
    }

    /// The early-warning PSI trigger and the priority switch, each nil when off or not
    /// possible here (with a warning: then a balloon larger than the headroom is polled).
    func armEarlyWarning(logger: Logger) -> (PressureTrigger?, ((Bool) -> Void)?) {
        var early: PressureTrigger?
        if psiEarlyStallMs > 0 {
            do { early = try PressureTrigger(stallMicroseconds: psiEarlyStallMs * 1000, windowMicroseconds: 500_000) } catch {
                logger.warning("no early-warning PSI trigger (\(error)); a balloon larger than the guest's headroom is checked every 500 ms instead")
            }
        }
        var raise: ((Bool) -> Void)?
        if realtime {
            do {
                try Sys.setRealtimePriority(true)
                try Sys.setRealtimePriority(false)
                raise = { on in
                    do { try Sys.setRealtimePriority(on) } catch { logger.warning("cannot change the scheduling priority: \(error)") }
                }
            } catch {
                logger.warning("cannot run at real-time priority (\(error)); a balloon larger than the guest's headroom is checked every 500 ms instead (--no-realtime silences this)")
            }
        }
        return (early, raise)
    }

    /// Builds the chosen free page source.
    func makeHintSource(_ source: HintSource, allocator: DMAAllocator, arena: DeviceMemoryArena, compaction: CompactionHold,
                        holdings: GuestMemoryHoldings, logger: Logger) throws -> FreePageSource {
        let own = (allocator as? HugePageDMAAllocator).map { [GuestPhysicalRange(start: $0.region.physicalAddress, length: UInt64($0.region.size))] } ?? []
        var env = LinuxHintSourceEnvironment(pagemap: try PagemapResolver(), ownHugePages: own, limits: OwnedMemoryLimits(), arena: arena, compactionHold: compaction,
                                             holdings: holdings, logger: logger)
        env.offlineReserveBytes = hintReserveMib << 20
        return try makeLinuxFreePageSource(source, environment: env)
    }
}

extension RunCommand {
    /// The balloon's memory (inflate and reporting): whole offline memory blocks for inflates
    /// that want one (unless --no-offline-balloon), hugetlb surplus pages, else locked
    /// anonymous memory.
    func makeBalloonMemory(arena: DeviceMemoryArena, compaction: CompactionHold, holdings: GuestMemoryHoldings, logger: Logger) throws -> BalloonMemory? {
        let memory = makeLinuxBalloonMemory(pagemap: try PagemapResolver(), arena: arena, limits: OwnedMemoryLimits(), compactionHold: compaction,
                                            holdings: holdings, offlineBlocks: offlineBalloon, logger: logger)
        logger.info("balloon memory: \(memory.name)")
        return memory
    }
}

/// `--backend`.
extension DeviceBackend: ExpressibleByArgument {}
