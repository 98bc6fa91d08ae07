#if canImport(Glibc)
import VirtioCore
import Glibc
#endif
import CLibPCI
import VirtioPCI

/// One PCI function as libpci and sysfs describe it.
public struct PCIFunction: Hashable, Sendable, CustomStringConvertible {
    public var address: PCIAddress
    public var vendorID: UInt16
    public var deviceID: UInt16
    public var subsystemVendorID: UInt16
    public var subsystemID: UInt16
    public var revision: UInt8
    /// 24-bit class code: base class, subclass, programming interface (`0x00ff00` for virtio).
    public var classCode: UInt32
    /// Sizes of BARs 0–5, nil where a BAR is absent (what `ModernPCITransport` wants).
    public var barSizes: [UInt64?]
    /// Every line of the sysfs `resource` file (BARs 0–5, then the ROM, then bridge windows).
    public var resources: [PCIResource]
    /// The bound driver (basename of the `driver` link), nil when unbound.
    public var driver: String?

    /// `0000:00:03.0`.
    public var bdf: String { address.bdf }

    /// A virtio-balloon: 1af4:1002 (transitional) or 1af4:1045 (modern-only).
    public var isVirtioBalloon: Bool { isVirtioBalloonID(vendor: vendorID, device: deviceID) }

    public var description: String {
        let bars = barSizes.enumerated().compactMap { i, s in s.map { "BAR\(i)=\($0)" } }.joined(separator: " ")
        return "\(bdf) \(hex4(vendorID)):\(hex4(deviceID)) (subsystem \(hex4(subsystemVendorID)):\(hex4(subsystemID)), rev \(revision), class \(String(classCode, radix: 16))) \(bars) driver=\(driver ?? "none")"
    }
}

/// Whether a vendor:device pair is a virtio balloon (docs/virtio-balloon.md §1.1).
public func isVirtioBalloonID(vendor: UInt16, device: UInt16) -> Bool {
    vendor == PCIConfig.virtioVendor && (device == PCIConfig.balloonTransitionalID || device == PCIConfig.balloonModernID)
}

/// Lists PCI functions through libpci's `linux-sysfs` method, pointed at `root`'s
/// `/sys/bus/pci` (libpci's `sysfs.path` parameter), plus the `driver` link from sysfs.
///
/// libpci reports fatal problems through `pci_access.error`, whose default prints and calls
/// `exit(1)`, and Swift cannot install a replacement that does not return (it must not
/// return: libpci continues with invalid state). So the enumerator first checks everything
/// libpci's sysfs back end treats as fatal — the `devices` directory, entry names, and each
/// function's `vendor`, `device`, `class` and `resource` files — and throws a `PlatformError`
/// itself instead. It also requires `config` (every real function has one), without which
/// libpci's config reads would silently return all-ones.
public struct PCIEnumerator: Sendable {
    public let root: SysRoot

    public init(root: SysRoot = .host) { self.root = root }

    /// Every PCI function, in address order.
    public func functions() throws(PlatformError) -> [PCIFunction] {
        try scan(only: nil)
    }

    /// One function.
    public func function(at address: PCIAddress) throws(PlatformError) -> PCIFunction {
        guard let f = try scan(only: address).first else { throw .deviceNotFound(bdf: address.bdf) }
        return f
    }

    /// The virtio balloons (usually zero or one).
    public func virtioBalloons() throws(PlatformError) -> [PCIFunction] {
        try functions().filter(\.isVirtioBalloon)
    }

    /// The bound driver's name (basename of `/sys/bus/pci/devices/BDF/driver`), nil if none.
    public static func currentDriver(of address: PCIAddress, root: SysRoot = .host) throws(PlatformError) -> String? {
        let link = address.sysfsDirectory(in: root) + "/driver"
        do {
            guard try Sys.lstatIfExists(link) != nil else { return nil }
            let target = try Sys.readlink(link)
            return target.split(separator: "/").last.map(String.init)
        } catch { throw .system(error) }
    }

    // MARK: private

    private func scan(only: PCIAddress?) throws(PlatformError) -> [PCIFunction] {
        let sysfsPCI = root.path("/sys/bus/pci")
        let devicesDir = sysfsPCI + "/devices"
        guard Sys.isDirectory(devicesDir) else {
            throw .libpci(.noSysfsDevices(directory: devicesDir))
        }
        let names: [String]
        do { names = try Sys.listDirectory(devicesDir) } catch { throw .system(error) }
        var wanted: [PCIAddress] = []
        for name in names where !name.hasPrefix(".") {
            guard let a = PCIAddress(name) else {
                throw .malformedFile(path: devicesDir, reason: .notAPCIAddressEntry(name))
            }
            for file in ["vendor", "device", "class", "resource", "config"] {
                let p = devicesDir + "/" + name + "/" + file
                guard unsafe access(p, R_OK) == 0 else {
                    throw .malformedFile(path: p, reason: .unreadableForLibPCI(function: name))
                }
            }
            if only == nil || only == a { wanted.append(a) }
        }
        if let only, wanted.isEmpty { throw .deviceNotFound(bdf: only.bdf) }

        let raw = try scanWithLibPCI(sysfsPath: sysfsPCI, wanted: Set(wanted))
        var result: [PCIFunction] = []
        for var f in raw {
            f.resources = try readPCIResources(f.address, root: root)
            f.driver = try Self.currentDriver(of: f.address, root: root)
            result.append(f)
        }
        return result.sorted { $0.address < $1.address }
    }

    /// The libpci part: pci_alloc, sysfs method at `sysfsPath`, pci_init, pci_scan_bus,
    /// pci_fill_info, config reads for fields the fill did not provide, pci_cleanup.
    private func scanWithLibPCI(sysfsPath: String, wanted: Set<PCIAddress>) throws(PlatformError) -> [PCIFunction] {
        guard let access = unsafe pci_alloc() else { throw .libpci(.outOfMemory(call: "pci_alloc")) }
        // pci_set_param copies the value in libpci ≥ 3.5; keep ours alive until cleanup anyway.
        guard let pathCopy = unsafe strdup(sysfsPath) else { unsafe pci_cleanup(access); throw .libpci(.outOfMemory(call: "strdup")) }
        defer {
            unsafe pci_cleanup(access)
            unsafe free(pathCopy)
        }
        unsafe access.pointee.method = UInt32(PCI_ACCESS_SYS_BUS_PCI.rawValue)
        let setOK = unsafe "sysfs.path".withCString { name in
            unsafe pci_set_param(access, UnsafeMutablePointer(mutating: name), pathCopy)
        }
        guard setOK == 0 else { throw .libpci(.noSysfsPathParameter) }
        unsafe pci_init(access)
        unsafe pci_scan_bus(access)

        let fill = PCI_FILL_IDENT | PCI_FILL_CLASS | PCI_FILL_BASES | PCI_FILL_SIZES | PCI_FILL_CLASS_EXT | PCI_FILL_SUBSYS
        var result: [PCIFunction] = []
        var dev = unsafe access.pointee.devices
        while let d = unsafe dev {
            unsafe dev = unsafe d.pointee.next
            let address = unsafe PCIAddress(domain: UInt32(truncatingIfNeeded: d.pointee.domain), bus: d.pointee.bus,
                                            device: d.pointee.dev & 0x1f, function: d.pointee.func & 7)
            guard wanted.contains(address) else { continue }
            let known = unsafe pci_fill_info(d, Int32(fill))
            let p = unsafe d.pointee
            // Subsystem and revision: from the fill when libpci provided them, else from the
            // config header (readable by anyone for the first 64 bytes).
            let subsystemVendor: UInt16, subsystem: UInt16
            if known & Int32(PCI_FILL_SUBSYS) != 0 {
                (subsystemVendor, subsystem) = unsafe (p.subsys_vendor_id, p.subsys_id)
            } else {
                (subsystemVendor, subsystem) = unsafe (pci_read_word(d, Int32(PCIConfig.subsystemVendorID)), pci_read_word(d, Int32(PCIConfig.subsystemID)))
            }
            let revision: UInt8, progIf: UInt8
            if known & Int32(PCI_FILL_CLASS_EXT) != 0 {
                (revision, progIf) = unsafe (p.rev_id, p.prog_if)
            } else {
                (revision, progIf) = unsafe (pci_read_byte(d, Int32(PCIConfig.revision)), pci_read_byte(d, Int32(PCIConfig.classCode)))
            }
            var sizes: [UInt64?] = []
            if known & Int32(PCI_FILL_SIZES) != 0 {
                let s = unsafe p.size
                for v in [s.0, s.1, s.2, s.3, s.4, s.5] { sizes.append(v == 0 ? nil : UInt64(v)) }
            } else {
                sizes = Array(repeating: nil, count: 6)
            }
            unsafe result.append(PCIFunction(
                address: address, vendorID: p.vendor_id, deviceID: p.device_id,
                subsystemVendorID: subsystemVendor, subsystemID: subsystem, revision: revision,
                classCode: UInt32(p.device_class) << 8 | UInt32(progIf),
                barSizes: sizes, resources: [], driver: nil))
        }
        return result
    }
}
