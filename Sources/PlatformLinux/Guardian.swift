#if canImport(Glibc)
import VirtioCore
import Glibc
#endif
import Logging
import VirtioPCI
import SystemPackage

// The guardian (issue 9 H2). balloond's worker (`balloond run`) spawns it before the first
// DMA allocation. It holds duplicates of the `DeviceMemoryArena` memfds, so no page the
// device may touch goes back to the kernel when the worker dies: on SIGKILL or an OOM kill
// the kernel frees a process's memory (exit_mm) before its files (exit_files), i.e. before
// uio_pci_generic's release() clears Bus Master. When the worker's channel closes without a
// "quiesced" byte, the guardian stops the device first (reset through BAR4's common config,
// and Bus Master off in config space) and only then lets the memory go; if both fail it
// keeps the memory and stays alive.

/// Bytes on the worker → guardian channel.
public enum GuardianMessage: UInt8, Sendable {
    /// The worker stopped the device itself (reset read back 0): memory may be dropped.
    case quiesced = 0x51  // "Q"
    /// The ring page grew `nr_hugepages` by one: shrink it after the memfds are closed.
    case poolGrown = 0x50  // "P"
    /// ... and the worker gave that page back itself.
    case poolRestored = 0x70  // "p"
}

/// The byte the guardian writes once it holds the memfds.
public let guardianReadyByte: UInt8 = 0x52  // "R"

/// Why the guardian could not act on the device.
public indirect enum GuardianDeviceError: Error, Hashable, Sendable, CustomStringConvertible {
    /// Config space or the resource file could not be opened or read.
    case platform(PlatformError)
    /// A config space access failed, or the BAR could not be mapped.
    case pci(PCIError)
    /// The device's virtio capability list is unusable.
    case capabilities(address: PCIAddress, VirtioCapabilityError)
    /// The common configuration structure does not fit in its BAR.
    case commonConfigOutsideBAR(VirtioStructureLocation)
    /// device_status did not read 0 within the timeout after writing 0.
    case resetTimedOut(address: PCIAddress, milliseconds: Int)
    /// Bus Master still reads as set after clearing it.
    case busMasterStillSet(address: PCIAddress)
    /// The device is bound to vfio-pci: its BARs are not the guardian's to map (the kernel
    /// revokes a sysfs BAR mapping once vfio-pci claims the BAR), so the device is stopped
    /// through Bus Master alone (vfio-pci's own release clears it too).
    case noBARAccessUnderVFIO(address: PCIAddress)
    /// `prepare` could not resolve device_status, config space, or both (nil: that part worked).
    case notPrepared(deviceStatus: GuardianDeviceError?, configSpace: PlatformError?)

    public var description: String {
        switch self {
        case .platform(let e):
            return e.description
        case .pci(let e):
            return e.description
        case .capabilities(let address, let e):
            return "virtio capabilities of \(address): \(e)"
        case .commonConfigOutsideBAR(let common):
            return "common config at \(common) is outside BAR\(common.bar)"
        case .resetTimedOut(let address, let milliseconds):
            return "device_status of \(address) did not read 0 within \(milliseconds) ms after the reset"
        case .busMasterStillSet(let address):
            return "Bus Master of \(address) is still set after clearing it"
        case .noBARAccessUnderVFIO(let address):
            return "\(address) is bound to vfio-pci: the guardian stops it through Bus Master only"
        case .notPrepared(let deviceStatus, let configSpace):
            return [deviceStatus.map { "device_status: \($0)" }, configSpace.map { "config space: \($0)" }]
                .compactMap { $0 }.joined(separator: "; ")
        }
    }
}

/// The device as the guardian sees it (real: `SysfsGuardedDevice`; tests: fakes).
public protocol GuardedDevice {
    /// Resolves and opens what `reset` and `clearBusMaster` need, so that after the worker's
    /// death they only touch the device: no file opens, no parsing, no mapping while the
    /// guest may be out of memory and the OOM killer is choosing its next victim.
    func prepare() throws(GuardianDeviceError)
    /// Writes device_status = 0 and reads until it is 0 (bounded).
    func reset() throws(GuardianDeviceError)
    /// Clears Bus Master (Command bit 2) in config space and checks it stayed clear.
    func clearBusMaster() throws(GuardianDeviceError)
}

/// What the guardian decided when the worker's channel closed.
public enum GuardianVerdict: Hashable, Sendable, CustomStringConvertible {
    /// The worker quiesced the device itself.
    case releaseClean
    /// The worker died; the device was stopped (by reset, Bus Master off, or both).
    case releaseAfterStop(reset: Bool, busMasterCleared: Bool)
    /// Neither worked: the device may still use the memory, so it is kept.
    case keepMemory(reset: GuardianDeviceError, busMaster: GuardianDeviceError)

    public var releasesMemory: Bool {
        if case .keepMemory = self { return false }
        return true
    }

    public var description: String {
        switch self {
        case .releaseClean: return "the worker quiesced the device; releasing its memory"
        case .releaseAfterStop(let r, let b):
            return "the worker died without quiescing the device; stopped it (\(r ? "reset" : "reset failed")\(b ? ", Bus Master cleared" : ", Bus Master not cleared")); releasing its memory"
        case .keepMemory(let r, let b):
            return "the worker died and the device could not be stopped (reset: \(r); Bus Master: \(b)); keeping its memory held so the device cannot corrupt memory the kernel reuses. Reset the device (e.g. rebind or reboot), then stop this process"
        }
    }
}

/// The guardian's decisions, pure: the bytes the worker sent, and what to do when the
/// channel closes.
public struct GuardianState: Hashable, Sendable {
    public private(set) var quiesced = false
    /// Ring pages by which the worker grew `nr_hugepages` and has not given back.
    public private(set) var poolPagesGrown = 0

    public init() {}

    /// Takes bytes read from the channel (unknown bytes are ignored).
    public mutating func receive(_ bytes: [UInt8]) {
        for b in bytes {
            switch GuardianMessage(rawValue: b) {
            case .quiesced: quiesced = true
            case .poolGrown: poolPagesGrown += 1
            case .poolRestored: poolPagesGrown = max(0, poolPagesGrown - 1)
            case nil: continue
            }
        }
    }

    /// The channel closed (the worker exited or was killed): stop the device unless the
    /// worker quiesced it. Both ways of stopping are tried; one success is enough.
    public func workerGone(device: GuardedDevice) -> GuardianVerdict {
        if quiesced { return .releaseClean }
        var resetError: GuardianDeviceError?
        var busMasterError: GuardianDeviceError?
        do { try device.reset() } catch { resetError = error }
        do { try device.clearBusMaster() } catch { busMasterError = error }
        if let resetError, let busMasterError { return .keepMemory(reset: resetError, busMaster: busMasterError) }
        return .releaseAfterStop(reset: resetError == nil, busMasterCleared: busMasterError == nil)
    }
}

extension GuardedDevice {
    public func prepare() throws(GuardianDeviceError) {}
}

/// The real device: BAR4's common config through `/sys/bus/pci/devices/<BDF>/resource<N>`
/// (located from the virtio capabilities in config space) and the Command register through
/// `/sys/bus/pci/devices/<BDF>/config`. `prepare` maps the one and opens the other once, at
/// the guardian's start; without it (or if it failed) they are resolved when needed.
public final class SysfsGuardedDevice: GuardedDevice {
    public let address: PCIAddress
    public let root: SysRoot
    /// device_status reads of at most this many milliseconds (QEMU resets synchronously).
    public var resetTimeoutMilliseconds = 100
    /// false under vfio: BAR4 is never mapped through sysfs (see `noBARAccessUnderVFIO`).
    public let barAccess: Bool
    private var statusWindow: (bar: MMIOWindow, offset: Int)?
    private var config: SysfsConfigSpace?

    public init(address: PCIAddress, root: SysRoot = .host, barAccess: Bool = true) {
        self.address = address
        self.root = root
        self.barAccess = barAccess
    }

    public func prepare() throws(GuardianDeviceError) {
        var statusError: GuardianDeviceError?
        var configError: PlatformError?
        if barAccess {
            do { statusWindow = try resolveStatus() } catch { statusError = error }
        }
        do { config = try SysfsConfigSpace(address: address, root: root) } catch { configError = error }
        if statusError != nil || configError != nil { throw .notPrepared(deviceStatus: statusError, configSpace: configError) }
    }

    /// BAR`n` mapped and the offset of device_status in it.
    private func resolveStatus() throws(GuardianDeviceError) -> (bar: MMIOWindow, offset: Int) {
        let config: SysfsConfigSpace
        let resources: [PCIResource]
        do {
            config = try SysfsConfigSpace(address: address, root: root, writable: false)
            resources = try readPCIResources(address, root: root)
        } catch { throw .platform(error) }
        let caps: VirtioCapabilities
        do { caps = try parseVirtioCapabilities(config, barSizes: resources.map { $0.isPresent ? $0.size : nil }) } catch {
            throw .capabilities(address: address, error)
        }
        let bar: MMIOWindow
        do { bar = try BARMapper(address: address, root: root).map(caps.common.bar) } catch { throw .pci(error) }
        let status = Int(caps.common.offset) + 20  // virtio_pci_common_cfg.device_status
        guard status < bar.length else { throw .commonConfigOutsideBAR(caps.common) }
        return (bar, status)
    }

    public func reset() throws(GuardianDeviceError) {
        guard barAccess else { throw .noBARAccessUnderVFIO(address: address) }
        let window: (bar: MMIOWindow, offset: Int)
        if let prepared = statusWindow { window = prepared } else { window = try resolveStatus() }
        let (bar, status) = window
        bar.write8(0, at: status)
        for _ in 0..<max(1, resetTimeoutMilliseconds) {
            if bar.read8(at: status) == 0 { return }
            Sys.sleep(microseconds: 1000)
        }
        throw .resetTimedOut(address: address, milliseconds: resetTimeoutMilliseconds)
    }

    public func clearBusMaster() throws(GuardianDeviceError) {
        let config: SysfsConfigSpace
        if let prepared = self.config { config = prepared } else {
            do { config = try SysfsConfigSpace(address: address, root: root) } catch { throw .platform(error) }
        }
        let stillSet: Bool
        do {
            let command = try config.read16(at: 4)
            try config.write16(command & ~0x4, at: 4)
            stillSet = try config.read16(at: 4) & 0x4 != 0
        } catch { throw .pci(error) }
        if stillSet { throw .busMasterStillSet(address: address) }
    }
}

/// The guardian's side: runs in the `balloond guardian` process until the worker is gone.
public enum GuardianProcess {
    /// Descriptor numbers the worker passes (`GuardianLink.start` arranges them).
    public static let channelFD: Int32 = 3
    public static let readyFD: Int32 = 4
    public static let smallMemfdFD: Int32 = 5
    public static let hugeMemfdFD: Int32 = 6

    /// Runs the guardian: protects itself (oom_score_adj -1000, SIGTERM/SIGINT/SIGHUP/SIGPIPE
    /// ignored), closes every other inherited descriptor, says it is ready, waits for the
    /// worker's channel to close, then acts on the verdict. Returns the exit status; does not
    /// return while the memory must be kept.
    ///
    /// - Parameter afterRelease: runs once the memory is released, with whether the worker had
    ///   quiesced the device itself (false: it was killed, so what it left behind, such as a
    ///   grown hugetlb pool, is for the caller to recover now rather than at the next start).
    public static func run(device: GuardedDevice, hasHugeMemfd: Bool, pool: HugePagePool, root: SysRoot = .host, logger: Logger,
                           afterRelease: ((_ workerQuiesced: Bool) -> Void)? = nil) -> Int32 {
        for s in [SIGTERM, SIGINT, SIGHUP, SIGPIPE] { _ = signal(s, SIG_IGN) }
        do { try Sys.writeAttribute(root.path("/proc/self/oom_score_adj"), "-1000\n") } catch {
            logger.warning("guardian: cannot set oom_score_adj to -1000: \(error)")
        }
        // Keep only our descriptors: an inherited uio fd would delay uio's release(), an
        // inherited lock fd would keep the device lock.
        var keep: Set<Int32> = [0, 1, 2, channelFD, readyFD, smallMemfdFD]
        if hasHugeMemfd { keep.insert(hugeMemfdFD) }
        if let fds = try? Sys.listDirectory("/proc/self/fd") {
            for name in fds { if let fd = Int32(name), !keep.contains(fd) { _ = close(fd) } }
        }
        // Everything the death path needs is resolved now, and the guardian runs first when
        // it wakes: after an OOM kill of the worker, the memory it holds is what the guest
        // needs, and the OOM killer picks its next victim within milliseconds.
        do { try device.prepare() } catch {
            logger.warning("guardian: cannot prepare the device now (\(error)); it is resolved again if the worker dies")
        }
        do { try Sys.setRealtimePriority(true) } catch {
            logger.warning("guardian: cannot raise its scheduling priority (\(error)); after an OOM kill of balloond the guest may lose a second process before the memory is back")
        }
        var memfds: [OpenFile] = [OpenFile(adopting: smallMemfdFD, path: "memfd:small")]
        if hasHugeMemfd { memfds.append(OpenFile(adopting: hugeMemfdFD, path: "memfd:huge")) }
        let channel = OpenFile(adopting: channelFD, path: "guardian channel")
        let ready = OpenFile(adopting: readyFD, path: "guardian ready")
        do { try ready.writeAll([guardianReadyByte]) } catch {
            logger.error("guardian: cannot tell the worker it is ready: \(error)")
        }
        ready.close()

        var state = GuardianState()
        while true {
            let bytes: [UInt8]
            do { bytes = try channel.read(count: 64) } catch {
                logger.error("guardian: reading the worker's channel failed: \(error); treating the worker as gone")
                break
            }
            if bytes.isEmpty { break }
            state.receive(bytes)
        }
        let verdict = state.workerGone(device: device)
        if !verdict.releasesMemory {
            logger.critical("guardian: \(verdict)")
            while true { pause() }
        }
        for f in memfds { f.close() }
        // The urgent part is over; logging and recovery run at normal priority.
        try? Sys.setRealtimePriority(false)
        if !state.quiesced { logger.warning("guardian: \(verdict)") }
        // Recovery first: it puts nr_hugepages back only while it still holds the value the
        // worker's hint source set, so the ring page's own +1 must not have been undone yet.
        afterRelease?(state.quiesced)
        for _ in 0..<state.poolPagesGrown {
            do { try pool.giveBackOne() } catch { logger.warning("guardian: cannot lower \(pool.countPath) after the ring page: \(error)") }
        }
        return 0
    }
}

/// Why the guardian could not be started.
public enum GuardianStartError: Error, Hashable, Sendable, CustomStringConvertible {
    /// `pipe` or `fcntl(F_DUPFD_CLOEXEC)` failed.
    case system(SystemCallError)
    /// `posix_spawn` of `executable` failed with `errno`.
    case spawnFailed(executable: String, errno: Errno)
    /// The guardian did not write its ready byte in time (it was killed).
    case notReady(pid: pid_t, milliseconds: Int32)

    public var description: String {
        switch self {
        case .system(let e):
            return e.description
        case .spawnFailed(let executable, let errno):
            return "posix_spawn of the guardian (\(executable)) failed: \(errno) (errno \(errno.rawValue))"
        case .notReady(let pid, let milliseconds):
            return "the guardian process (pid \(pid)) did not become ready within \(milliseconds) ms; balloond refuses to hand the device memory without it"
        }
    }
}

/// The worker's side: spawns the guardian with the arena's memfds, waits until it holds
/// them, and tells it about pool growth and, at a clean exit, that the device is quiesced.
/// Closing the channel (any exit, including SIGKILL) is what the guardian waits for.
public final class GuardianLink {
    public let pid: pid_t
    public let arena: DeviceMemoryArena
    private let channel: OpenFile

    private init(pid: pid_t, arena: DeviceMemoryArena, channel: OpenFile) {
        self.pid = pid
        self.arena = arena
        self.channel = channel
    }

    /// Spawns `executable arguments...` (by default this binary's `guardian` subcommand) with
    /// the channel, the ready pipe and the memfds as descriptors 3–6, and returns once the
    /// guardian said it is ready (within `readyTimeoutMilliseconds`). Call it before the first
    /// DMA allocation.
    ///
    /// - Parameter vfio: the device is bound to vfio-pci: the guardian stops it through Bus
    ///   Master only and never maps its BARs.
    public static func start(arena: DeviceMemoryArena, device: PCIAddress, root: SysRoot = .host, executable: String = "/proc/self/exe",
                             readyTimeoutMilliseconds: Int32 = 5000, logLevel: String = "info", vfio: Bool = false) throws(GuardianStartError) -> GuardianLink {
        func pipeCloexec() throws(GuardianStartError) -> (read: OpenFile, write: OpenFile) {
            var fds: [Int32] = [0, 0]
            guard unsafe pipe(&fds) == 0 else { throw .system(SystemCallError(call: "pipe", path: nil, errno: Errno(rawValue: errno))) }
            for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
            return (OpenFile(adopting: fds[0], path: "pipe"), OpenFile(adopting: fds[1], path: "pipe"))
        }
        let channel = try pipeCloexec()
        let ready = try pipeCloexec()
        var arguments = ["balloond-guardian", "guardian", "--device", device.bdf, "--log-level", logLevel]
        if !root.isHost { arguments += ["--sys-root", root.prefix] }
        if arena.huge != nil { arguments.append("--huge-memfd") }
        if vfio { arguments.append("--vfio") }

        var actions = unsafe posix_spawn_file_actions_t()
        unsafe posix_spawn_file_actions_init(&actions)
        defer { unsafe posix_spawn_file_actions_destroy(&actions) }
        // dup2 onto fixed numbers (clears CLOEXEC on the copies). The sources are all > 6 in
        // practice; to be safe against a source sitting on a target, dup them high first.
        var sources: [(Int32, Int32)] = [(channel.read.descriptor, GuardianProcess.channelFD), (ready.write.descriptor, GuardianProcess.readyFD),
                                         (arena.small.descriptor, GuardianProcess.smallMemfdFD)]
        if let h = arena.huge { sources.append((h.descriptor, GuardianProcess.hugeMemfdFD)) }
        var temporaries: [OpenFile] = []
        for (i, (fd, _)) in sources.enumerated() {
            let high = fcntl(fd, F_DUPFD_CLOEXEC, 100)
            guard high >= 0 else { throw .system(SystemCallError(call: "fcntl(F_DUPFD_CLOEXEC)", path: nil, errno: Errno(rawValue: errno))) }
            temporaries.append(OpenFile(adopting: high, path: "dup"))
            sources[i].0 = high
        }
        for (fd, target) in sources { unsafe posix_spawn_file_actions_adddup2(&actions, fd, target) }
        var pid: pid_t = 0
        // Unsafe: C strings owned here, freed once after posix_spawn copied them.
        var cArguments: [UnsafeMutablePointer<CChar>?] = unsafe arguments.map { unsafe strdup($0) } + [nil]
        defer { for unsafe a in unsafe cArguments { unsafe free(a) } }
        let rc = unsafe posix_spawn(&pid, executable, &actions, nil, &cArguments, environ)
        temporaries.forEach { $0.close() }
        channel.read.close()
        ready.write.close()
        guard rc == 0 else { throw .spawnFailed(executable: executable, errno: Errno(rawValue: rc)) }

        var pfd = pollfd(fd: ready.read.descriptor, events: Int16(POLLIN), revents: 0)
        var answer: [UInt8] = []
        if unsafe poll(&pfd, 1, readyTimeoutMilliseconds) > 0 { answer = (try? ready.read.read(count: 1)) ?? [] }
        guard answer == [guardianReadyByte] else {
            _ = kill(pid, SIGKILL)
            var status: Int32 = 0
            _ = unsafe waitpid(pid, &status, 0)
            throw .notReady(pid: pid, milliseconds: readyTimeoutMilliseconds)
        }
        let link = GuardianLink(pid: pid, arena: arena, channel: channel.write)
        arena.poolChangeObserver = { [weak link] grown in link?.send(grown ? .poolGrown : .poolRestored) }
        return link
    }

    private func send(_ message: GuardianMessage) {
        _ = try? channel.write([message.rawValue])
    }

    /// The device is stopped (reset read back 0) and nothing will restart it: the guardian
    /// may drop the memory once this process exits. Call it only then.
    public func markQuiesced() { send(.quiesced) }

    /// At a clean exit, after the driver's shutdown and before the previous driver is
    /// rebound: marks the device quiesced when it is stopped, i.e. device_status reads 0 or
    /// Bus Master is off (then it cannot reach memory). Otherwise (a failed reset) the
    /// guardian stops the device itself when this process exits, before freeing memory.
    @discardableResult
    public func markQuiescedIfStopped(deviceStatus: UInt8, config: PCIConfigSpace) -> Bool {
        let busMaster = ((try? config.read16(at: 4)) ?? 0x4) & 0x4 != 0
        guard deviceStatus == 0 || !busMaster else { return false }
        markQuiesced()
        return true
    }

    /// Closes the channel now (tests; a real worker just exits).
    public func closeChannel() { channel.close() }

    /// Waits for the guardian to exit (tests); returns its wait status.
    public func waitForExit() -> Int32 {
        var status: Int32 = 0
        while unsafe waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return status
    }
}
