import ArgumentParser
import Logging
import Balloon
import HintSourcesLinux
import PlatformLinux
import VirtioCore

@main
struct Balloond: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "balloond",
        abstract: "A userspace virtio-balloon driver: free page hinting for faster live migration, from inside the guest.",
        discussion: """
        balloond runs as root inside a QEMU guest. It binds the virtio-balloon PCI function \
        (1af4:1002 or 1af4:1045) to uio_pci_generic, maps its BAR4, and drives the device from \
        userspace: feature negotiation, queues in hugepage DMA memory, stats, and free page hints.

        Typical use:
          balloond list            show balloon devices and whether balloond can use them
          balloond run             bind the device and drive it until SIGTERM/SIGINT
          balloond status          show the running instance's device, features, queues, counters
          balloond unbind          give the device back to its previous driver (e.g. virtio-pci)
          balloond simulate        run the driver against the built-in QEMU 7.2 device model
          balloond scan            measure the kpageflags free page scan (free memory found, ms per GiB)
        """,
        version: "0.1.0",
        subcommands: [RunCommand.self, ListCommand.self, StatusCommand.self, UnbindCommand.self, SimulateCommand.self, ScanCommand.self, GuardianCommand.self]
    )
}

/// Options shared by the commands that log.
struct LoggingOptions: ParsableArguments {
    @Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func makeLogger(label: String = "balloond") throws -> Logger {
        guard let level = Logger.Level(rawValue: logLevel.lowercased()) else {
            throw ValidationError("unknown log level '\(logLevel)'; use trace, debug, info, notice, warning, error or critical")
        }
        var logger = Logger(label: label) { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = level
        return logger
    }
}

/// A failure that ends the command with a message and a non-zero exit, without a stack dump.
/// Each case keeps what went wrong (and the underlying error, with its errno); `description`
/// is the one line the command prints.
enum Failure: Error, CustomStringConvertible {
    /// `--device` is not a PCI address.
    case notAPCIAddress(String)
    /// `--device` names a function that is not a virtio balloon.
    case notAVirtioBalloon(bdf: String, vendor: UInt16, device: UInt16)
    /// The guest has no virtio balloon.
    case noBalloon
    /// The guest has several balloons and `--device` was not given.
    case severalBalloons(bdfs: [String])
    /// The state file could not be read safely.
    case stateFile(StateFileError)
    /// There is no state file at `path`.
    case noState(path: String)
    /// The file at `path` is not a state file balloond wrote.
    case notAStateFile(path: String, DaemonStateProblem)
    /// The state file names a process that is gone.
    case notRunning(pid: Int32, stateFile: String)
    /// /proc/meminfo could not be opened.
    case noMeminfo(SystemCallError)
    /// The daemon's wait for device events failed (the interrupt source went away, or poll).
    case eventWait(PollerError)
    /// `--hint-source` cannot be used in this guest.
    case hintSource(HintSourceSelectionError)
    /// The driver could not bring up the simulated device.
    case simulatorBringUp(BalloonError)

    var description: String {
        switch self {
        case .notAPCIAddress(let device):
            return "'\(device)' is not a PCI address; use the form 0000:00:03.0 (see `balloond list`)"
        case .notAVirtioBalloon(let bdf, let vendor, let device):
            return "\(bdf) is \(hex4(vendor)):\(hex4(device)), not a virtio balloon (1af4:1002 or 1af4:1045); balloond refuses other devices"
        case .noBalloon:
            return "no virtio-balloon PCI device found (1af4:1002 or 1af4:1045); start the VM with `-device virtio-balloon-pci`"
        case .severalBalloons(let bdfs):
            return "\(bdfs.count) virtio balloons found (\(bdfs.joined(separator: ", "))); choose one with --device"
        case .stateFile(let e):
            return e.description
        case .noState(let path):
            return "no balloond state at \(path): is `balloond run` running? (the file is readable by root only)"
        case .notAStateFile(let path, let problem):
            return "\(path) is not a balloond state file: \(problem)"
        case .notRunning(let pid, let stateFile):
            return "balloond (pid \(pid)) is not running any more; its last state is in \(stateFile)"
        case .noMeminfo(let e):
            return "cannot open /proc/meminfo (\(e)); balloond needs procfs mounted at /proc"
        case .eventWait(let e):
            switch e {
            case .interruptSourceLost: return "the device's interrupt source went away (\(e.reason)); balloond cannot drive it"
            case .pollFailed: return "waiting for device events failed: \(e.reason)"
            }
        case .hintSource(let e):
            return e.description
        case .simulatorBringUp(let e):
            return "bring-up against the simulator failed: \(e)"
        }
    }
}

/// Why a file is not a state file balloond wrote.
enum DaemonStateProblem: CustomStringConvertible {
    /// A top-level key balloond does not write.
    case unknownKey(String)
    /// The JSON does not decode (the decoder's error).
    case undecodable(any Error)
    /// The pid is not a process id.
    case badPID(Int32)
    /// startedAt or updatedAt is not a finite, non-negative time.
    case badTime(key: String, Double)
    /// restarts is negative.
    case badRestarts(Int)

    var description: String {
        switch self {
        case .unknownKey(let key): return "unknown key '\(key.prefix(64))'"
        case .undecodable(let error): return "\(error)"
        case .badPID(let pid): return "pid \(pid) is not a process id"
        case .badTime(let key, let t): return "\(key) is \(t), not a time"
        case .badRestarts(let n): return "restarts is \(n)"
        }
    }
}
