import VirtioCore

/// `struct virtio_pci_common_cfg` offsets (virtio 1.2 §4.1.4.3).
public enum CommonConfig {
    public static let deviceFeatureSelect = 0
    public static let deviceFeature = 4
    public static let driverFeatureSelect = 8
    public static let driverFeature = 12
    public static let msixConfig = 16
    public static let numQueues = 18
    public static let deviceStatus = 20
    public static let configGeneration = 21
    public static let queueSelect = 22
    public static let queueSize = 24
    public static let queueMSIXVector = 26
    public static let queueEnable = 28
    public static let queueNotifyOff = 30
    public static let queueDescLow = 32
    public static let queueDescHigh = 36
    public static let queueDriverLow = 40
    public static let queueDriverHigh = 44
    public static let queueDeviceLow = 48
    public static let queueDeviceHigh = 52
    public static let queueNotifyData = 56
    public static let queueReset = 58
    /// Size of the structure up to queue_reset.
    public static let length = 60
}

/// The modern virtio-pci transport (virtio 1.2 §4.1), over a PCI config space and the
/// function's mapped BARs. Works the same over a real BAR4 and the simulator's registers.
public final class ModernPCITransport: VirtioTransport {
    public let config: PCIConfigSpace
    public let capabilities: VirtioCapabilities
    public let pciDeviceID: UInt16
    public let virtioDeviceType: UInt16
    let common: MMIORegion
    let notifyRegion: MMIORegion
    let isr: MMIORegion
    let device: MMIORegion?
    /// `queue_notify_off × multiplier` per queue, cached at enable (SPDK/DPDK do the same).
    private var notifyOffsets: [UInt16: Int] = [:]
    private let pauseMicroseconds: (Int) -> Void
    /// The MSI-X vectors to program (vfio with MSI-X enabled); nil: INTx, vectors left alone.
    public var msixVectors: MSIXVectorPlan?

    /// Parses the capabilities and builds register windows.
    ///
    /// - Parameters:
    ///   - config: the function's config space.
    ///   - barSizes: sizes of BARs 0–5 (nil where absent).
    ///   - mapBAR: maps a BAR on demand (only BARs the capabilities name are asked for).
    ///   - pause: waits between register polls (microseconds); the platform's sleep.
    public init(config: PCIConfigSpace, barSizes: [UInt64?], mapBAR: (Int) throws(PCIError) -> MMIORegion,
                pause: @escaping (Int) -> Void) throws(TransportError) {
        self.config = config
        self.pauseMicroseconds = pause
        let vendor: UInt16, dev: UInt16, subsystem: UInt16
        do {
            vendor = try config.read16(at: PCIConfig.vendorID)
            dev = try config.read16(at: PCIConfig.deviceID)
            subsystem = try config.read16(at: PCIConfig.subsystemID)
        } catch { throw .pci(error) }
        // Any virtio-pci function (virtio 1.2 §4.1.2): modern IDs are 0x1040 + the device
        // type; transitional ones (0x1000-0x103f) carry the type in the subsystem ID. Which
        // device type a driver accepts is the driver's business, not the transport's.
        guard vendor == PCIConfig.virtioVendor, (0x1000...0x107f).contains(dev) else {
            throw .notAVirtioDevice(vendor: vendor, device: dev)
        }
        pciDeviceID = dev
        virtioDeviceType = dev >= 0x1040 ? dev - 0x1040 : subsystem
        do { capabilities = try parseVirtioCapabilities(config, barSizes: barSizes) } catch { throw .capabilities(error) }
        var bars: [Int: MMIORegion] = [:]
        func window(_ loc: VirtioStructureLocation) throws(TransportError) -> MMIORegion {
            let bar: MMIORegion
            if let b = bars[loc.bar] { bar = b } else {
                do { bar = try mapBAR(loc.bar) } catch { throw .pci(error) }
                bars[loc.bar] = bar
            }
            guard Int(loc.offset) + Int(loc.length) <= bar.length else {
                throw .pci(.bar(index: loc.bar, reason: PCIAccessProblem.shorterThanStructure(mapped: bar.length, structureEnd: Int(loc.offset) + Int(loc.length))))
            }
            return MMIOSubregion(parent: bar, base: Int(loc.offset), length: Int(loc.length))
        }
        common = try window(capabilities.common)
        guard common.length >= CommonConfig.queueReset else {
            throw .capabilities(.lengthTooSmall(at: capabilities.common.capabilityOffset, type: 1, length: common.length, minimum: CommonConfig.queueReset))
        }
        notifyRegion = try window(capabilities.notify)
        isr = try window(capabilities.isr)
        device = try capabilities.device.map { (loc) throws(TransportError) in try window(loc) }
    }

    // MARK: features

    public func deviceFeatures() -> FeatureBits {
        common.write32(0, at: CommonConfig.deviceFeatureSelect)
        let low = common.read32(at: CommonConfig.deviceFeature)
        common.write32(1, at: CommonConfig.deviceFeatureSelect)
        let high = common.read32(at: CommonConfig.deviceFeature)
        return FeatureBits(low: low, high: high)
    }

    public func setDriverFeatures(_ features: FeatureBits) {
        common.write32(0, at: CommonConfig.driverFeatureSelect)
        common.write32(features.low, at: CommonConfig.driverFeature)
        common.write32(1, at: CommonConfig.driverFeatureSelect)
        common.write32(features.high, at: CommonConfig.driverFeature)
    }

    public func driverFeatures() -> FeatureBits {
        common.write32(0, at: CommonConfig.driverFeatureSelect)
        let low = common.read32(at: CommonConfig.driverFeature)
        common.write32(1, at: CommonConfig.driverFeatureSelect)
        let high = common.read32(at: CommonConfig.driverFeature)
        return FeatureBits(low: low, high: high)
    }

    // MARK: status

    public func status() -> DeviceStatus { DeviceStatus(rawValue: common.read8(at: CommonConfig.deviceStatus)) }
    public func setStatus(_ status: DeviceStatus) { common.write8(status.rawValue, at: CommonConfig.deviceStatus) }
    public func configGeneration() -> UInt8 { common.read8(at: CommonConfig.configGeneration) }

    // MARK: queues

    public var numQueues: UInt16 { common.read16(at: CommonConfig.numQueues) }

    public func queueSize(_ queue: UInt16) -> UInt16 {
        common.write16(queue, at: CommonConfig.queueSelect)
        return common.read16(at: CommonConfig.queueSize)
    }

    public func enableQueue(_ queue: UInt16, size: UInt16, descriptors: PhysicalAddress, driver: PhysicalAddress, device: PhysicalAddress) throws(TransportError) {
        let n = numQueues
        guard queue < n else { throw .queueIndexOutOfRange(queue: queue, numQueues: n) }
        common.write16(queue, at: CommonConfig.queueSelect)
        guard common.read16(at: CommonConfig.queueSize) != 0 else { throw .queueUnavailable(queue: queue) }
        common.write16(size, at: CommonConfig.queueSize)
        // 64-bit fields as two 32-bit halves, low first (virtio 1.2 §4.1.3.1).
        common.write32(UInt32(truncatingIfNeeded: descriptors.value), at: CommonConfig.queueDescLow)
        common.write32(UInt32(truncatingIfNeeded: descriptors.value >> 32), at: CommonConfig.queueDescHigh)
        common.write32(UInt32(truncatingIfNeeded: driver.value), at: CommonConfig.queueDriverLow)
        common.write32(UInt32(truncatingIfNeeded: driver.value >> 32), at: CommonConfig.queueDriverHigh)
        common.write32(UInt32(truncatingIfNeeded: device.value), at: CommonConfig.queueDeviceLow)
        common.write32(UInt32(truncatingIfNeeded: device.value >> 32), at: CommonConfig.queueDeviceHigh)
        let notifyOff = Int(common.read16(at: CommonConfig.queueNotifyOff))
        let offset = notifyOff * Int(capabilities.notifyOffMultiplier)
        guard offset + 2 <= notifyRegion.length else { throw .notifyOutOfRange(queue: queue, offset: offset) }
        notifyOffsets[queue] = offset
        if let plan = msixVectors {
            let vector = plan.vector(forQueue: queue)
            common.write16(vector, at: CommonConfig.queueMSIXVector)
            let got = common.read16(at: CommonConfig.queueMSIXVector)
            guard got == vector else { throw .msixVectorRejected(source: "queue \(queue)", vector: vector, got: got) }
        }
        // Only ever write 1: QEMU marks the device broken for any other value.
        common.write16(1, at: CommonConfig.queueEnable)
        guard common.read16(at: CommonConfig.queueEnable) == 1 else { throw .queueEnableDidNotStick(queue: queue) }
    }

    public func queueEnabled(_ queue: UInt16) -> Bool {
        common.write16(queue, at: CommonConfig.queueSelect)
        return common.read16(at: CommonConfig.queueEnable) == 1
    }

    public func notify(queue: UInt16) throws(TransportError) {
        guard let offset = notifyOffsets[queue] else { throw .queueUnavailable(queue: queue) }
        // QEMU decodes the queue from the address; the value is the queue index by convention.
        notifyRegion.write16(queue, at: offset)
    }

    // MARK: interrupts

    /// With MSI-X: the config vector into `msix_config`, read back (a device reset sets it to
    /// NO_VECTOR, so this runs at every bring-up).
    public func setUpInterrupts() throws(TransportError) {
        guard let plan = msixVectors else { return }
        common.write16(plan.configVector, at: CommonConfig.msixConfig)
        let got = common.read16(at: CommonConfig.msixConfig)
        guard got == plan.configVector else { throw .msixVectorRejected(source: "config", vector: plan.configVector, got: got) }
    }

    // MARK: ISR and device config

    public func readISR() -> ISRStatus { ISRStatus(rawValue: isr.read8(at: 0)) }

    public var deviceConfigLength: Int { device?.length ?? 0 }

    public func readDeviceConfig32(at offset: Int) throws(TransportError) -> UInt32 {
        guard let device, offset >= 0, offset % 4 == 0, offset + 4 <= device.length else { throw .deviceConfigOutOfRange(offset: offset, length: 4) }
        return device.read32(at: offset)
    }

    public func writeDeviceConfig32(_ value: UInt32, at offset: Int) throws(TransportError) {
        guard let device, offset >= 0, offset % 4 == 0, offset + 4 <= device.length else { throw .deviceConfigOutOfRange(offset: offset, length: 4) }
        device.write32(value, at: offset)
    }

    // MARK: PCI command register

    /// Sets Bus Master (and memory decode), keeping every other bit. QEMU disables the device
    /// and clears DRIVER_OK on any Command write without Bus Master, so every Command write
    /// balloond makes goes through here or `unmaskINTx`.
    public func enableDMA() throws(TransportError) { try enableBusMaster() }

    /// Also clears INTx-Disable: a balloond killed between uio masking the line and its own
    /// unmask leaves it set, and a restarted one would otherwise never see an interrupt.
    public func enableBusMaster() throws(TransportError) {
        do {
            let cmd = try config.read16(at: PCIConfig.command)
            let want = (cmd | PCIConfig.commandBusMaster | PCIConfig.commandMemory) & ~PCIConfig.commandINTxDisable
            try config.write16(want, at: PCIConfig.command)
        } catch { throw .pci(error) }
    }

    /// Clears Bus Master and keeps memory decoding on, then reads Command back: QEMU stops
    /// the device (no DMA, no queue processing, DRIVER_OK cleared) while Bus Master is clear.
    public func pause(microseconds: Int) { pauseMicroseconds(microseconds) }

    public func disableDMA() throws(TransportError) {
        let after: UInt16
        do {
            let cmd = try config.read16(at: PCIConfig.command)
            let want = (cmd | PCIConfig.commandMemory) & ~PCIConfig.commandBusMaster
            if want != cmd { try config.write16(want, at: PCIConfig.command) }
            after = try config.read16(at: PCIConfig.command)
        } catch { throw .pci(error) }
        guard after & PCIConfig.commandBusMaster == 0 else { throw .busMasterDidNotClear(command: after) }
    }

    /// Clears INTx-Disable (uio_pci_generic's handler sets it), keeping Bus Master set.
    public func unmaskINTx() throws(TransportError) {
        do {
            let cmd = try config.read16(at: PCIConfig.command)
            let want = (cmd & ~PCIConfig.commandINTxDisable) | PCIConfig.commandBusMaster | PCIConfig.commandMemory
            if want != cmd { try config.write16(want, at: PCIConfig.command) }
        } catch { throw .pci(error) }
    }
}
