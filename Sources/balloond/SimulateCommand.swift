import ArgumentParser
import Balloon
import BalloonSimulator
import VirtioCore
import VirtioPCI

struct SimulateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "simulate",
        abstract: "Run balloond's driver against the built-in model of QEMU 7.2's virtio-balloon device.",
        discussion: """
        Needs no VM and no root. Brings the simulated device up exactly as `run` brings up real \
        hardware (same transport code, same register offsets), then plays the host side: a new \
        balloon target, a stats request, and a free page hint round, and prints what the device saw.
        """
    )

    @Flag(help: "Simulate free-page-hint=on.") var freePageHint = false
    @Flag(help: "Simulate free-page-reporting=on.") var freePageReporting = false
    @Flag(help: "Simulate deflate-on-oom=on.") var deflateOnOOM = false
    @Flag(inversion: .prefixedNo, help: "Simulate page-poison (QEMU's default is on).") var pagePoison = true
    @Flag(help: "Simulate a modern-only device (1af4:1045).") var modernOnly = false
    @Option(help: "Guest page poisoning to assume: none, poison, init-on-free.") var poisonPolicy: String = "none"
    @Option(help: "Guest RAM in MiB.") var ramMiB: UInt64 = 1024
    @OptionGroup var logging: LoggingOptions

    func run() throws {
        let logger = try logging.makeLogger()
        let policy: PagePoisonPolicy
        switch poisonPolicy {
        case "none": policy = .none
        case "poison": policy = .poison
        case "init-on-free": policy = .initOnFree
        default: throw ValidationError("--poison-policy must be none, poison or init-on-free")
        }
        let props = BalloonDeviceProperties(freePageHint: freePageHint, freePageReporting: freePageReporting, deflateOnOOM: deflateOnOOM,
                                            pagePoison: pagePoison, modernOnly: modernOnly, ramSize: ramMiB << 20)
        let device = SimulatedBalloonDevice(properties: props)
        let line = device.makeInterruptLine()
        let stats = ProcStatsSource(readFile: readTextFile)
        let driver = BalloonDriver(transport: try device.makeTransport(), allocator: device.makeDMAAllocator(),
                                   options: BalloonDriverOptions(poisonPolicy: policy), statsSource: stats, logger: logger)
        do { try driver.bringUp() } catch { throw Failure("bring-up against the simulator failed: \(error)") }
        func service() throws {
            while try line.wait(timeoutMilliseconds: 0) { try driver.serviceInterrupt(line: line) }
        }
        print("device      \(modernOnly ? "1af4:1045 (modern-only)" : "1af4:1002 (transitional)")")
        print("status      \(device.status)")
        print("offered     \(props.offeredFeatures)")
        print("negotiated  \(device.negotiatedFeatures)")
        print("poison_val  \(driver.poisonValue.map { "0x" + String($0, radix: 16) } ?? "not negotiated")")
        for q in driver.statusSnapshot().queues {
            print("queue \(q.index)     \(q.role), size \(q.size), enabled \(q.enabled)")
        }
        print("stats       \(device.stats.count) tags primed before DRIVER_OK")
        device.setTarget(bytes: (ramMiB / 2) << 20)
        try service()
        print("target      num_pages \(driver.targetPages) after QMP balloon \(ramMiB / 2)M (config interrupt)")
        device.requestStats()
        try service()
        print("stats       refilled: \(device.statsUpdates) buffers received, one held")
        if freePageHint {
            device.startHintRound()
            try service()
            print("hint        cmd id \(driver.hintCommand) received")
        }
        driver.shutdown()
        print("shutdown    device status \(device.status)")
    }
}
