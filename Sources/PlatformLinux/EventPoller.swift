#if canImport(Glibc)
import Glibc
#endif
import CBalloonShims
import SystemPackage
import VirtioCore

/// SIGTERM, SIGINT and SIGHUP through a self-pipe, so one poll(2) waits for them together with
/// the device. SIGPIPE is ignored. Closing the pipe first detaches the C handler from it, so a
/// signal arriving later cannot write into a descriptor number the process has reused.
public final class SignalPipe {
    public let readDescriptor: Int32
    private let writeDescriptor: Int32

    public init() throws(SystemCallError) {
        var fds: [Int32] = [0, 0]
        try Sys.call("pipe") { unsafe pipe(&fds) }
        readDescriptor = fds[0]
        writeDescriptor = fds[1]
        for fd in fds {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
        do {
            try Sys.call("sigaction") { bs_install_signal_pipe(writeDescriptor) }
        } catch {
            bs_uninstall_signal_pipe(writeDescriptor)
            _ = Glibc.close(readDescriptor)
            _ = Glibc.close(writeDescriptor)
            throw error
        }
    }

    deinit {
        bs_uninstall_signal_pipe(writeDescriptor)
        _ = Glibc.close(readDescriptor)
        _ = Glibc.close(writeDescriptor)
    }

    /// The last stop signal received (0: none).
    public var received: Int32 { bs_signal_received() }

    /// Empties the pipe (the signal number stays recorded in `received`).
    func drain() {
        var buffer = [UInt8](repeating: 0, count: 64)
        while unsafe Glibc.read(readDescriptor, &buffer, buffer.count) > 0 {}
    }

    /// Sleeps up to `milliseconds`, waking early on a signal.
    public func sleep(milliseconds: Int32) {
        var pfd = pollfd(fd: readDescriptor, events: Int16(POLLIN), revents: 0)
        _ = unsafe poll(&pfd, 1, milliseconds)
    }
}

/// The daemon's wait on Linux: one poll(2) over the signal pipe, the uio descriptor (POLLIN)
/// and the two PSI triggers (POLLPRI): the stall trigger and the early warning.
///
/// An error or hang-up on the uio descriptor is final: uio's poll returns an error mask once
/// the device is gone (uio_pci_generic unbound, the function removed), and every later read
/// fails, so retrying would only spin. It is reported as `PollerError.interruptSourceLost`.
public final class LinuxEventPoller: EventPoller {
    public let signals: SignalPipe
    public let interruptDescriptor: Int32?
    public let pressureDescriptor: Int32?
    public let earlyPressureDescriptor: Int32?

    public init(signals: SignalPipe, interruptDescriptor: Int32?, pressureDescriptor: Int32?, earlyPressureDescriptor: Int32? = nil) {
        self.signals = signals
        self.interruptDescriptor = interruptDescriptor
        self.pressureDescriptor = pressureDescriptor
        self.earlyPressureDescriptor = earlyPressureDescriptor
    }

    public var stopSignal: Int32 { signals.received }

    public func wait(timeout: Duration?) throws(PollerError) -> Readiness {
        var pfds = [
            pollfd(fd: signals.readDescriptor, events: Int16(POLLIN), revents: 0),
            pollfd(fd: interruptDescriptor ?? -1, events: Int16(POLLIN), revents: 0),
            pollfd(fd: pressureDescriptor ?? -1, events: Int16(POLLPRI), revents: 0),
            pollfd(fd: earlyPressureDescriptor ?? -1, events: Int16(POLLPRI), revents: 0),
        ]
        let milliseconds = pollTimeoutMilliseconds(timeout)
        let n = unsafe poll(&pfds, nfds_t(pfds.count), milliseconds)
        if n < 0 {
            let e = Glibc.errno
            if e == EINTR { return signals.received != 0 ? .stop : [] }
            throw .pollFailed(SystemCallError(call: "poll", path: nil, errno: Errno(rawValue: e)))
        }
        var ready: Readiness = []
        if pfds[0].revents != 0 {
            signals.drain()
            ready.insert(.stop)
        }
        let bad = Int16(POLLERR | POLLHUP | POLLNVAL)
        if interruptDescriptor != nil, pfds[1].revents & bad != 0 {
            throw .interruptSourceLost(revents: pfds[1].revents)
        }
        if pfds[1].revents & Int16(POLLIN) != 0 { ready.insert(.interrupt) }
        if pressureDescriptor != nil, pfds[2].revents & Int16(POLLPRI) != 0 { ready.insert(.pressure) }
        if earlyPressureDescriptor != nil, pfds[3].revents & Int16(POLLPRI) != 0 { ready.insert(.pressureEarly) }
        return ready
    }
}

/// A poll(2) timeout from a wait: rounded up to whole milliseconds (a deadline 0.3 ms away
/// must not become a zero-timeout spin), nil and anything beyond Int32 milliseconds mean forever.
public func pollTimeoutMilliseconds(_ timeout: Duration?) -> Int32 {
    guard let timeout else { return -1 }
    let ms = timeout.roundedUp(to: .milliseconds(1))
    return ms > Int64(Int32.max) ? -1 : Int32(ms)
}
