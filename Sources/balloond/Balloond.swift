import ArgumentParser
import Logging

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
struct Failure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
