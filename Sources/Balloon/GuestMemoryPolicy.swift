import VirtioCore

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
    /// to keep their contents (`kpageflagsProblem`).
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

    /// Why hinting pages balloond only observed free (kpageflags) is unsafe here, nil when it
    /// is not: page poisoning or init_on_free is on, or init_on_free could not be determined.
    public var kpageflagsProblem: String? {
        if pagePoisoning { return "page poisoning is active" }
        if initOnFree { return "init_on_free is active" }
        if !initOnFreeKnown {
            return "whether init_on_free is active is unknown (no `mem auto-init` line in the kernel log, no init_on_free= on the command line, and neither /boot/config-$(uname -r) nor /proc/config.gz readable)"
        }
        return nil
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

/// Stats from the running kernel's `/proc/vmstat` and `/proc/meminfo`.
public final class ProcStatsSource: BalloonStatsSource {
    let readFile: (String) -> String?
    let pageSize: UInt64

    /// - Parameter readFile: returns a file's text, or nil when it cannot be read.
    public init(pageSize: UInt64 = 4096, readFile: @escaping (String) -> String?) {
        self.readFile = readFile
        self.pageSize = pageSize
    }

    public func collect() -> [BalloonStat] {
        computeBalloonStats(vmstat: readFile("/proc/vmstat") ?? "", meminfo: readFile("/proc/meminfo") ?? "", pageSize: pageSize)
    }
}
