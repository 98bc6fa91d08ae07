/// How balloond reaches the device (`balloond run --backend`).
public enum DeviceBackend: String, CaseIterable, Sendable {
    /// vfio where the device is behind an IOMMU and vfio-pci is available, else uio.
    case auto
    /// uio_pci_generic: BAR4 through sysfs, INTx through /dev/uioN, guest-physical DMA
    /// addresses (no IOMMU, or a passthrough one).
    case uio
    /// vfio-pci: config and BARs through the vfio device, DMA through IOMMU mappings,
    /// MSI-X (or INTx) through eventfds.
    case vfio
}

/// What the backend choice is made from, read before anything changes.
public struct BackendFacts: Hashable, Sendable {
    /// The device's IOMMU group (nil: no IOMMU translates it).
    public var group: IOMMUGroup?
    /// vfio-pci is loaded, built in, or installed for the running kernel.
    public var vfioAvailable: Bool

    public init(group: IOMMUGroup?, vfioAvailable: Bool) {
        self.group = group
        self.vfioAvailable = vfioAvailable
    }

    /// Reads the facts for `address` (sysfs, and the running kernel's module lists).
    public static func read(_ address: PCIAddress, root: SysRoot = .host, kernelRelease: String = Sys.kernelRelease()) throws(PlatformError) -> BackendFacts {
        BackendFacts(group: try IOMMUGroup.of(address, root: root), vfioAvailable: vfioPCIAvailable(root: root, kernelRelease: kernelRelease))
    }

    /// Whether the guest's IOMMU translates the device's DMA (its default domain is not
    /// passthrough): then guest-physical addresses are wrong and only vfio can drive it.
    public var translated: Bool {
        guard let group else { return false }
        return group.domainType != "identity"
    }

    /// Backends that can drive the device here.
    public var usableBackends: [DeviceBackend] {
        var result: [DeviceBackend] = []
        if !translated { result.append(.uio) }
        if group != nil && vfioAvailable { result.append(.vfio) }
        return result
    }
}

/// Whether vfio-pci is loaded, built in, or has a module file for `kernelRelease`.
public func vfioPCIAvailable(root: SysRoot = .host, kernelRelease: String) -> Bool {
    if Sys.exists(root.path("/sys/module/vfio_pci")) || Sys.exists(root.path("/sys/bus/pci/drivers/vfio-pci")) { return true }
    for base in ["/lib/modules", "/usr/lib/modules"] {
        for list in ["modules.dep", "modules.builtin"] {
            if let text = Sys.readTextFileIfPresent(root.path("\(base)/\(kernelRelease)/\(list)")),
               text.contains("/vfio-pci.ko") || text.contains("/vfio_pci.ko") {
                return true
            }
        }
    }
    return false
}

/// The backend `run` uses, and why (logged).
public struct BackendChoice: Hashable, Sendable {
    public let backend: DeviceBackend
    public let reason: String
}

/// Why the requested backend cannot drive the device.
public enum BackendChoiceError: Error, Hashable, Sendable, CustomStringConvertible {
    /// `--backend vfio` for a device no IOMMU translates.
    case vfioWithoutIOMMU(bdf: String)
    /// `--backend vfio` where vfio-pci is not available.
    case vfioUnavailable(bdf: String)

    public var description: String {
        switch self {
        case .vfioWithoutIOMMU(let bdf):
            return "--backend vfio: \(bdf) has no IOMMU group, so vfio-pci cannot take it (this kernel has no VFIO_NOIOMMU). Give the guest a virtual IOMMU (QEMU: -device intel-iommu,intremap=on and intel_iommu=on), or use --backend uio"
        case .vfioUnavailable(let bdf):
            return "--backend vfio: vfio-pci is neither loaded nor installed for this kernel, so \(bdf) cannot be bound to it. Install the kernel's modules (CONFIG_VFIO_PCI), or use --backend uio"
        }
    }
}

/// Picks the backend (docs/vfio.md §7): `auto` takes vfio when the device has an IOMMU
/// group and vfio-pci is available (vfio then isolates the device's DMA), else uio. Pure.
public func chooseBackend(requested: DeviceBackend, facts: BackendFacts, bdf: String) -> Result<BackendChoice, BackendChoiceError> {
    let groupText = facts.group.map { "IOMMU group \($0.number)\($0.domainType.map { ", domain \($0)" } ?? "")" } ?? ""
    switch requested {
    case .uio:
        return .success(BackendChoice(backend: .uio, reason: "--backend uio"))
    case .vfio:
        guard facts.group != nil else { return .failure(.vfioWithoutIOMMU(bdf: bdf)) }
        guard facts.vfioAvailable else { return .failure(.vfioUnavailable(bdf: bdf)) }
        return .success(BackendChoice(backend: .vfio, reason: "--backend vfio (\(groupText))"))
    case .auto:
        guard facts.group != nil else {
            return .success(BackendChoice(backend: .uio, reason: "no IOMMU translates \(bdf) (it has no IOMMU group), and vfio needs one"))
        }
        guard facts.vfioAvailable else {
            return .success(BackendChoice(backend: .uio, reason: "\(bdf) is behind an IOMMU (\(groupText)) but vfio-pci is not available in this kernel"))
        }
        return .success(BackendChoice(backend: .vfio, reason: "\(bdf) is behind an IOMMU (\(groupText)) and vfio-pci is available: its DMA goes through IOMMU mappings"))
    }
}
