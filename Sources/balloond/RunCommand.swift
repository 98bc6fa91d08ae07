import ArgumentParser
import Balloon
import CBalloonShims
import FreePages
import FreePagesLinux
import Logging
import PlatformLinux
import VirtioCore
import VirtioPCI
import VirtioQueue
#if canImport(Glibc)
import Glibc
#endif

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Find the balloon, bind it to uio_pci_generic, and drive it in the foreground until SIGTERM/SIGINT.",
        discussion: """
        Needs root. Loads uio and uio_pci_generic if needed, unbinds the current driver (normally \
        virtio-pci), maps BAR4, puts the virtqueues in one locked 2 MiB hugepage (reserving one \
        through nr_hugepages if none is free; falling back to locked 4 KiB pages with queues of at \
        most 256 entries), negotiates features and page poisoning from the guest's configuration, \
        and serves the device. Logs go to stderr. On SIGTERM/SIGINT it resets the device, frees its \
        memory and rebinds the previous driver (unless --keep-bound). After a crash or SIGKILL, run \
        it again: it resets and re-initialises the device.
        """
    )

    @OptionGroup var device: DeviceOption
    @Flag(help: "Leave the device bound to uio_pci_generic at exit instead of restoring the previous driver.")
    var keepBound = false
    @Flag(inversion: .prefixedNo, help: "Negotiate FREE_PAGE_HINT when the device offers it.")
    var freePageHint = true
    @Option(help: ArgumentHelp("Where free pages for hints come from: auto, hugetlb, anonymous, kpageflags.", discussion: """
        hugetlb and anonymous hint memory balloond owns (safe on any host). kpageflags hints pages the \
        kernel's buddy allocator reports free without owning them: fastest, but safe only under TCG, \
        where QEMU dirty-logs every later write. auto picks kpageflags on TCG and hugetlb (else \
        anonymous) elsewhere, and logs why; under TCG it never picks an owned source (their memory \
        churn during a migration corrupts TCG destinations even with no hint sent), so on a TCG guest \
        with page poisoning or init_on_free it turns hinting off.
        """))
    var hintSource: String = "auto"
    @Flag(help: ArgumentHelp("Allow --hint-source kpageflags on KVM.", discussion: """
        DANGEROUS: on KVM with manual dirty-log protect, a page the guest writes between balloond's \
        scan and QEMU applying the hint is dropped from the migration: the destination silently gets \
        stale memory. Use only on hosts whose dirty logging you know survives hints.
        """))
    var unsafeHintsOnKVM = false
    @Flag(help: ArgumentHelp("Control experiment: run hint rounds that take memory from the hint source as usual but send no hint.", discussion: """
        For telling a wrong hint from the guest-side churn of taking and releasing memory during \
        a migration (virtio-balloon.md §9's bench caveat). Nothing is saved with it on.
        """))
    var hintControl = false
    @Flag(inversion: .prefixedNo, help: ArgumentHelp("Inflate and deflate to the host's target (QMP `balloon`).", discussion: """
        Inflated memory is taken as 2 MiB hugetlb pages (surplus pages, which go back to the guest \
        the moment balloond exits), else as locked 4 KiB pages, and shows as balloond's own \
        memory: MemTotal does not shrink.
        """))
    var balloon = true
    @Flag(inversion: .prefixedNo, help: "Negotiate REPORTING when offered: hold free 2 MiB blocks above --report-keep-free-mib and report them to the host.")
    var freePageReporting = true
    @Option(help: "Free page reporting keeps at least this much MemFree (MiB) for the guest.")
    var reportKeepFreeMib: UInt64 = 256
    @Option(help: "Free page reporting gives held blocks back when MemFree falls below this (MiB).")
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
    @Option(help: "Memory (MiB) given back per pressure event.")
    var deflateStepMib: UInt64 = 64
    @Option(help: "Seconds the balloon stays deflated after a pressure event.")
    var pressureHoldSeconds: Double = 60
    @Option(help: "After a pressure event, re-inflate only while MemAvailable stays above this (MiB).")
    var reinflateAboveMib: UInt64 = 192
    @Option(help: "PSI trigger: stall time (ms) of some task within the window that counts as pressure.")
    var psiStallMs: Int = 100
    @Option(help: "PSI trigger window (ms, 500-10000).")
    var psiWindowMs: Int = 1000
    @Option(help: "Where to publish state for `balloond status` (root-only JSON).")
    var stateFile: String = DaemonState.defaultPath
    @OptionGroup var logging: LoggingOptions

    func run() throws {
        let logger = try logging.makeLogger()
        let preflight = Preflight()
        try preflight.checkRoot()
        try preflight.checkLockdown()
        let function = try device.select()
        try preflight.run(for: function.address)
        let lock = try DeviceLock(address: function.address)
        defer { lock.unlock() }
        let binder = DriverBinder(logger: logger)
        let binding = try binder.bind(function.address)
        logger.info("device bound", metadata: ["binding": "\(binding)"])

        var exitError: Error?
        do {
            try serve(function: function, binding: binding, logger: logger)
        } catch {
            exitError = error
        }
        DaemonState.remove(at: stateFile)
        if keepBound {
            logger.info("leaving the device bound to uio_pci_generic (--keep-bound); `balloond unbind` restores \(binding.previousDriver ?? "the kernel's choice")")
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
    private func serve(function: PCIFunction, binding: UIOBinding, logger: Logger) throws {
        // Issue 9 H2: all memory the device may touch comes from these memfds, which the
        // guardian also holds until the device is stopped, even if this process is killed.
        let arena = try DeviceMemoryArena()
        let guardian = try GuardianLink.start(arena: arena, device: function.address, logLevel: logging.logLevel)
        let signals = try SignalPipe()
        let config = try SysfsConfigSpace(address: function.address)
        let line = try UIOInterruptLine(devicePath: binding.devicePath, config: config)
        let mapper = BARMapper(address: function.address)
        let transport = try ModernPCITransport(config: config, barSizes: function.barSizes, mapBAR: { (i) throws(PCIError) -> MMIORegion in try mapper.map(i) })
        defer { guardian.markQuiescedIfStopped(deviceStatus: transport.status().rawValue, config: config) }  // after driver.shutdown()
        // A balloond killed mid-round may have left the hugetlb pool grown: put it back before
        // our own ring page is taken from the pool.
        let recovery = try HugeTLBPoolSource.recoverAfterCrash(logger: logger)
        logger.debug("hugetlb pool recovery: \(recovery)")
        let compaction = CompactionHold(logger: logger)
        let (allocator, dmaDescription) = try makeDMAAllocator(arena: arena, migrationHold: compaction, logger: logger)
        logger.info("DMA memory", metadata: ["memory": "\(dmaDescription)"])
        let memoryConfig = GuestMemoryDebugConfig.detect(cmdline: readTextFile("/proc/cmdline") ?? "",
                                                         kernelConfig: readTextFile("/boot/config-\(kernelRelease())"))
        logger.info("guest memory debugging", metadata: ["config": "\(memoryConfig)", "poison": "\(memoryConfig.poisonPolicy)"])
        let hints = try makeHintSource(memoryConfig: memoryConfig, allocator: allocator, arena: arena, compaction: compaction, logger: logger)
        var options = BalloonDriverOptions(poisonPolicy: memoryConfig.poisonPolicy)
        if !freePageHint { options.wantedFeatures.remove(.freePageHint) }
        if !freePageReporting { options.wantedFeatures.remove(.reporting) }
        if allocator is PageDMAAllocator { options.maxQueueSize = 256 }
        options.pressure.deflateBelowAvailableBytes = deflateBelowMib << 20
        options.pressure.deflateStepBytes = deflateStepMib << 20
        options.pressure.holdSeconds = pressureHoldSeconds
        options.pressure.reinflateAboveAvailableBytes = reinflateAboveMib << 20
        options.pressure.psiStallMicroseconds = psiStallMs * 1000
        options.pressure.psiWindowMicroseconds = psiWindowMs * 1000
        options.reporting.keepFreeBytes = reportKeepFreeMib << 20
        options.reporting.releaseBelowFreeBytes = reportReleaseBelowMib << 20
        options.reporting.maxHeldBytes = reportMaxMib.map { $0 << 20 }
        let memory = balloon ? try makeBalloonMemory(arena: arena, compaction: compaction, logger: logger) : nil
        let driver = BalloonDriver(transport: transport, allocator: allocator, options: options,
                                   statsSource: ProcStatsSource(readFile: readTextFile), hintSource: freePageHint ? hints?.source : nil,
                                   balloonMemory: memory, memoryStatus: ProcMemoryStatus(readFile: readTextFile), logger: logger)
        driver.hintOptions.controlNoHints = hintControl
        if hintControl { logger.warning("--hint-control: hint rounds take memory but send no hints (control experiment)") }
        defer { driver.shutdown() }
        var psi: PressureTrigger?
        do {
            psi = try PressureTrigger(stallMicroseconds: options.pressure.psiStallMicroseconds, windowMicroseconds: options.pressure.psiWindowMicroseconds)
        } catch {
            logger.warning("no PSI memory trigger (\(error)); memory pressure is watched through MemAvailable only")
        }

        let started = wallClockSeconds()
        var restarts = 0
        var lastPublished: BalloonDriverStatus?
        var lastPublishTime = 0.0
        func publish(force: Bool = false) {
            let snapshot = driver.statusSnapshot()
            let now = wallClockSeconds()
            guard force || snapshot != lastPublished || now - lastPublishTime >= 5 else { return }
            let state = DaemonState(pid: getpid(), device: function.bdf, pciID: "\(hex4(function.vendorID)):\(hex4(function.deviceID))",
                                    previousDriver: binding.previousDriver, uioDevice: binding.devicePath, dmaMemory: dmaDescription,
                                    hintSource: hints?.name, startedAt: started, updatedAt: now, restarts: restarts, driver: snapshot)
            do { try state.write(to: stateFile) } catch { logger.warning("cannot publish state: \(error)") }
            lastPublished = snapshot
            lastPublishTime = now
        }

        var backoffSeconds = 1.0
        var needsBringUp = true
        while signals.received == 0 {
            if needsBringUp {
                do {
                    try allocator.verifyPlacement()
                    try driver.bringUp()
                    needsBringUp = false
                    backoffSeconds = 1
                    publish(force: true)
                } catch {
                    logger.error("device bring-up failed: \(error); retrying in \(Int(backoffSeconds)) s")
                    restarts += 1
                    publish(force: true)
                    signals.sleep(seconds: backoffSeconds)
                    backoffSeconds = min(backoffSeconds * 2, 30)
                    continue
                }
            }
            do {
                // Block on the uio fd, the PSI trigger and the signal pipe together, until the
                // driver's next deadline at the latest: no busy polling.
                var timeout: Int32 = 5000
                if let d = driver.nextDeadlineNanos {
                    let now = monotonicNanos()
                    timeout = d <= now ? 0 : Int32(min(5000, (d - now + 999_999) / 1_000_000))
                }
                let ready = try signals.wait(for: [(line.pollDescriptor, Int16(POLLIN)), (psi?.pollDescriptor, Int16(POLLPRI))], timeoutMilliseconds: timeout)
                if ready[0], try line.wait(timeoutMilliseconds: 0) {
                    try driver.serviceInterrupt(line: line)
                }
                try driver.tick(psiFired: ready[1])
                publish()
            } catch {
                logger.error("device error: \(error); resetting and re-initialising the device")
                restarts += 1
                needsBringUp = true
            }
        }
        logger.info("signal \(signals.received) received; stopping: resetting the device")
    }
}

/// SIGTERM/SIGINT/SIGHUP through a self-pipe, so the event loop can poll for them.
final class SignalPipe {
    private let readFD: Int32
    private let writeFD: Int32

    init() throws {
        var fds: [Int32] = [0, 0]
        guard unsafe pipe(&fds) == 0 else { throw Failure("pipe: \(String(cString: strerror(errno)))") }
        readFD = fds[0]
        writeFD = fds[1]
        for fd in fds {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
        guard bs_install_signal_pipe(writeFD) == 0 else { throw Failure("sigaction: \(String(cString: strerror(errno)))") }
    }

    deinit {
        close(readFD)
        close(writeFD)
    }

    /// The last signal received (0: none).
    var received: Int32 { bs_signal_received() }

    /// Waits until one of `fds` has its event, a signal arrives, or the timeout passes.
    /// Returns, per entry, whether it is ready (a nil descriptor never is).
    func wait(for fds: [(Int32?, Int16)], timeoutMilliseconds: Int32) throws -> [Bool] {
        var pfds = [pollfd(fd: readFD, events: Int16(POLLIN), revents: 0)]
        for (fd, events) in fds { pfds.append(pollfd(fd: fd ?? -1, events: events, revents: 0)) }
        let n = unsafe poll(&pfds, nfds_t(pfds.count), timeoutMilliseconds)
        if n < 0 {
            if errno == EINTR { return fds.map { _ in false } }
            throw Failure("poll: \(String(cString: strerror(errno)))")
        }
        return pfds.dropFirst().map { $0.fd >= 0 && $0.revents & ($0.events | Int16(POLLERR)) != 0 }
    }

    /// Sleeps, waking early on a signal.
    func sleep(seconds: Double) { _ = try? wait(for: [], timeoutMilliseconds: Int32(seconds * 1000)) }
}

extension RunCommand {
    /// Chooses and builds the free page source (`--hint-source`), logging the choice and why.
    func makeHintSource(memoryConfig: GuestMemoryDebugConfig, allocator: DMAAllocator, arena: DeviceMemoryArena, compaction: CompactionHold, logger: Logger) throws -> (name: String, source: FreePageSource)? {
        guard freePageHint else { return nil }
        let choice: (name: String, reason: String)
        switch chooseHintSource(requested: hintSource, hypervisor: detectHypervisor(),
                                memoryDebug: (pagePoisoning: memoryConfig.pagePoisoning, initOnFree: memoryConfig.initOnFree),
                                unsafeHintsOnKVM: unsafeHintsOnKVM, hugetlbAvailable: hugetlbHintSourceUsable()) {
        case .failure(let e): throw Failure(e.description)
        case .success(let c): choice = c
        }
        if choice.name == "hugetlb" || choice.name == "anonymous", isRunningUnderTCG() {
            // Measured (scripts/migrate.py, balloond:anonymous-control): taking and releasing
            // most free memory during a migration corrupted the TCG destination kernel in 3 of
            // 3 runs with no hint sent at all, the same list corruption the hinted runs and the
            // in-kernel driver showed. On KVM that churn is ordinary dirty logging.
            let why = "under QEMU TCG the owned sources' churn (taking and releasing most free memory during the migration) corrupts the destination kernel even when no hint is sent (control runs: 3 of 3)"
            if hintSource == "auto" {
                logger.warning("free page hinting disabled: auto chose \(choice.name) (\(choice.reason)), but \(why); pass --hint-source \(choice.name) to use it anyway")
                return nil
            }
            logger.warning("--hint-source \(choice.name) under TCG: \(why)")
        }
        logger.notice("free page hint source: \(choice.name): \(choice.reason)")
        let own = (allocator as? HugePageDMAAllocator).map { [GuestPhysicalRange(start: $0.region.physicalAddress, length: UInt64($0.region.size))] } ?? []
        let env = LinuxHintSourceEnvironment(pagemap: try PagemapResolver(), ownHugePages: own, limits: OwnedMemoryLimits(), arena: arena, compactionHold: compaction, logger: logger)
        return (choice.name, try makeLinuxFreePageSource(named: choice.name, environment: env))
    }
}

func kernelRelease() -> String {
    var u = utsname()
    uname(&u)
    return withUnsafeBytes(of: u.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
}

extension RunCommand {
    /// The balloon's memory (inflate and reporting): hugetlb surplus pages, else locked
    /// anonymous memory.
    func makeBalloonMemory(arena: DeviceMemoryArena, compaction: CompactionHold, logger: Logger) throws -> BalloonMemory? {
        let memory = makeLinuxBalloonMemory(pagemap: try PagemapResolver(), arena: arena, limits: OwnedMemoryLimits(), compactionHold: compaction, logger: logger)
        logger.info("balloon memory: \(memory.name)")
        return memory
    }
}
