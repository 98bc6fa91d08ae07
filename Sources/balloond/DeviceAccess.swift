import Balloon
import Logging
import PlatformLinux
import VirtioCore
import VirtioPCI

/// The device as `run` bound it.
enum DeviceBinding {
    case uio(UIOBinding)
    case vfio(VFIOBinding)

    var driver: String {
        switch self {
        case .uio: return uioPCIGenericDriver
        case .vfio: return vfioPCIDriver
        }
    }

    var previousDriver: String? {
        switch self {
        case .uio(let b): return b.previousDriver
        case .vfio(let b): return b.previousDriver
        }
    }
}

/// How `run` reaches a bound device, whichever the backend: config space, BARs, the
/// interrupt line, and the IOMMU mapper for DMA memory (vfio only).
///
/// - uio: sysfs `config` and `resourceN`, /dev/uioN (INTx), guest-physical DMA addresses.
/// - vfio: the vfio device's config and BAR regions, MSI-X eventfds where the function has
///   an MSI-X table (QEMU 10) else INTx, and every DMA region mapped in the IOMMU at its
///   guest-physical address (IOVA = GPA), so ring addresses mean the same with or without
///   ACCESS_PLATFORM.
final class DeviceAccess {
    let config: PCIConfigSpace
    let barSizes: [UInt64?]
    let mapBAR: (Int) throws(PCIError) -> MMIORegion
    let deviceMapper: DeviceAddressMapper?
    let addressing: DeviceAddressing
    /// What `balloond status` shows as the device's interrupt source.
    let interruptPath: String
    private let makeLine: (ModernPCITransport, Logger) throws -> InterruptLine

    private init(config: PCIConfigSpace, barSizes: [UInt64?], mapBAR: @escaping (Int) throws(PCIError) -> MMIORegion,
                 deviceMapper: DeviceAddressMapper?, addressing: DeviceAddressing, interruptPath: String,
                 makeLine: @escaping (ModernPCITransport, Logger) throws -> InterruptLine) {
        self.config = config
        self.barSizes = barSizes
        self.mapBAR = mapBAR
        self.deviceMapper = deviceMapper
        self.addressing = addressing
        self.interruptPath = interruptPath
        self.makeLine = makeLine
    }

    static func open(_ binding: DeviceBinding, function: PCIFunction, logger: Logger) throws -> DeviceAccess {
        switch binding {
        case .uio(let b):
            let config = try SysfsConfigSpace(address: function.address)
            let mapper = BARMapper(address: function.address)
            return DeviceAccess(config: config, barSizes: function.barSizes, mapBAR: { (i) throws(PCIError) -> MMIORegion in try mapper.map(i) },
                                deviceMapper: nil, addressing: .guestPhysical, interruptPath: b.devicePath,
                                makeLine: { _, _ in try UIOInterruptLine(devicePath: b.devicePath, config: config) })
        case .vfio(let b):
            let device = try VFIODevice(address: function.address, kernel: LinuxVFIOKernel(), logger: logger)
            return DeviceAccess(config: device.configSpace(), barSizes: device.barSizes,
                                mapBAR: { (i) throws(PCIError) -> MMIORegion in try device.mapBAR(i) },
                                deviceMapper: device, addressing: .iommu(hintsMapped: false, reportsMapped: false), interruptPath: "/dev/vfio/\(b.group)",
                                makeLine: { transport, logger in try Self.vfioLine(device, transport: transport, logger: logger) })
        }
    }

    /// The interrupt line; for vfio with MSI-X this also tells the transport which vectors to
    /// program.
    func interruptLine(transport: ModernPCITransport, logger: Logger) throws -> InterruptLine {
        try makeLine(transport, logger)
    }

    private static func vfioLine(_ device: VFIODevice, transport: ModernPCITransport, logger: Logger) throws -> InterruptLine {
        let msix = try? device.kernel.irqInfo(device: device.descriptor, index: VFIOPCIIRQ.msix)
        if let msix, msix.count > 0 {
            let line = try VFIOMSIXLine(device: device, queueCount: Int(transport.numQueues))
            transport.msixVectors = line.plan
            logger.info("interrupts: MSI-X", metadata: ["table": "\(msix.count)", "vectors": "\(line.plan.vectorCount)"])
            return line
        }
        logger.info("interrupts: INTx through vfio (the function has no MSI-X table)")
        return try VFIOINTxLine(device: device)
    }
}
