import ArgumentParser
import Logging
import PlatformLinux

struct UnbindCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unbind",
        abstract: "Give the balloon back to the driver it had before balloond bound it (e.g. virtio-pci).",
        discussion: "Refuses while a balloond is driving the device: stop it first (SIGTERM restores the driver on its own unless it ran with --keep-bound)."
    )

    @OptionGroup var device: DeviceOption
    @OptionGroup var logging: LoggingOptions

    func run() throws {
        let logger = try logging.makeLogger()
        try Preflight().checkRoot()
        let f = try device.select()
        let lock = try DeviceLock(address: f.address)
        defer { lock.unlock() }
        let binder = DriverBinder(logger: logger)
        let now = try binder.restore(f.address)
        print("\(f.bdf): now bound to \(now ?? "no driver")")
    }
}
