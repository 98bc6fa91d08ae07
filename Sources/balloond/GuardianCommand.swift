import ArgumentParser
import Logging
import PlatformLinux

/// `balloond guardian` (hidden): the process `balloond run` spawns to hold its device memory
/// (issue 9 H2). See `GuardianProcess` and `GuardianLink`; it is not meant to be run by hand.
struct GuardianCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "guardian",
        abstract: "Internal: holds `balloond run`'s device memory and stops the device if the worker dies.",
        shouldDisplay: false
    )

    @Option(help: "PCI address of the device the worker drives.")
    var device: String
    @Option(help: "Directory standing in for / (tests).")
    var sysRoot: String = "/"
    @Flag(help: "Descriptor 6 is the hugetlbfs memfd.")
    var hugeMemfd = false
    @OptionGroup var logging: LoggingOptions

    func run() throws {
        let logger = try logging.makeLogger(label: "balloond.guardian")
        guard let address = PCIAddress(device) else { throw ValidationError("'\(device)' is not a PCI address") }
        let root = SysRoot(sysRoot)
        let status = GuardianProcess.run(device: SysfsGuardedDevice(address: address, root: root), hasHugeMemfd: hugeMemfd,
                                         pool: HugePagePool(root: root), root: root, logger: logger)
        if status != 0 { throw ExitCode(status) }
    }
}
