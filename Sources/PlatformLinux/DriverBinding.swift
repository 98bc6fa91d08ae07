#if canImport(Glibc)
import VirtioCore
import Glibc
#endif
import Logging
import VirtioPCI

/// The driver balloond binds.
public let uioPCIGenericDriver = "uio_pci_generic"

/// A balloon bound to uio_pci_generic, and where its interrupt device is.
public struct UIOBinding: Hashable, Sendable, CustomStringConvertible {
    public let address: PCIAddress
    /// `uio0`.
    public let uioName: String
    /// `/dev/uio0` (under the binder's root).
    public let devicePath: String
    /// The driver the device had before balloond bound it (`virtio-pci`), nil if none or
    /// unknown. Also kept in the state file for `restore`.
    public let previousDriver: String?

    public var description: String {
        "\(address) bound to \(uioPCIGenericDriver) as \(devicePath) (previous driver: \(previousDriver ?? "none"))"
    }
}

/// A balloon bound to vfio-pci, and its IOMMU group.
public struct VFIOBinding: Hashable, Sendable, CustomStringConvertible {
    public let address: PCIAddress
    /// The IOMMU group number (`/dev/vfio/<group>`).
    public let group: Int
    /// The driver the device had before balloond bound it, as in `UIOBinding`.
    public let previousDriver: String?

    public var description: String {
        "\(address) bound to \(vfioPCIDriver) in IOMMU group \(group) (previous driver: \(previousDriver ?? "none"))"
    }
}

/// Moves a virtio balloon between its kernel driver and uio_pci_generic, through sysfs
/// (Documentation/ABI/testing/sysfs-bus-pci: `driver_override`, `drivers_probe`, `unbind`,
/// `bind`).
///
/// Bind: refuse anything that is not 1af4:1002/1af4:1045 → load uio and uio_pci_generic →
/// save the current driver to `<stateDirectory>/<BDF>.driver` → unbind it → write
/// `uio_pci_generic` to `driver_override` → write the BDF to `/sys/bus/pci/drivers_probe` →
/// check `driver` now points at uio_pci_generic → find `uio/uioN` and `/dev/uioN` (mknod
/// from `uio/uioN/dev` if devtmpfs did not make it).
///
/// Restore: unbind uio_pci_generic → clear `driver_override` (write "\n") → bind the saved
/// driver (or re-probe) → delete the state file. The state file lets `balloond unbind` in a
/// later process (after a crash, say) put the device back.
///
/// Hold the device's `DeviceLock` around both.
public final class DriverBinder {
    public let root: SysRoot
    public let kernel: KernelControl
    /// Where `<BDF>.driver` state files live (default `/run/balloond` under `root`).
    public let stateDirectory: String
    private let state: StateDirectory
    public let modules: ModuleLoader
    public var logger: Logger
    /// How long to wait for devtmpfs to create /dev/uioN before making it: attempts and
    /// microseconds between them.
    public var deviceNodeWait: (attempts: Int, intervalMicroseconds: Int) = (50, 20_000)

    public init(root: SysRoot = .host, kernel: KernelControl = LinuxKernelControl(), stateDirectory: String? = nil,
                kernelRelease: String = Sys.kernelRelease(), logger: Logger = Logger(label: "balloond.binding")) {
        self.root = root
        self.kernel = kernel
        self.stateDirectory = stateDirectory ?? root.path(StateDirectory.defaultPath)
        self.state = StateDirectory(fullPath: self.stateDirectory, owner: root.stateOwner)
        self.modules = ModuleLoader(root: root, kernel: kernel, kernelRelease: kernelRelease, logger: logger)
        self.logger = logger
    }

    /// The drivers `bind` takes a device from without `force`: none, the kernel's virtio
    /// driver, or uio_pci_generic itself. Anything else (vfio-pci for a VM passthrough, say)
    /// belongs to someone else, except vfio-pci that balloond bound itself (its state file
    /// is there).
    public static let acceptedDrivers: Set<String> = ["virtio-pci", uioPCIGenericDriver]

    /// The drivers balloond binds (`bind`: uio_pci_generic; `bindVFIO`: vfio-pci).
    public static let userspaceDrivers: Set<String> = [uioPCIGenericDriver, vfioPCIDriver]

    /// Whether `name` can be a kernel driver name written into a sysfs path: 1-64 characters
    /// from [A-Za-z0-9_.-], not "." or "..".
    public static func isValidDriverName(_ name: String) -> Bool {
        guard !name.isEmpty, name.utf8.count <= 64, name != ".", name != ".." else { return false }
        return name.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c == 0x5f || c == 0x2e || c == 0x2d
        }
    }

    /// `<stateDirectory>/<BDF>.driver`.
    public func stateFilePath(for address: PCIAddress) -> String { stateFile(for: address).path }

    private func stateFile(for address: PCIAddress) -> StateFile { state.file("\(address.bdf).driver") }

    /// The driver saved by an earlier `bind`: `.some(nil)` when the device had none, nil
    /// when there is no state file. A file that is not balloond's, is not one line, or names
    /// something that is not a driver name (e.g. with a `/`) is an error.
    public func savedPreviousDriver(for address: PCIAddress) throws(PlatformError) -> String?? {
        let file = stateFile(for: address)
        let text: String?
        do { text = try file.read() } catch { throw .stateFile(error) }
        guard let text else { return nil }
        guard text.hasSuffix("\n"), !text.dropLast().contains("\n") else {
            throw .stateFile(.malformed(path: file.path, problem: .notOneLine(text: text, expected: "a driver name (or an empty line)")))
        }
        let name = String(text.dropLast())
        if name.isEmpty { return .some(nil) }
        guard Self.isValidDriverName(name) else {
            throw .stateFile(.malformed(path: file.path, problem: .badValue(key: "driver", value: name, expected: "a driver name of letters, digits, '_', '.' and '-'")))
        }
        return .some(name)
    }

    /// `savedPreviousDriver`, except that a file that cannot be trusted or parsed is logged,
    /// moved to `<name>.bad` and treated as absent (its contents are never used).
    private func loadSavedDriver(_ address: PCIAddress) throws(PlatformError) -> String?? {
        do { return try savedPreviousDriver(for: address) } catch {
            guard case .stateFile(let e) = error, e.isAboutTheFile else { throw error }
            let file = stateFile(for: address)
            do { try file.setAside() } catch { throw .stateFile(error) }
            logger.error("ignoring \(file.path) and moving it to \(file.setAsidePath): \(e)")
            return nil
        }
    }

    /// The current driver of `address`.
    public func currentDriver(of address: PCIAddress) throws(PlatformError) -> String? {
        try PCIEnumerator.currentDriver(of: address, root: root)
    }

    /// Binds the balloon at `address` to uio_pci_generic (see the type's documentation).
    /// Already bound: returns the existing binding.
    ///
    /// - Parameter force: take the device from any driver. Without it, a device bound to
    ///   anything but none, virtio-pci or uio_pci_generic is refused before anything changes.
    public func bind(_ address: PCIAddress, force: Bool = false) throws(PlatformError) -> UIOBinding {
        let previous = try bind(address, to: uioPCIGenericDriver, modules: ["uio", uioPCIGenericDriver], force: force)
        return try uioBinding(address, previousDriver: previous)
    }

    /// Binds the balloon at `address` to vfio-pci (loading vfio, vfio_iommu_type1 and
    /// vfio_pci), the same way `bind` binds uio_pci_generic. The device must be in an IOMMU
    /// group (vfio-pci refuses devices no IOMMU translates).
    public func bindVFIO(_ address: PCIAddress, force: Bool = false) throws(PlatformError) -> VFIOBinding {
        try requireVirtioBalloon(address)
        guard let group = try IOMMUGroup.of(address, root: root) else {
            throw .bindFailed(bdf: address.bdf, expected: vfioPCIDriver, found: try currentDriver(of: address), detail: .noIOMMUGroup)
        }
        let previous = try bind(address, to: vfioPCIDriver, modules: ["vfio", "vfio_iommu_type1", "vfio_pci"], force: force)
        return VFIOBinding(address: address, group: group.number, previousDriver: previous)
    }

    /// The binding steps shared by both drivers; returns the previous driver.
    private func bind(_ address: PCIAddress, to target: String, modules wanted: [String], force: Bool) throws(PlatformError) -> String? {
        try requireVirtioBalloon(address)
        let dir = address.sysfsDirectory(in: root)
        if let driver = try currentDriver(of: address), !Self.acceptedDrivers.contains(driver) {
            // A userspace driver's binding is ours when our state file is there.
            let ours = Self.userspaceDrivers.contains(driver) && (try? savedPreviousDriver(for: address)) != nil
            if !ours {
                guard force else { throw .foreignDriver(bdf: address.bdf, driver: driver) }
                logger.warning("\(address) is bound to \(driver); taking it anyway (--force)")
            }
        }
        do { try state.prepare() } catch { throw .stateFile(error) }
        guard Sys.exists(dir + "/driver_override") else {
            throw .bindFailed(bdf: address.bdf, expected: target, found: try currentDriver(of: address),
                              detail: .noDriverOverride(path: dir + "/driver_override"))
        }
        for module in wanted { try modules.ensureLoaded(module) }

        let current = try currentDriver(of: address)
        if current == target {
            let saved = (try loadSavedDriver(address)) ?? nil
            logger.info("\(address) is already bound to \(target)")
            return saved
        }

        // The driver to give the device back to. An unbound device with a state file is one
        // an earlier bind left half-done (crash after unbind): keep what that bind saved;
        // likewise a device still bound to the other userspace driver by an earlier run.
        let saved = (try loadSavedDriver(address)) ?? nil
        let previous = current.map { Self.userspaceDrivers.contains($0) && saved != nil ? saved : $0 } ?? saved
        if let previous, !Self.isValidDriverName(previous) {
            throw .malformedFile(path: dir + "/driver", reason: .badDriverName(previous))
        }
        // Save first, so a crash between here and the end can still be undone by `restore`.
        do { try stateFile(for: address).write((previous ?? "") + "\n") } catch { throw .stateFile(error) }

        if let current {
            logger.info("unbinding \(address) from \(current)")
            try kernel.writeAttribute(root.path("/sys/bus/pci/drivers/\(current)/unbind"), address.bdf)
        }
        try kernel.writeAttribute(dir + "/driver_override", target)
        do {
            try kernel.writeAttribute(root.path("/sys/bus/pci/drivers_probe"), address.bdf)
        } catch {
            // drivers_probe returns the probe's error (e.g. ENODEV when uio_pci_generic
            // rejects the device); the driver check below explains it.
            logger.warning("drivers_probe for \(address) failed: \(error)")
        }
        let now = try currentDriver(of: address)
        guard now == target else {
            let rollback = rollBack(address, previous: previous)
            throw .bindFailed(bdf: address.bdf, expected: target, found: now, detail: rollback)
        }
        logger.info("bound \(address) to \(target) (was \(current ?? "unbound"))")
        return previous
    }

    /// Gives the device back: unbinds uio_pci_generic, clears `driver_override`, binds the
    /// driver saved by `bind` (or lets the kernel pick one when none was saved), and deletes
    /// the state file. Returns the driver bound afterwards.
    ///
    /// A device that is bound to something other than uio_pci_generic is left alone (only a
    /// stale override and state file are cleaned up).
    @discardableResult
    public func restore(_ address: PCIAddress) throws(PlatformError) -> String? {
        try requireVirtioBalloon(address)
        let dir = address.sysfsDirectory(in: root)
        let hasStateFile = (try? savedPreviousDriver(for: address)) != nil
        let saved = (try loadSavedDriver(address)) ?? nil
        let current = try currentDriver(of: address)
        // uio_pci_generic is always balloond's; vfio-pci only with balloond's state file (else
        // it is a VM's passthrough).
        let ours = current == uioPCIGenericDriver || (current == vfioPCIDriver && hasStateFile)
        if let current, !ours {
            logger.info("\(address) is bound to \(current), not \(uioPCIGenericDriver); nothing to restore")
            try clearOverrideIfOurs(address, hasStateFile: hasStateFile)
            removeStateFile(address)
            return current
        }
        if let current {
            logger.info("unbinding \(address) from \(current)")
            try kernel.writeAttribute(root.path("/sys/bus/pci/drivers/\(current)/unbind"), address.bdf)
        }
        try kernel.writeAttribute(dir + "/driver_override", "\n")
        var bound = false
        if let saved, !Self.userspaceDrivers.contains(saved) {
            let bindPath = root.path("/sys/bus/pci/drivers/\(saved)/bind")
            if Sys.exists(bindPath) {
                do {
                    try kernel.writeAttribute(bindPath, address.bdf)
                    bound = true
                } catch {
                    logger.warning("binding \(address) to \(saved) failed (\(error)); letting the kernel probe it")
                }
            } else {
                logger.warning("driver \(saved) is not registered (module unloaded?); letting the kernel probe \(address)")
            }
        }
        if !bound {
            do { try kernel.writeAttribute(root.path("/sys/bus/pci/drivers_probe"), address.bdf) } catch {
                // ENODEV here means no driver wants it, which is a valid end state.
                logger.info("re-probe of \(address) found no driver: \(error)")
            }
        }
        removeStateFile(address)
        let now = try currentDriver(of: address)
        logger.info("\(address) is now bound to \(now ?? "no driver")")
        return now
    }

    // MARK: private

    private func requireVirtioBalloon(_ address: PCIAddress) throws(PlatformError) {
        let dir = address.sysfsDirectory(in: root)
        guard Sys.isDirectory(dir) else { throw .deviceNotFound(bdf: address.bdf) }
        let vendor = try readID(dir + "/vendor"), device = try readID(dir + "/device")
        guard isVirtioBalloonID(vendor: vendor, device: device) else {
            throw .notAVirtioBalloon(bdf: address.bdf, vendor: vendor, device: device)
        }
    }

    private func readID(_ path: String) throws(PlatformError) -> UInt16 {
        let text: String
        do { text = try Sys.readAttribute(path) } catch { throw .system(error) }
        guard let v = parseNumber(text, hex: true), v <= 0xffff else {
            throw .malformedFile(path: path, reason: .notHexID(text))
        }
        return UInt16(v)
    }

    /// After a failed bind: clear the override and give the device back to its driver.
    private func rollBack(_ address: PCIAddress, previous: String?) -> BindFailureDetail {
        do {
            try kernel.writeAttribute(address.sysfsDirectory(in: root) + "/driver_override", "\n")
            if let previous, Sys.exists(root.path("/sys/bus/pci/drivers/\(previous)/bind")) {
                try kernel.writeAttribute(root.path("/sys/bus/pci/drivers/\(previous)/bind"), address.bdf)
            } else {
                try kernel.writeAttribute(root.path("/sys/bus/pci/drivers_probe"), address.bdf)
            }
            removeStateFile(address)
            return .rolledBack(previous: previous)
        } catch {
            return .rollbackFailed(error, address: address)
        }
    }

    /// Clears a uio_pci_generic override (only balloond sets one), or a vfio-pci override when
    /// balloond's state file says it set it (else it is a VM passthrough's).
    private func clearOverrideIfOurs(_ address: PCIAddress, hasStateFile: Bool) throws(PlatformError) {
        let path = address.sysfsDirectory(in: root) + "/driver_override"
        guard let value = try? Sys.readAttribute(path), value == uioPCIGenericDriver || (value == vfioPCIDriver && hasStateFile) else { return }
        try kernel.writeAttribute(path, "\n")
    }

    private func removeStateFile(_ address: PCIAddress) {
        do { try stateFile(for: address).remove() } catch {
            logger.warning("could not remove \(stateFilePath(for: address)): \(error)")
        }
    }

    /// Finds `uio/uioN` under the device and its `/dev/uioN`, making the node from
    /// `uio/uioN/dev` (major:minor) when devtmpfs has not.
    private func uioBinding(_ address: PCIAddress, previousDriver: String?) throws(PlatformError) -> UIOBinding {
        let uioDir = address.sysfsDirectory(in: root) + "/uio"
        let names: [String]
        do { names = try Sys.listDirectory(uioDir).filter { $0.hasPrefix("uio") } } catch {
            throw .uioDeviceMissing(bdf: address.bdf, .noUIODirectory(path: uioDir, error))
        }
        guard names.count == 1, let name = names.first else {
            throw .uioDeviceMissing(bdf: address.bdf, .uioEntries(directory: uioDir, found: names))
        }
        let devFile = "\(uioDir)/\(name)/dev"
        let devText: String
        do { devText = try Sys.readAttribute(devFile) } catch { throw .system(error) }
        let parts = devText.split(separator: ":")
        guard parts.count == 2, let major = UInt32(parts[0]), let minor = UInt32(parts[1]) else {
            throw .malformedFile(path: devFile, reason: .notMajorMinor(devText))
        }
        let node = root.path("/dev/\(name)")
        var tries = 0
        while !Sys.exists(node) && tries < deviceNodeWait.attempts {
            usleep(useconds_t(deviceNodeWait.intervalMicroseconds))
            tries += 1
        }
        if !Sys.exists(node) {
            logger.info("\(node) did not appear (no devtmpfs?); creating it as \(major):\(minor)")
            do { try kernel.makeCharacterDevice(node, major: major, minor: minor) } catch {
                throw .uioDeviceMissing(bdf: address.bdf, .mknodFailed(node: node, error))
            }
        }
        return UIOBinding(address: address, uioName: name, devicePath: node, previousDriver: previousDriver)
    }
}
