import FreePages
import GuestMemoryLinux
import PlatformLinux

/// Why `--hint-source` cannot be honoured; the description says what to do instead.
public enum HintSourceSelectionError: Error, Hashable, Sendable, CustomStringConvertible {
    /// kpageflags where freed pages carry a value the kernel relies on (poisoning, init_on_free).
    case kpageflagsWithPoisoning(ObservedHintsProblem)
    /// kpageflags outside TCG without `--unsafe-hints-on-kvm`.
    case kpageflagsNotTCG(Hypervisor)
    /// No usable 2 MiB hugetlb pool.
    case hugetlbUnavailable
    /// Memory blocks cannot be offlined here.
    case offlineUnavailable
    /// The simulated source against a real device.
    case simulatedOnRealDevice

    static let hugetlbMissing = "there is no usable 2 MiB hugetlb pool (needs CONFIG_HUGETLBFS and readable /proc/kpageflags and /proc/kpagecount)"

    public var description: String {
        switch self {
        case .kpageflagsWithPoisoning(let problem):
            return "--hint-source kpageflags is refused: \(problem.detail). Owned sources (hugetlb, anonymous) are safe with it: their pages are re-poisoned or re-zeroed when released. Use --hint-source hugetlb or anonymous (or auto)."
        case .kpageflagsNotTCG(let hypervisor):
            return "--hint-source kpageflags is refused under \(hypervisor): it hints pages it does not own, and on KVM with manual dirty-log protect a write that races the hint is silently lost on the migration destination. It is safe only under QEMU TCG. Use --hint-source hugetlb or anonymous (or auto), or add --unsafe-hints-on-kvm if losing guest data is acceptable"
        case .hugetlbUnavailable:
            return "--hint-source hugetlb is unavailable: \(Self.hugetlbMissing). Use --hint-source anonymous or auto"
        case .offlineUnavailable:
            return "--hint-source offline is unavailable: memory blocks cannot be taken offline here (needs CONFIG_MEMORY_HOTREMOVE, /sys/devices/system/memory and a readable /proc/kpageflags). Use --hint-source hugetlb, anonymous or auto"
        case .simulatedOnRealDevice:
            return "--hint-source simulated is only for `balloond simulate` and unit tests: its addresses come from a simulated buddy allocator, not from free guest memory, and hinting them to a real device would make QEMU skip pages in use. Use auto, hugetlb, anonymous, offline or kpageflags"
        }
    }
}

/// A free page source by name (`--hint-source`): `auto` asks `chooseHintSource` to pick.
public enum HintSource: String, CaseIterable, Sendable {
    case auto, hugetlb, anonymous, kpageflags, offline, simulated
}

/// What `chooseHintSource` decided: the source (nil: free page hinting off), why (logged at
/// start), and a warning when the choice is allowed but risky.
public struct HintSourceChoice: Hashable, Sendable {
    public var source: HintSource?
    public var reason: String
    public var warning: String?
    public init(source: HintSource?, reason: String, warning: String? = nil) {
        self.source = source
        self.reason = reason
        self.warning = warning
    }
}

/// Picks the free page source (pure): the requested one if it is safe here, or for `auto` the
/// fastest safe one. `reason` is meant to be logged at start.
///
/// - `kpageflags` hints pages it only observed free. Allowed under TCG, where every write
///   after the round's bitmap sync is dirty-logged, or with `unsafeHintsOnKVM` (a write that
///   races the hint is lost on KVM with manual dirty-log protect). Refused with page
///   poisoning or init_on_free, or when init_on_free cannot be determined, whatever the
///   hypervisor: scanned pages are never rewritten, so the destination has zeros where 0xaa
///   is expected ("pagealloc: memory corruption") or stale data where zeros are assumed.
/// - `auto`: kpageflags on TCG (poisoning and init_on_free known to be off), else offline
///   where memory blocks can be offlined, else hugetlb when the pool is usable, else
///   anonymous. It never picks kpageflags outside TCG, even with the opt-in: that takes an
///   explicit `--hint-source kpageflags`. Offline before hugetlb, measured (scripts/bench-migrate.sh,
///   QEMU 10.0, two runs of 3): it writes no page where hugetlb's pages are zeroed as they
///   are taken, and sent 0.48-0.75x hugetlb's bytes at 4 GiB (at 1 GiB 0.91x one day and
///   1.01x the other).
/// - Owned sources (hugetlb, anonymous) under TCG: measured (scripts/migrate.py,
///   balloond:anonymous-control), taking and releasing most free memory during a migration
///   corrupted the TCG destination kernel with no hint sent at all (on KVM that churn is
///   ordinary dirty logging). So where `auto` would pick one of them under TCG (memory blocks
///   cannot be offlined there) it turns hinting off instead (source nil, with the reason); an
///   explicit `--hint-source hugetlb|anonymous` is allowed with a warning.
/// - `offline` (explicit, or auto as above): owned, safe on any host and with poisoning;
///   refused when memory blocks cannot be offlined (`offlineAvailable`).
/// - `auto` with `reserveRequested` (`--hint-reserve-mib`): `offline` wherever blocks can be
///   offlined, because only it keeps a reserve (and it is safe on any host); otherwise the
///   usual choice, and the caller warns that the reserve is ignored.
/// - `simulated` only against the simulated device: its addresses are not free guest memory.
///
/// - Parameter simulatedDevice: the driver runs against the BalloonSimulator (`balloond
///   simulate`), not a real device.
/// - Parameter memoryDebug: what the guest does to freed pages; its `observedHintsProblem`
///   decides kpageflags (an unknown init_on_free counts as on).
public func chooseHintSource(requested: HintSource, hypervisor: Hypervisor, memoryDebug: GuestMemoryDebugConfig,
                             unsafeHintsOnKVM: Bool, hugetlbAvailable: Bool, offlineAvailable: Bool,
                             simulatedDevice: Bool = false, reserveRequested: Bool = false) -> Result<HintSourceChoice, HintSourceSelectionError> {
    if requested == .auto, reserveRequested, offlineAvailable, !simulatedDevice {
        return .success(HintSourceChoice(source: .offline, reason: "auto: offline, because --hint-reserve-mib asks for a reserve of memory blocks kept offline between migrations, which only the offline source keeps (owned, nothing written: safe on any host and with page poisoning)"))
    }
    let picked = pickHintSource(requested: requested, hypervisor: hypervisor, memoryDebug: memoryDebug,
                                unsafeHintsOnKVM: unsafeHintsOnKVM, hugetlbAvailable: hugetlbAvailable, offlineAvailable: offlineAvailable,
                                simulatedDevice: simulatedDevice)
    // `offline` is exempt: it takes memory out of the allocator without writing it.
    guard case .success(let choice) = picked, let source = choice.source, source == .hugetlb || source == .anonymous, hypervisor == .tcg else {
        return picked
    }
    let why = "under QEMU TCG the owned sources' churn (taking and releasing most free memory during the migration) corrupts the destination kernel even when no hint is sent"
    if requested == .auto {
        // auto picks hugetlb or anonymous only where memory blocks cannot be offlined.
        return .success(HintSourceChoice(source: nil, reason: "free page hinting disabled: auto chose \(source.rawValue) (\(choice.reason)), but \(why), and memory blocks cannot be taken offline here (needs CONFIG_MEMORY_HOTREMOVE and /sys/devices/system/memory); pass --hint-source \(source.rawValue) to use it anyway"))
    }
    return .success(HintSourceChoice(source: source, reason: choice.reason, warning: "--hint-source \(source.rawValue) under TCG: \(why)"))
}

/// The choice before the TCG rule for owned sources.
private func pickHintSource(requested: HintSource, hypervisor: Hypervisor, memoryDebug: GuestMemoryDebugConfig,
                            unsafeHintsOnKVM: Bool, hugetlbAvailable: Bool, offlineAvailable: Bool,
                            simulatedDevice: Bool) -> Result<HintSourceChoice, HintSourceSelectionError> {
    let poisonProblem = memoryDebug.observedHintsProblem

    switch requested {
    case .kpageflags:
        if let poisonProblem {
            return .failure(.kpageflagsWithPoisoning(poisonProblem))
        }
        if hypervisor == .tcg {
            return .success(HintSourceChoice(source: .kpageflags, reason: "--hint-source kpageflags: the guest runs under QEMU TCG (CPUID 0x40000000 reads TCGTCGTCGTCG), where every write after the round's bitmap sync is dirty-logged and re-sent, so observed free pages are safe to hint"))
        }
        if unsafeHintsOnKVM {
            return .success(HintSourceChoice(source: .kpageflags, reason: "--hint-source kpageflags with --unsafe-hints-on-kvm under \(hypervisor): UNSAFE. A page allocated and written between the scan and QEMU applying its hint is lost on KVM with manual dirty-log protect (the destination silently keeps stale contents)"))
        }
        return .failure(.kpageflagsNotTCG(hypervisor))
    case .hugetlb:
        guard hugetlbAvailable else {
            return .failure(.hugetlbUnavailable)
        }
        return .success(HintSourceChoice(source: .hugetlb, reason: "--hint-source hugetlb: owned hugetlb pool pages (reserved, never faulted, not migrated); rounds in which other processes use the pool fall back to anonymous memory"))
    case .anonymous:
        return .success(HintSourceChoice(source: .anonymous, reason: "--hint-source anonymous: owned anonymous memory (populated, locked), its PFNs read after each cmd id"))
    case .offline:
        guard offlineAvailable else {
            return .failure(.offlineUnavailable)
        }
        return .success(HintSourceChoice(source: .offline, reason: "--hint-source offline: owned memory blocks, taken offline whole (every page free) and onlined at DONE; nothing is zeroed or written, so it is safe on any host and with page poisoning"))
    case .simulated:
        guard simulatedDevice else {
            return .failure(.simulatedOnRealDevice)
        }
        return .success(HintSourceChoice(source: .simulated, reason: "--hint-source simulated against the simulated device"))
    case .auto:
        if simulatedDevice {
            return .success(HintSourceChoice(source: .simulated, reason: "auto: the simulated device gets the simulated buddy allocator"))
        }
        var why: String
        if hypervisor == .tcg {
            guard let poisonProblem else {
                return .success(HintSourceChoice(source: .kpageflags, reason: "auto: kpageflags, the fastest source, because the guest runs under QEMU TCG (every write after the round's bitmap sync is dirty-logged) and neither page poisoning nor init_on_free is active"))
            }
            why = "QEMU TCG, but kpageflags is not used because \(poisonProblem.summary)"
        } else {
            why = "\(hypervisor): only owned pages are safe to hint (kpageflags needs TCG\(unsafeHintsOnKVM ? "; --unsafe-hints-on-kvm takes effect only with an explicit --hint-source kpageflags" : ""))"
        }
        if offlineAvailable {
            return .success(HintSourceChoice(source: .offline, reason: "auto: offline (\(why)): memory blocks whose pages are all free are taken offline whole and onlined at DONE, owned and taken without writing a page (nothing is zeroed), so safe on any host and with page poisoning; hugetlb is used only where memory blocks cannot be offlined"))
        }
        if hugetlbAvailable {
            return .success(HintSourceChoice(source: .hugetlb, reason: "auto: hugetlb (\(why); memory blocks cannot be taken offline here; hugetlb pool pages are owned and not migrated; rounds in which other processes use the pool fall back to anonymous)"))
        }
        return .success(HintSourceChoice(source: .anonymous, reason: "auto: anonymous (\(why); \(HintSourceSelectionError.hugetlbMissing))"))
    }
}
