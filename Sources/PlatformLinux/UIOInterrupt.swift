#if canImport(Glibc)
import VirtioCore
import Glibc
#endif
import SystemPackage
import VirtioPCI

/// The balloon's INTx line through uio_pci_generic (Linux 6.1 `drivers/uio/uio_pci_generic.c`,
/// docs/virtio-balloon.md §1.4, docs/userspace-pci.md §1 and §3).
///
/// - The kernel's handler masks INTx (sets Command bit 10 via `pci_check_and_mask_intx`) and
///   bumps the uio event count; `read(/dev/uioN)` returns that 32-bit count.
/// - `write(/dev/uioN)` is `-ENOSYS` (no `irqcontrol`), so `unmask` clears INTx-Disable in
///   the PCI Command register through config space, keeping Bus Master set: QEMU disables
///   the device and clears DRIVER_OK on any Command write without it.
/// - The last close of /dev/uioN runs uio_pci_generic's `release()`, which clears Bus
///   Master. Keep this object alive for the whole run.
///
/// Driver loop order: wait → read the ISR (clears it, deasserts INTx) → handle → unmask →
/// re-check the rings.
public final class UIOInterruptLine: InterruptLine {
    public let devicePath: String
    private let file: OpenFile
    private let config: PCIConfigSpace
    /// The last event count read (the number of interrupts since the uio device appeared).
    public private(set) var eventCount: UInt32?

    /// Opens `devicePath` (from `UIOBinding.devicePath`) and checks it is a character device.
    ///
    /// - Parameters:
    ///   - config: the function's config space (normally a `SysfsConfigSpace`), for unmask.
    ///   - requireCharacterDevice: false only in tests with a fake tree.
    public init(devicePath: String, config: PCIConfigSpace, requireCharacterDevice: Bool = true) throws(PlatformError) {
        self.devicePath = devicePath
        self.config = config
        let mode: mode_t
        do {
            file = try OpenFile(path: devicePath, flags: O_RDWR | O_NONBLOCK)
            mode = try file.status().st_mode
        } catch { throw .uioDeviceMissing(bdf: devicePath, .cannotOpen(path: devicePath, error)) }
        if requireCharacterDevice && (mode & S_IFMT) != S_IFCHR {
            throw .uioDeviceMissing(bdf: devicePath, .notACharacterDevice(path: devicePath))
        }
    }

    /// The uio descriptor: readable when an interrupt has arrived.
    public var pollDescriptor: Int32? { file.descriptor }

    /// Polls the descriptor for up to `timeoutMilliseconds` (negative: forever; 0: check),
    /// and on readiness reads the 4-byte event count. A signal during the wait returns
    /// false, so the caller's loop can look at its signal pipe.
    public func wait(timeoutMilliseconds: Int) throws(TransportError) -> Bool {
        var pfd = pollfd(fd: file.descriptor, events: Int16(POLLIN), revents: 0)
        let timeout = Int32(clamping: timeoutMilliseconds < 0 ? -1 : timeoutMilliseconds)
        let r = unsafe poll(&pfd, 1, timeout)
        if r < 0 {
            if Glibc.errno == EINTR { return false }
            throw failure(.pollFailed(SystemCallError(call: "poll", path: devicePath, errno: Errno(rawValue: Glibc.errno))))
        }
        if r == 0 { return false }
        if pfd.revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 && pfd.revents & Int16(POLLIN) == 0 {
            throw failure(.deviceGone(path: devicePath, revents: pfd.revents))
        }
        let bytes: [UInt8]
        do { bytes = try file.read(count: 4) } catch {
            if error.errno == .wouldBlock || error.errno == .resourceTemporarilyUnavailable { return false }
            throw failure(.readFailed(path: devicePath, error))
        }
        guard bytes.count == 4 else { throw failure(.shortRead(path: devicePath, got: bytes.count)) }
        eventCount = UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24
        return true
    }

    /// Clears INTx-Disable (Command bit 10) and keeps Bus Master (bit 2) and memory decode
    /// (bit 1) set, in one read-modify-write; writes nothing when already so.
    public func unmask() throws(TransportError) {
        do {
            let cmd = try config.read16(at: PCIConfig.command)
            let want = (cmd & ~PCIConfig.commandINTxDisable) | PCIConfig.commandBusMaster | PCIConfig.commandMemory
            if want != cmd { try config.write16(want, at: PCIConfig.command) }
        } catch { throw .pci(error) }
    }

    /// TransportError has no interrupt case; the uio device's failures are reported as a
    /// config-space access failure on the Status register (whose Interrupt bit is what uio
    /// reports), with a reason that names /dev/uioN.
    private func failure(_ problem: UIOProblem) -> TransportError {
        .pci(.configAccess(offset: PCIConfig.status, reason: problem))
    }
}

/// Why waiting for a uio interrupt failed (the reason inside the `PCIError.configAccess` on the
/// Status register that `UIOInterruptLine.wait` throws).
public enum UIOProblem: Error, Hashable, Sendable, CustomStringConvertible {
    /// poll(2) on /dev/uioN failed.
    case pollFailed(SystemCallError)
    /// poll reported POLLERR/POLLHUP/POLLNVAL without POLLIN: the uio device went away.
    case deviceGone(path: String, revents: Int16)
    /// Reading the event count failed.
    case readFailed(path: String, SystemCallError)
    /// The read returned `got` bytes instead of the 4-byte event count.
    case shortRead(path: String, got: Int)

    public var description: String {
        switch self {
        case .pollFailed(let e):
            return e.description
        case .deviceGone(let path, let revents):
            return "\(path) reported an error (revents 0x\(String(revents, radix: 16))): the uio device went away; was uio_pci_generic unbound?"
        case .readFailed(let path, let e):
            return "reading the event count from \(path) failed: \(e)"
        case .shortRead(let path, let got):
            return "read \(got) bytes from \(path), expected the 4-byte event count"
        }
    }
}
