// The seam between the daemon's event loop and the operating system's wait.

/// What woke the daemon's wait.
public struct Readiness: OptionSet, Sendable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// The device's interrupt descriptor is readable.
    public static let interrupt = Readiness(rawValue: 1 << 0)
    /// The memory-pressure (PSI) trigger fired.
    public static let pressure = Readiness(rawValue: 1 << 1)
    /// A stop signal arrived (SIGTERM, SIGINT, SIGHUP).
    public static let stop = Readiness(rawValue: 1 << 2)
    /// The early-warning PSI trigger fired (any stall at all): memory is being fought over,
    /// look now.
    public static let pressureEarly = Readiness(rawValue: 1 << 3)

    public var description: String {
        var parts: [String] = []
        if contains(.interrupt) { parts.append("interrupt") }
        if contains(.pressure) { parts.append("pressure") }
        if contains(.pressureEarly) { parts.append("pressure-early") }
        if contains(.stop) { parts.append("stop") }
        return parts.isEmpty ? "timeout" : parts.joined(separator: "+")
    }
}

/// Why the event source cannot be waited on any more.
public enum PollerError: Error, Equatable, CustomStringConvertible {
    /// The interrupt descriptor reported an error or hang-up (`revents`, poll(2)'s bits): the
    /// device went away (for example, somebody unbound uio_pci_generic).
    case interruptSourceLost(revents: Int16)
    /// poll(2) itself failed; the platform's error (PlatformLinux: a `SystemCallError`) keeps
    /// the errno.
    case pollFailed(any ErrorReason)

    /// What happened, without the leading "the interrupt source went away" or "waiting failed".
    public var reason: String {
        switch self {
        case .interruptSourceLost(let revents):
            return "poll on the uio descriptor returned revents 0x\(String(UInt16(bitPattern: revents), radix: 16)); was uio_pci_generic unbound or the device removed? Check `balloond list`, then run balloond again"
        case .pollFailed(let e):
            return e.description
        }
    }

    public var description: String {
        switch self {
        case .interruptSourceLost: return "the device's interrupt source went away: \(reason)"
        case .pollFailed: return "waiting for events failed: \(reason)"
        }
    }

    public static func == (a: PollerError, b: PollerError) -> Bool {
        switch (a, b) {
        case let (.interruptSourceLost(r1), .interruptSourceLost(r2)): return r1 == r2
        case let (.pollFailed(e1), .pollFailed(e2)): return AnyHashable(e1) == AnyHashable(e2)
        default: return false
        }
    }
}

/// The daemon's one blocking wait: the interrupt line, the PSI trigger and the stop signal
/// together. Real: `LinuxEventPoller` (PlatformLinux) over poll(2). Fake: a virtual-time
/// poller in the tests, which moves the clock instead of sleeping.
public protocol EventPoller: AnyObject {
    /// Blocks until something in `Readiness` happens or `timeout` passes (nil: no timeout;
    /// a real poller rounds it up to its own unit, so a wait not yet over never spins).
    /// Returns what is ready (empty: the timeout passed).
    func wait(timeout: Duration?) throws(PollerError) -> Readiness
    /// The stop signal received so far (0: none). Checked between steps and by long work.
    var stopSignal: Int32 { get }
}
