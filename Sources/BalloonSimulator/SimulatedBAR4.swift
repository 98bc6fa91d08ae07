import VirtioCore
import VirtioPCI

/// BAR4 of the simulated function: common config at 0x0000, ISR at 0x1000, device config at
/// 0x2000, notify at 0x3000 (multiplier 4), as QEMU 7.2 lays it out.
public final class SimulatedBAR4: MMIORegion {
    unowned let device: SimulatedBalloonDevice
    public let length = 0x4000
    init(device: SimulatedBalloonDevice) { self.device = device }

    public func read8(at offset: Int) -> UInt8 { UInt8(truncatingIfNeeded: read(offset, 1)) }
    public func read16(at offset: Int) -> UInt16 { UInt16(truncatingIfNeeded: read(offset, 2)) }
    public func read32(at offset: Int) -> UInt32 { read(offset, 4) }
    public func write8(_ value: UInt8, at offset: Int) { write(offset, 1, UInt32(value)) }
    public func write16(_ value: UInt16, at offset: Int) { write(offset, 2, UInt32(value)) }
    public func write32(_ value: UInt32, at offset: Int) { write(offset, 4, value) }

    private func read(_ offset: Int, _ width: Int) -> UInt32 {
        switch offset {
        case 0..<0x1000: return device.commonRead(offset, width)
        case 0x1000..<0x2000: return offset == 0x1000 ? UInt32(device.readISRForBAR()) : 0
        case 0x2000..<0x3000:
            var v: UInt32 = 0
            for i in 0..<width { v |= UInt32(device.readConfigByte(offset - 0x2000 + i)) << (8 * UInt32(i)) }
            return v
        default: return 0
        }
    }

    private func write(_ offset: Int, _ width: Int, _ value: UInt32) {
        switch offset {
        case 0..<0x1000: device.commonWrite(offset, width, value)
        case 0x2000..<0x3000:
            let bytes = (0..<width).map { UInt8(truncatingIfNeeded: value >> (8 * UInt32($0))) }
            device.writeConfig(bytes: bytes, at: offset - 0x2000)
        case 0x3000..<0x4000:
            // virtio_pci_notify_write decodes the queue from the address, not the value.
            let q = (offset - 0x3000) / 4
            device.notify(queue: UInt16(q))
        default: break
        }
    }
}

extension SimulatedBalloonDevice {
    func readISRForBAR() -> UInt8 { readISR() }

    func writeStatusRaw(_ s: DeviceStatus) { writeStatusDirect(s) }

    /// `virtio_pci_common_read`.
    func commonRead(_ offset: Int, _ width: Int) -> UInt32 {
        switch offset {
        case CommonConfig.deviceFeatureSelect: return deviceFeatureSelect
        case CommonConfig.deviceFeature:
            let f = properties.offeredFeatures
            return deviceFeatureSelect == 0 ? f.low : (deviceFeatureSelect == 1 ? f.high : 0)
        case CommonConfig.driverFeatureSelect: return driverFeatureSelect
        case CommonConfig.driverFeature: return driverFeatureSelect < 2 ? driverFeatureWords[Int(driverFeatureSelect)] : 0
        case CommonConfig.msixConfig: return 0xffff
        case CommonConfig.numQueues: return UInt32(numQueues)
        case CommonConfig.deviceStatus: return UInt32(status.rawValue)
        case CommonConfig.configGeneration: return UInt32(readGeneration())
        case CommonConfig.queueSelect: return UInt32(queueSelect)
        case CommonConfig.queueSize: return UInt32(queueSizeRead(queueSelect))
        case CommonConfig.queueMSIXVector: return 0xffff
        case CommonConfig.queueEnable: return (queue(queueSelect)?.enabled ?? false) ? 1 : 0
        case CommonConfig.queueNotifyOff: return UInt32(queueSelect)
        case CommonConfig.queueDescLow: return UInt32(truncatingIfNeeded: queue(queueSelect)?.descAddress.value ?? 0)
        case CommonConfig.queueDescHigh: return UInt32(truncatingIfNeeded: (queue(queueSelect)?.descAddress.value ?? 0) >> 32)
        case CommonConfig.queueDriverLow: return UInt32(truncatingIfNeeded: queue(queueSelect)?.driverAddress.value ?? 0)
        case CommonConfig.queueDriverHigh: return UInt32(truncatingIfNeeded: (queue(queueSelect)?.driverAddress.value ?? 0) >> 32)
        case CommonConfig.queueDeviceLow: return UInt32(truncatingIfNeeded: queue(queueSelect)?.deviceAddress.value ?? 0)
        case CommonConfig.queueDeviceHigh: return UInt32(truncatingIfNeeded: (queue(queueSelect)?.deviceAddress.value ?? 0) >> 32)
        default: return 0
        }
    }

    /// `virtio_pci_common_write`.
    func commonWrite(_ offset: Int, _ width: Int, _ value: UInt32) {
        func setAddress(_ keyPath: ReferenceWritableKeyPath<DeviceQueue, PhysicalAddress>, high: Bool) {
            guard let q = queue(queueSelect) else { return }
            var v = q[keyPath: keyPath].value
            if high { v = (v & 0xffff_ffff) | UInt64(value) << 32 } else { v = (v & ~0xffff_ffff) | UInt64(value) }
            q[keyPath: keyPath] = PhysicalAddress(v)
        }
        switch offset {
        case CommonConfig.deviceFeatureSelect: deviceFeatureSelect = value
        case CommonConfig.driverFeatureSelect: driverFeatureSelect = value
        case CommonConfig.driverFeature:
            // Ignored once FEATURES_OK is set; read back raw.
            if !status.contains(.featuresOK), driverFeatureSelect < 2 { driverFeatureWords[Int(driverFeatureSelect)] = value }
        case CommonConfig.deviceStatus: writeStatus(UInt8(truncatingIfNeeded: value))
        case CommonConfig.queueSelect: if value < 1024 { queueSelect = UInt16(value) }
        case CommonConfig.queueSize:
            if let q = queue(queueSelect), value >= 1, value <= 1024 { q.size = UInt16(value) }
        case CommonConfig.queueEnable:
            guard value == 1 else {
                virtioError(.wrongQueueEnable(UInt64(value)))
                return
            }
            if let q = queue(queueSelect), !faults.zeroSizedQueues.contains(queueSelect) {
                guard memory.region(containing: q.descAddress, length: 16 * UInt64(q.size)) != nil,
                      memory.region(containing: q.driverAddress, length: 6 + 2 * UInt64(q.size)) != nil,
                      memory.region(containing: q.deviceAddress, length: 6 + 8 * UInt64(q.size)) != nil else {
                    virtioError(.cannotMapRings)
                    return
                }
                q.enabled = true
                record(.queueEnabled(queueSelect, size: q.size))
            }
        case CommonConfig.queueDescLow: setAddress(\.descAddress, high: false)
        case CommonConfig.queueDescHigh: setAddress(\.descAddress, high: true)
        case CommonConfig.queueDriverLow: setAddress(\.driverAddress, high: false)
        case CommonConfig.queueDriverHigh: setAddress(\.driverAddress, high: true)
        case CommonConfig.queueDeviceLow: setAddress(\.deviceAddress, high: false)
        case CommonConfig.queueDeviceHigh: setAddress(\.deviceAddress, high: true)
        case CommonConfig.queueReset:
            if value == 1 { queue(queueSelect)?.reset() }
        default: break
        }
    }
}
