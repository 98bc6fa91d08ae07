import ArgumentParser
import Balloon
import BalloonSimulator
import FreePages
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
    @Option(help: "Guest RAM in MiB (a multiple of 4).") var ramMiB: UInt64 = 1024
    @Option(help: "Share of RAM the simulated guest has in use (0...1).") var used: Double = 0.3
    @Option(help: "Seed of the simulated buddy allocator's layout.") var seed: UInt64 = 1
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
        guard ramMiB % 4 == 0, ramMiB > 0, (0...1).contains(used) else { throw ValidationError("--ram-mib must be a positive multiple of 4 and --used within 0...1") }
        let buddy = SimulatedBuddyAllocator(bytes: ramMiB << 20, usedFraction: used, seed: seed)
        let driver = BalloonDriver(transport: try device.makeTransport(), allocator: device.makeDMAAllocator(),
                                   options: BalloonDriverOptions(poisonPolicy: policy), statsSource: stats, hintSource: buddy, logger: logger)
        do { try driver.bringUp() } catch { throw Failure.simulatorBringUp(error) }
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
            let freeMiB = (buddy.freePages * 4096) >> 20
            device.startHintRound()
            try service()
            let ranges = device.hintedRanges[device.hintCmdID] ?? []
            let bytes = ranges.reduce(UInt64(0)) { $0 + $1.length }
            print("hint        \(FreePageHintCommand.round(device.hintCmdID)): \(ranges.count) hints, \(bytes >> 20) MiB of \(freeMiB) MiB free, ids sent \(device.receivedHintIDs.map { "0x" + String($0, radix: 16) })")
            print("hint        first hint \(driver.counters.lastRoundFirstHintMicros ?? -1) us, STOP \(driver.counters.lastRoundStopMicros ?? -1) us after the cmd id")
            print("hint        holding \(buddy.heldBytes >> 20) MiB until DONE")
            device.finishHinting()
            try service()
            print("hint        DONE: holding \(buddy.heldBytes >> 20) MiB, \(buddy.released.count) blocks released")
        }
        driver.shutdown()
        print("shutdown    device status \(device.status)")
    }
}
