/// Statistics tags (virtio 1.2 §5.5.6.3 for 0–9; Linux 6.12 uapi `VIRTIO_BALLOON_S_*` adds
/// 10–15, which QEMU ≥ 9.2 knows). A device ignores the tags it does not know (QEMU keeps
/// only `tag < VIRTIO_BALLOON_S_NR`), so a driver may always send all sixteen.
public enum BalloonStatTag: UInt16, CaseIterable, Sendable {
    case swapIn = 0, swapOut = 1, majorFaults = 2, minorFaults = 3, memFree = 4, memTotal = 5
    case available = 6, caches = 7, hugetlbAllocations = 8, hugetlbFailures = 9
    /// Linux 6.12: OOM killer invocations (vm event `oom_kill`).
    case oomKills = 10
    /// Linux 6.12: allocation stalls, summed over every zone (`allocstall_*`).
    case allocationStalls = 11
    /// Linux 6.12: bytes scanned by kswapd (`pgscan_kswapd`).
    case asyncScans = 12
    /// Linux 6.12: bytes scanned by direct reclaim (`pgscan_direct`).
    case directScans = 13
    /// Linux 6.12: bytes reclaimed by kswapd (`pgsteal_kswapd`).
    case asyncReclaims = 14
    /// Linux 6.12: bytes reclaimed by direct reclaim (`pgsteal_direct`).
    case directReclaims = 15

    /// The ten tags of virtio 1.2 and Linux 6.1 (what QEMU 7.2 keeps).
    public static let virtio12: [BalloonStatTag] = allCases.filter { $0.rawValue < 10 }

    /// QEMU's QOM key (`qom-get guest-stats`; hw/virtio/virtio-balloon.c `balloon_stat_names`).
    public var qemuName: String {
        switch self {
        case .swapIn: return "stat-swap-in"
        case .swapOut: return "stat-swap-out"
        case .majorFaults: return "stat-major-faults"
        case .minorFaults: return "stat-minor-faults"
        case .memFree: return "stat-free-memory"
        case .memTotal: return "stat-total-memory"
        case .available: return "stat-available-memory"
        case .caches: return "stat-disk-caches"
        case .hugetlbAllocations: return "stat-htlb-pgalloc"
        case .hugetlbFailures: return "stat-htlb-pgfail"
        case .oomKills: return "stat-oom-kills"
        case .allocationStalls: return "stat-alloc-stalls"
        case .asyncScans: return "stat-async-scans"
        case .directScans: return "stat-direct-scans"
        case .asyncReclaims: return "stat-async-reclaims"
        case .directReclaims: return "stat-direct-reclaims"
        }
    }
}
