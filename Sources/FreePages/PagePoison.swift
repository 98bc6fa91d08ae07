import VirtioCore

// Page poisoning, in one place (docs/virtio-balloon.md §7): what the guest kernel does to
// freed pages (detected from its command line, configuration and boot log), what the device
// is told (PAGE_POISON, `poison_val`), and what that means for free page reporting and for
// hinting pages balloond only observed free. The driver, the hint-source choice and
// `balloond run` ask these types; none of them re-derives a rule.

/// What freed pages contain, as the guest kernel is configured (docs/virtio-balloon.md §7).
public enum PagePoisonPolicy: Hashable, Sendable, CustomStringConvertible {
    /// No poisoning and no init_on_free: PAGE_POISON is not negotiated.
    case none
    /// `page_poison=1`: freed pages hold 0xaa bytes; `poison_val = 0xAAAAAAAA`.
    case poison
    /// `init_on_free=1`: freed pages are zeroed; `poison_val = 0`.
    case initOnFree

    /// The `poison_val` Linux writes for this policy, or nil when PAGE_POISON is not wanted.
    public var poisonValue: UInt32? {
        switch self {
        case .none: return nil
        case .poison: return 0xAAAA_AAAA
        case .initOnFree: return 0
        }
    }

    public var description: String {
        switch self {
        case .none: return "none"
        case .poison: return "page_poison (0xaa)"
        case .initOnFree: return "init_on_free (zero)"
        }
    }
}

/// What the guest kernel does to freed and allocated pages, from its command line and build
/// configuration (docs/virtio-balloon.md §7: `page_poisoning_enabled_static()`,
/// `want_init_on_free()`, and poisoning overriding init_on_*).
public struct GuestMemoryDebugConfig: Equatable, Sendable, CustomStringConvertible {
    /// `page_poison=1` with CONFIG_PAGE_POISONING.
    public var pagePoisoning: Bool
    /// `init_on_free=1` or CONFIG_INIT_ON_FREE_DEFAULT_ON (and not overridden by poisoning).
    /// False when unknown (see `initOnFreeKnown`).
    public var initOnFree: Bool
    /// `init_on_alloc=1` or CONFIG_INIT_ON_ALLOC_DEFAULT_ON (Debian's default).
    public var initOnAlloc: Bool
    /// Whether `initOnFree` was established: from the kernel's `mem auto-init` boot line, an
    /// explicit `init_on_free=` on the command line, or the kernel config. When none of them
    /// could be read it is unknown, and pages the kernel may zero on free must not be assumed
    /// to keep their contents (`observedHintsProblem`).
    public var initOnFreeKnown: Bool

    public init(pagePoisoning: Bool = false, initOnFree: Bool = false, initOnAlloc: Bool = false, initOnFreeKnown: Bool = true) {
        self.pagePoisoning = pagePoisoning
        self.initOnFree = initOnFree
        self.initOnAlloc = initOnAlloc
        self.initOnFreeKnown = initOnFreeKnown
    }

    /// The PAGE_POISON policy Linux's driver would use.
    public var poisonPolicy: PagePoisonPolicy {
        if pagePoisoning { return .poison }
        if initOnFree { return .initOnFree }
        return .none
    }

    public var description: String {
        "page_poison=\(pagePoisoning ? 1 : 0) init_on_free=\(initOnFreeKnown ? (initOnFree ? "1" : "0") : "unknown") init_on_alloc=\(initOnAlloc ? 1 : 0)"
    }

    /// The kernel's own report of this boot (Linux 5.3+, `report_meminit` in init/main.c,
    /// mm/page_alloc.c and mm/mm_init.c in later versions): `mem auto-init: stack:…, heap
    /// alloc:on|off, heap free:on|off`. It is printed after `init_mem_debugging_and_hardening`,
    /// so it already reflects the command line and page poisoning overriding init_on_*.
    /// Returns (alloc, free) from the last such line in `log`, nil when there is none.
    public static func memAutoInit(fromKernelLog log: String) -> (initOnAlloc: Bool, initOnFree: Bool)? {
        var found: (Bool, Bool)?
        for line in log.split(separator: "\n") {
            guard let r = line.firstRange(of: "mem auto-init: stack:") else { continue }
            let rest = line[r.upperBound...]
            func value(_ key: String) -> Bool? {
                guard let k = rest.firstRange(of: key) else { return nil }
                let v = rest[k.upperBound...].prefix { $0 != "," && $0 != " " && $0 != "\r" }
                switch v {
                case "on": return true
                case "off": return false
                default: return nil
                }
            }
            if let alloc = value("heap alloc:"), let free = value("heap free:") { found = (alloc, free) }
        }
        return found.map { (initOnAlloc: $0.0, initOnFree: $0.1) }
    }

    /// Decides from `/proc/cmdline`, the kernel config (`/boot/config-$(uname -r)` or
    /// `/proc/config.gz`, decompressed by the caller) and the kernel log's `mem auto-init`
    /// line, each where readable. The boot line wins for init_on_free and init_on_alloc; then
    /// an explicit `init_on_free=`; then the config; with none of them init_on_free is
    /// unknown (`initOnFreeKnown` false).
    ///
    /// - Parameters:
    ///   - cmdline: the kernel command line.
    ///   - kernelConfig: the `.config` text, or nil when it cannot be read.
    ///   - kernelLog: kernel log text (e.g. the `mem auto-init` records of /dev/kmsg), or nil.
    public static func detect(cmdline: String, kernelConfig: String?, kernelLog: String? = nil) -> GuestMemoryDebugConfig {
        var params: [String: String] = [:]
        for word in cmdline.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }) {
            if let eq = word.firstIndex(of: "=") {
                params[String(word[..<eq])] = String(word[word.index(after: eq)...])
            } else {
                params[String(word)] = ""
            }
        }
        func flag(_ name: String) -> Bool? {
            guard let v = params[name] else { return nil }
            switch v.lowercased() {
            case "1", "on", "y", "yes", "true", "": return true
            case "0", "off", "n", "no", "false": return false
            default: return nil
            }
        }
        func config(_ name: String) -> Bool? {
            guard let kernelConfig else { return nil }
            for line in kernelConfig.split(separator: "\n") {
                if line == "\(name)=y" { return true }
                if line == "# \(name) is not set" { return false }
            }
            return false
        }
        // page_poison=1 needs CONFIG_PAGE_POISONING; if the config is unknown, trust the cmdline.
        let poisoningBuilt = config("CONFIG_PAGE_POISONING") ?? true
        let poisoning = poisoningBuilt && (flag("page_poison") ?? false)
        var initOnFree: Bool
        var initOnAlloc: Bool
        var known = true
        if let boot = kernelLog.flatMap(memAutoInit(fromKernelLog:)) {
            initOnFree = boot.initOnFree
            initOnAlloc = boot.initOnAlloc
        } else {
            let free = flag("init_on_free") ?? config("CONFIG_INIT_ON_FREE_DEFAULT_ON")
            known = free != nil
            initOnFree = free ?? false
            initOnAlloc = flag("init_on_alloc") ?? (config("CONFIG_INIT_ON_ALLOC_DEFAULT_ON") ?? false)
        }
        if poisoning {
            // mm/page_alloc.c: poisoning overrides init_on_alloc and init_on_free.
            initOnFree = false
            initOnAlloc = false
            known = true
        }
        return GuestMemoryDebugConfig(pagePoisoning: poisoning, initOnFree: initOnFree, initOnAlloc: initOnAlloc, initOnFreeKnown: known)
    }
}

// MARK: the rules

extension PagePoisonPolicy {
    /// The features to ask for, from what balloond implements and the device offers (Linux
    /// `virtballoon_validate`): PAGE_POISON only when poisoning or init_on_free is active;
    /// REPORTING dropped when freed pages carry a value the device cannot be told (PAGE_POISON
    /// not offered), since reported pages would come back with the wrong contents.
    public func wantedFeatures(implemented: FeatureBits, offered: FeatureBits) -> FeatureBits {
        var want = implemented
        if poisonValue == nil {
            want.remove(.pagePoison)
        } else if !offered.contains(.pagePoison) {
            want.remove(.reporting)
        }
        return want
    }

    /// Why free page reporting cannot work with the negotiated `poison_val`, nil when it can:
    /// QEMU skips reports when `poison_val` is not zero (it would have to fill discarded
    /// pages with the pattern), so reporting would only hold memory.
    public static func reportingRefusal(poisonValue: UInt32?) -> String? {
        guard let v = poisonValue, v != 0 else { return nil }
        return "poison_val is 0x\(String(v, radix: 16)) (page poisoning): QEMU ignores reports then, so reporting would only hold memory"
    }
}

/// Why hinting pages balloond only observed free (kpageflags) is unsafe on this guest: the
/// kernel never rewrites a page it hinted, so after migration the destination holds zeros
/// (QEMU skipped the page) where the kernel relies on the page's contents.
public struct ObservedHintsProblem: Hashable, Sendable {
    /// A few words, e.g. "page poisoning is active".
    public let summary: String
    /// The whole reason, for a refusal.
    public let detail: String
}

extension GuestMemoryDebugConfig {
    /// Why kpageflags hints are unsafe here, nil when they are not: page poisoning or
    /// init_on_free is on, or init_on_free could not be determined. Owned sources are safe
    /// with all three: their pages are re-poisoned or re-zeroed when released.
    public var observedHintsProblem: ObservedHintsProblem? {
        if pagePoisoning {
            return ObservedHintsProblem(summary: "page poisoning is active", detail: "page poisoning (page_poison=1) is active: kpageflags hints pages it only observed free, which the kernel never rewrites, so after migration the destination holds zeros where the kernel expects the 0xaa poison pattern and logs \"pagealloc: memory corruption\" when it allocates them")
        }
        if initOnFree {
            return ObservedHintsProblem(summary: "init_on_free is active", detail: "init_on_free is active: kpageflags hints pages it only observed free, which the kernel never rewrites, so after migration the destination may hold stale data in pages the kernel assumes are zero, and __GFP_ZERO allocations hand it out")
        }
        if !initOnFreeKnown {
            return ObservedHintsProblem(summary: "whether init_on_free is active is unknown", detail: "whether init_on_free is active is unknown (no `mem auto-init` line in the kernel log, no init_on_free= on the command line, no readable /boot/config-$(uname -r) or /proc/config.gz), and with it kpageflags would leave stale data where the kernel assumes zeros")
        }
        return nil
    }
}
