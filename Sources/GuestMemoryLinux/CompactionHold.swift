import Logging
import PlatformLinux

/// `vm.compact_unevictable_allowed = 0` while any user of locked 4 KiB pages holds it: the
/// balloon's locked anonymous memory, the anonymous hint source's chunks, and the 4 KiB DMA
/// pages (`PageDMAAllocator`). Compaction migrates mlocked (unevictable) pages only while the
/// setting is 1 (the default); a migrated page's old frame goes back to the buddy allocator
/// while the device may still act on it.
///
/// One instance per balloond, shared by all of them: the setting has one original value and
/// one state file (`/run/balloond/balloon-compact.state`, through `SysctlOverride`), so a
/// restart after SIGKILL puts it back. `acquire`/`release` nest; the first acquire records
/// the original and sets 0, every acquire checks it is still 0 (someone may have set it
/// back), and the last release restores it.
public final class CompactionHold: MigrationHold {
    public static let setting = "/proc/sys/vm/compact_unevictable_allowed"
    public let root: SysRoot
    private let override: SysctlOverride
    private let logger: Logger
    public private(set) var holders = 0

    public init(root: SysRoot = .host, stateFile: SysctlStateFile? = nil, logger: Logger = Logger(label: "balloond.compaction")) {
        self.root = root
        self.logger = logger
        override = SysctlOverride(root: root, sysctl: Self.setting,
                                  stateFile: stateFile ?? SysctlStateFile(root: root, path: SysctlStateFile.compactUnevictablePath), logger: logger)
    }

    deinit {
        if holders > 0, let problem = override.restore() { logger.warning("\(problem)") }
    }

    public var isHeld: Bool { holders > 0 }

    /// Puts the setting back to what a balloond that was killed found, if it left a state
    /// file; nothing while this process holds it (the file is then its own).
    @discardableResult
    public func recoverAfterCrash() throws(GuestMemoryError) -> SysctlRecovery {
        guard holders == 0, !override.isActive else { return .nothingToDo }
        return try SysctlOverride.recoverAfterCrash(root: root, stateFile: override.stateFile, logger: logger)
    }

    /// Makes sure the setting is 0 now, without taking a hold (for a holder re-checking).
    public func reassert() throws(GuestMemoryError) {
        guard override.exists else { return }  // CONFIG_COMPACTION=n: nothing migrates them
        // Puts back what a killed balloond left first, so its 0 is not taken for the original.
        _ = try override.baseline()
        let now = try override.read()
        if now == 0 { return }
        if override.isActive {
            logger.warning("\(root.path(Self.setting)) was set back to \(now) by someone else while locked pages are held; setting it to 0 again")
        }
        do { try override.set(0) } catch {
            throw .cannotHold(path: root.path(Self.setting), value: 0, error)
        }
    }

    /// Takes a hold (see the type's notes).
    public func hold() throws(GuestMemoryError) {
        try reassert()
        holders += 1
    }

    public func acquire() throws(MigrationHoldError) {
        do { try hold() } catch { throw .holder(error) }
    }

    public func release() {
        guard holders > 0 else { return }
        holders -= 1
        if holders == 0, let problem = override.restore() { logger.warning("\(problem)") }
    }
}
