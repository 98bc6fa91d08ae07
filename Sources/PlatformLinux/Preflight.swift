#if canImport(Glibc)
import Glibc
#endif

/// The lockdown mode selected in `/sys/kernel/security/lockdown`, whose content lists the
/// modes with the active one in brackets: `none [integrity] confidentiality`
/// (security/lockdown/lockdown.c: `lockdown_read`). Pure. Nil when no mode is bracketed.
public func selectedLockdownMode(_ text: String) -> String? {
    for word in text.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }) {
        if word.hasPrefix("[") && word.hasSuffix("]") && word.count > 2 {
            return String(word.dropFirst().dropLast())
        }
    }
    return nil
}

/// Checks that userspace virtio-pci can work here before touching the device, each failure
/// an actionable `PlatformError` (docs/userspace-pci.md §5, §9, §10):
///
/// 1. root (driver binding, BAR mmap and pagemap PFNs need it);
/// 2. no kernel lockdown (it forbids userspace BAR access);
/// 3. no translating guest IOMMU for the function (uio programs guest-physical addresses);
/// 4. /proc/self/pagemap gives PFNs.
///
/// All paths are under `root`, and the uid is injectable, so every check can be tested on a
/// fake tree.
public struct Preflight {
    public let root: SysRoot
    public let effectiveUID: UInt32

    public init(root: SysRoot = .host, effectiveUID: UInt32 = geteuid()) {
        self.root = root
        self.effectiveUID = effectiveUID
    }

    /// Runs every check and throws the first failure.
    public func run(for address: PCIAddress) throws(PlatformError) {
        if let first = problems(for: address).first { throw first }
    }

    /// Every failing check, in the order above (empty: all good).
    public func problems(for address: PCIAddress) -> [PlatformError] {
        var result: [PlatformError] = []
        func collect(_ check: () throws(PlatformError) -> Void) {
            do { try check() } catch { result.append(error) }
        }
        collect { () throws(PlatformError) in try checkRoot() }
        collect { () throws(PlatformError) in try checkLockdown() }
        collect { () throws(PlatformError) in try checkIOMMU(for: address) }
        collect { () throws(PlatformError) in try checkPagemap() }
        return result
    }

    /// 1. Effective uid 0.
    public func checkRoot() throws(PlatformError) {
        guard effectiveUID == 0 else { throw .notRoot(effectiveUID: effectiveUID) }
    }

    /// 2. `/sys/kernel/security/lockdown` selects `none` (or does not exist: no lockdown LSM,
    /// or securityfs not mounted, in which case lockdown cannot be active through it).
    public func checkLockdown() throws(PlatformError) {
        let path = root.path("/sys/kernel/security/lockdown")
        guard Sys.exists(path) else { return }
        let text: String
        do { text = try Sys.readTextFile(path) } catch { throw .system(error) }
        guard let mode = selectedLockdownMode(text) else {
            throw .malformedFile(path: path, reason: .noSelectedLockdownMode(text: trimmed(text)))
        }
        if mode != "none" { throw .kernelLockdown(mode: mode) }
    }

    /// 3. The function has no IOMMU group, or its group's default domain is `identity`
    /// (passthrough: DMA addresses are guest-physical addresses).
    public func checkIOMMU(for address: PCIAddress) throws(PlatformError) {
        let link = address.sysfsDirectory(in: root) + "/iommu_group"
        let target: String
        do {
            guard try Sys.lstatIfExists(link) != nil else { return }
            target = try Sys.readlink(link)
        } catch { throw .system(error) }
        guard let group = target.split(separator: "/").last.map(String.init) else {
            throw .malformedFile(path: link, reason: .noIOMMUGroup(target: target))
        }
        let typePath = root.path("/sys/kernel/iommu_groups/\(group)/type")
        let type: String
        if Sys.exists(typePath) {
            do { type = try Sys.readAttribute(typePath) } catch { throw .system(error) }
        } else {
            type = "unknown (\(typePath) is missing)"
        }
        // identity: passthrough (iommu=pt). DMA / DMA-FQ: translated. blocked, unmanaged
        // (vfio) and unknown all mean the device cannot reach guest-physical addresses.
        if type != "identity" { throw .iommuTranslating(bdf: address.bdf, group: group, domainType: type) }
    }

    /// 4. A present page's PFN is readable. With `probeAddress` nil, a fresh locked page of
    /// this process is probed; tests pass an address whose entry they wrote into a fake
    /// pagemap.
    public func checkPagemap(probeAddress: UInt? = nil) throws(PlatformError) {
        let resolver = try PagemapResolver(root: root)
        if let probeAddress {
            _ = try resolver.physicalAddress(ofVirtual: probeAddress)
            return
        }
        let size = resolver.pageSize
        let base: UnsafeMutableRawPointer
        do {
            unsafe base = try MappedMemory.map(length: size, protection: PROT_READ | PROT_WRITE, flags: MAP_PRIVATE | MAP_ANONYMOUS)
        } catch { throw .system(error) }
        let unmap = unsafe MappedMemory.unmapper(base, length: size)
        defer { unmap() }
        do { try unsafe MappedMemory.lock(base, length: size) } catch { throw .system(error) }
        unsafe MappedMemory.touch(base, length: size, stride: size)
        _ = try unsafe resolver.physicalAddress(ofVirtual: MappedMemory.address(of: base))
    }
}
