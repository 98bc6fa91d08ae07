import ArgumentParser
import Logging
import GuestMemoryLinux
import HintSourcesLinux
import BalloonMemoryLinux
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
    @Flag(help: "The device is bound to vfio-pci: stop it through Bus Master only (its BARs belong to vfio).")
    var vfio = false
    @OptionGroup var logging: LoggingOptions

    func run() throws {
        let logger = try logging.makeLogger(label: "balloond.guardian")
        guard let address = PCIAddress(device) else { throw ValidationError("'\(device)' is not a PCI address") }
        let root = SysRoot(sysRoot)
        let worker = Sys.parentProcessID
        let status = GuardianProcess.run(device: SysfsGuardedDevice(address: address, root: root, barAccess: !vfio), hasHugeMemfd: hugeMemfd,
                                         pool: HugePagePool(root: root), root: root, logger: logger) { quiesced in
            guard !quiesced else { return }
            // A killed worker may have grown the hugetlb pool for a hint round or changed
            // sysctls: put them back now, not at the next start (which may never come, and the
            // guest needs that memory now). Recovery treats the worker as gone once it is a
            // zombie; wait for that briefly.
            for _ in 0..<50 where worker > 1 && Sys.processIsLive(worker, procRoot: root.path("/proc")) { Sys.sleep(microseconds: 100_000) }
            do { _ = try recoverAfterCrash(root: root, logger: logger) } catch {
                logger.error("guardian: recovery after the worker's death failed: \(error); the next balloond start retries it")
            }
        }
        if status != 0 { throw ExitCode(status) }
    }
}

