import VirtioCore

/// What the guest kernel does to freed and allocated pages, from its command line and build
/// configuration (virtio-balloon.md §7: `page_poisoning_enabled_static()`,
/// `want_init_on_free()`, and poisoning overriding init_on_*).
public struct GuestMemoryDebugConfig: Equatable, Sendable, CustomStringConvertible {
    /// `page_poison=1` with CONFIG_PAGE_POISONING.
    public var pagePoisoning: Bool
    /// `init_on_free=1` or CONFIG_INIT_ON_FREE_DEFAULT_ON (and not overridden by poisoning).
    public var initOnFree: Bool
    /// `init_on_alloc=1` or CONFIG_INIT_ON_ALLOC_DEFAULT_ON (Debian's default).
    public var initOnAlloc: Bool

    public init(pagePoisoning: Bool = false, initOnFree: Bool = false, initOnAlloc: Bool = false) {
        self.pagePoisoning = pagePoisoning
        self.initOnFree = initOnFree
        self.initOnAlloc = initOnAlloc
    }

    /// The PAGE_POISON policy Linux's driver would use.
    public var poisonPolicy: PagePoisonPolicy {
        if pagePoisoning { return .poison }
        if initOnFree { return .initOnFree }
        return .none
    }

    public var description: String {
        "page_poison=\(pagePoisoning ? 1 : 0) init_on_free=\(initOnFree ? 1 : 0) init_on_alloc=\(initOnAlloc ? 1 : 0)"
    }

    /// Decides from `/proc/cmdline` and, where readable, the kernel config
    /// (`/boot/config-$(uname -r)` or `/proc/config.gz` decompressed by the caller).
    ///
    /// - Parameters:
    ///   - cmdline: the kernel command line.
    ///   - kernelConfig: the `.config` text, or nil when it cannot be read.
    public static func detect(cmdline: String, kernelConfig: String?) -> GuestMemoryDebugConfig {
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
        var initOnFree = flag("init_on_free") ?? (config("CONFIG_INIT_ON_FREE_DEFAULT_ON") ?? false)
        var initOnAlloc = flag("init_on_alloc") ?? (config("CONFIG_INIT_ON_ALLOC_DEFAULT_ON") ?? false)
        if poisoning {
            // mm/page_alloc.c: poisoning overrides init_on_alloc and init_on_free.
            initOnFree = false
            initOnAlloc = false
        }
        return GuestMemoryDebugConfig(pagePoisoning: poisoning, initOnFree: initOnFree, initOnAlloc: initOnAlloc)
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
