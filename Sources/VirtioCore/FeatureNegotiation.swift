/// Why feature negotiation cannot succeed.
public enum FeatureNegotiationError: Error, Hashable, CustomStringConvertible {
    /// The device does not offer VERSION_1: it is legacy-only, and balloond drives modern devices.
    case version1NotOffered(offered: FeatureBits)
    /// The device requires ACCESS_PLATFORM (an IOMMU translates its addresses) and the driver
    /// programs guest-physical addresses (uio), so it cannot drive it.
    case accessPlatformRequired

    public var description: String {
        switch self {
        case .version1NotOffered(let offered):
            return "the device does not offer VERSION_1 (offered \(offered)); balloond needs a modern virtio device (QEMU: do not set disable-modern=on)"
        case .accessPlatformRequired:
            return "the device offers ACCESS_PLATFORM (iommu_platform=on): an IOMMU translates every address it uses, and the uio backend gives it guest-physical addresses. Use --backend vfio (it maps what the device may reach in the IOMMU), or start the VM without iommu_platform on the balloon"
        }
    }
}

/// The features balloond accepts: the intersection of what the device offers and what the
/// driver wants, restricted to standard balloon bits plus VERSION_1, and ACCESS_PLATFORM only
/// when the driver wants it (its addresses are IOVAs it mapped: vfio; docs/virtio-balloon.md §1.5).
///
/// - Parameters:
///   - offered: `device_feature`, both halves.
///   - wanted: what the driver implements and is configured to use.
/// - Throws: when VERSION_1 is missing, or when ACCESS_PLATFORM is offered and not wanted
///   (QEMU refuses FEATURES_OK if it is offered but not accepted).
public func negotiateFeatures(offered: FeatureBits, wanted: FeatureBits) throws(FeatureNegotiationError) -> FeatureBits {
    guard offered.contains(.version1) else { throw .version1NotOffered(offered: offered) }
    if offered.contains(.accessPlatform), !wanted.contains(.accessPlatform) { throw .accessPlatformRequired }
    let allowed: FeatureBits = FeatureBits.allBalloonBits.union([.version1, .ringReset, .eventIdx, .indirectDesc, .accessPlatform])
    var accepted = offered.intersection(wanted).intersection(allowed)
    accepted.insert(.version1)
    return accepted
}
