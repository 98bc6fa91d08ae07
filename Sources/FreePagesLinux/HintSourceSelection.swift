import PlatformLinux

/// Why `--hint-source` cannot be honoured; the description says what to do instead.
public struct HintSourceSelectionError: Error, Hashable, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The `--hint-source` values.
public let hintSourceNames = ["auto", "hugetlb", "anonymous", "kpageflags", "simulated"]

/// Picks the free page source (pure): the requested one if it is safe here, or for `auto` the
/// fastest safe one. `reason` is meant to be logged at start.
///
/// - `kpageflags` hints pages it only observed free. Allowed under TCG, where every write
///   after the round's bitmap sync is dirty-logged, or with `unsafeHintsOnKVM` (a write that
///   races the hint is lost on KVM with manual dirty-log protect). Refused with page
///   poisoning or init_on_free, or when init_on_free cannot be determined, whatever the
///   hypervisor: scanned pages are never rewritten, so the destination has zeros where 0xaa
///   is expected ("pagealloc: memory corruption") or stale data where zeros are assumed.
/// - `auto`: kpageflags on TCG (poisoning and init_on_free known to be off), else hugetlb
///   when the pool is usable, else anonymous. It never picks kpageflags outside TCG, even
///   with the opt-in: that takes an explicit `--hint-source kpageflags`. (`balloond run`
///   then turns hinting off when `auto` lands on an owned source under TCG, where the owned
///   sources' churn corrupts the migration destination: `RunCommand.chooseHints`.)
/// - `simulated` only against the simulated device: its addresses are not free guest memory.
///
/// - Parameter simulatedDevice: the driver runs against the BalloonSimulator (`balloond
///   simulate`), not a real device.
/// - Parameter initOnFreeKnown: false when init_on_free could not be determined
///   (`GuestMemoryDebugConfig.initOnFreeKnown`): kpageflags is then treated as with init_on_free.
public func chooseHintSource(requested: String, hypervisor: Hypervisor, memoryDebug: (pagePoisoning: Bool, initOnFree: Bool),
                             initOnFreeKnown: Bool = true, unsafeHintsOnKVM: Bool, hugetlbAvailable: Bool,
                             simulatedDevice: Bool = false) -> Result<(name: String, reason: String), HintSourceSelectionError> {
    let poisonProblem: String? = {
        if memoryDebug.pagePoisoning {
            return "page poisoning (page_poison=1) is active: kpageflags hints pages it only observed free, which the kernel never rewrites, so after migration the destination holds zeros where the kernel expects the 0xaa poison pattern and logs \"pagealloc: memory corruption\" when it allocates them"
        }
        if memoryDebug.initOnFree {
            return "init_on_free is active: kpageflags hints pages it only observed free, which the kernel never rewrites, so after migration the destination may hold stale data in pages the kernel assumes are zero, and __GFP_ZERO allocations hand it out"
        }
        if !initOnFreeKnown {
            return "whether init_on_free is active is unknown (no `mem auto-init` line in the kernel log, no init_on_free= on the command line, no readable /boot/config-$(uname -r) or /proc/config.gz), and with it kpageflags would leave stale data where the kernel assumes zeros"
        }
        return nil
    }()
    let ownedHint = "Owned sources (hugetlb, anonymous) are safe with it: their pages are re-poisoned or re-zeroed when released."
    let hugetlbMissing = "there is no usable 2 MiB hugetlb pool (needs CONFIG_HUGETLBFS and readable /proc/kpageflags and /proc/kpagecount)"

    switch requested {
    case "kpageflags":
        if let poisonProblem {
            return .failure(HintSourceSelectionError("--hint-source kpageflags is refused: \(poisonProblem). \(ownedHint) Use --hint-source hugetlb or anonymous (or auto)."))
        }
        if hypervisor == .tcg {
            return .success(("kpageflags", "--hint-source kpageflags: the guest runs under QEMU TCG (CPUID 0x40000000 reads TCGTCGTCGTCG), where every write after the round's bitmap sync is dirty-logged and re-sent, so observed free pages are safe to hint"))
        }
        if unsafeHintsOnKVM {
            return .success(("kpageflags", "--hint-source kpageflags with --unsafe-hints-on-kvm under \(hypervisor): UNSAFE. A page allocated and written between the scan and QEMU applying its hint is lost on KVM with manual dirty-log protect (the destination silently keeps stale contents)"))
        }
        return .failure(HintSourceSelectionError("--hint-source kpageflags is refused under \(hypervisor): it hints pages it does not own, and on KVM with manual dirty-log protect a write that races the hint is silently lost on the migration destination. It is safe only under QEMU TCG. Use --hint-source hugetlb or anonymous (or auto), or add --unsafe-hints-on-kvm if losing guest data is acceptable"))
    case "hugetlb":
        guard hugetlbAvailable else {
            return .failure(HintSourceSelectionError("--hint-source hugetlb is unavailable: \(hugetlbMissing). Use --hint-source anonymous or auto"))
        }
        return .success(("hugetlb", "--hint-source hugetlb: owned hugetlb pool pages (reserved, never faulted, not migrated); rounds in which other processes use the pool fall back to anonymous memory"))
    case "anonymous":
        return .success(("anonymous", "--hint-source anonymous: owned anonymous memory (populated, locked), its PFNs read after each cmd id"))
    case "simulated":
        guard simulatedDevice else {
            return .failure(HintSourceSelectionError("--hint-source simulated is only for `balloond simulate` and unit tests: its addresses come from a simulated buddy allocator, not from free guest memory, and hinting them to a real device would make QEMU skip pages in use. Use auto, hugetlb, anonymous or kpageflags"))
        }
        return .success(("simulated", "--hint-source simulated against the simulated device"))
    case "auto":
        if simulatedDevice {
            return .success(("simulated", "auto: the simulated device gets the simulated buddy allocator"))
        }
        var why: String
        if hypervisor == .tcg {
            if poisonProblem == nil {
                return .success(("kpageflags", "auto: kpageflags, the fastest source, because the guest runs under QEMU TCG (every write after the round's bitmap sync is dirty-logged) and neither page poisoning nor init_on_free is active"))
            }
            why = "QEMU TCG, but kpageflags is not used because \(memoryDebug.pagePoisoning ? "page poisoning is active" : memoryDebug.initOnFree ? "init_on_free is active" : "init_on_free is unknown")"
        } else {
            why = "\(hypervisor): only owned pages are safe to hint (kpageflags needs TCG\(unsafeHintsOnKVM ? "; --unsafe-hints-on-kvm takes effect only with an explicit --hint-source kpageflags" : ""))"
        }
        if hugetlbAvailable {
            return .success(("hugetlb", "auto: hugetlb (\(why); hugetlb pool pages are owned and not migrated; rounds in which other processes use the pool fall back to anonymous)"))
        }
        return .success(("anonymous", "auto: anonymous (\(why); \(hugetlbMissing))"))
    default:
        return .failure(HintSourceSelectionError("unknown --hint-source '\(requested)'; use one of \(hintSourceNames.joined(separator: ", "))"))
    }
}
