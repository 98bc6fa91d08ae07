import Logging
import PlatformLinux

/// What every crash recovery found and did (`recoverAfterCrash(root:logger:)`).
public struct RecoveryReport: Hashable, Sendable, CustomStringConvertible {
    /// `nr_hugepages`, left grown by the hugetlb hint source.
    public var hugeTLBPool: HugeTLBPoolRecovery
    /// `nr_overcommit_hugepages`, raised by the hugetlb balloon memory.
    public var hugeTLBOvercommit: SysctlRecovery
    /// `compact_unevictable_allowed`, cleared by the locked anonymous balloon memory.
    public var compactUnevictable: SysctlRecovery
    /// Memory blocks the offline hint source left offline.
    public var offlineBlocks: OfflineBlockRecovery = .nothingToDo
    /// Recoveries that failed (e.g. a setting could not be written); each is logged too.
    public var failures: [RecoveryFailure]

    /// Whether anything was left behind.
    public var foundAnything: Bool {
        hugeTLBPool != .nothingToDo || hugeTLBOvercommit != .nothingToDo || compactUnevictable != .nothingToDo
            || offlineBlocks != .nothingToDo || !failures.isEmpty
    }

    public var description: String {
        var parts = ["hugetlb pool: \(hugeTLBPool)", "nr_overcommit_hugepages: \(hugeTLBOvercommit)",
                     "compact_unevictable_allowed: \(compactUnevictable)", "memory blocks: \(offlineBlocks)"]
        parts += failures.map { "failed: \($0)" }
        return parts.joined(separator: "; ")
    }
}

/// One recovery that failed: what it was putting back, and why it could not.
public struct RecoveryFailure: Hashable, Sendable, CustomStringConvertible {
    /// The setting or state ("nr_hugepages", "compact_unevictable_allowed", …).
    public var what: String
    public var error: GuestMemoryError

    public init(what: String, error: GuestMemoryError) {
        self.what = what
        self.error = error
    }

    public var description: String { "\(what): \(error)" }
}

/// Puts back everything a balloond killed with SIGKILL (or the OOM killer) left changed, from
/// its state files under `/run/balloond`: the hugetlb pool size grown by the hugetlb hint
/// source, the memory blocks the offline hint source took offline, and the sysctls the
/// balloon memory backends change. Runs every recovery whatever
/// the command line enables (a previous run may have used other options). Call it early in
/// `run`, before binding the device and before taking the ring hugepage (which could
/// otherwise come from the dead process's grown pool).
///
/// A state file that is not balloond's (a link, wrong owner, writable by others) or does not
/// parse is logged in one line and moved to `<name>.bad`, and its contents are never acted
/// on, so the next start proceeds. A setting someone changed since balloond wrote it is left
/// as it is.
///
/// - Throws: only when the state directory itself cannot be trusted (a symbolic link, not
///   owned by root, or accessible to group or others); the message names the fix.
///
/// - Parameter offlineBlocks: also online the memory blocks a killed offline hint source left
///   offline. Only once the device can no longer apply that session's hints (the guardian
///   after its reset; `balloond run` passes false here and calls
///   `recoverOfflineBlocksAfterReset` from the driver's first reset).
public func recoverAfterCrash(root: SysRoot = .host, logger: Logger = Logger(label: "balloond.recovery"),
                              poolControl: HugeTLBPoolControl? = nil, offlineBlocks: Bool = true) throws(StateFileError) -> RecoveryReport {
    _ = try StateDirectory(root: root).check()
    var failures: [RecoveryFailure] = []
    func attempt<T>(_ what: String, fallback: T, _ body: () throws(GuestMemoryError) -> T) throws(StateFileError) -> T {
        do { return try body() } catch {
            if case .stateFile(let e) = error, !e.isAboutTheFile { throw e }
            logger.error("recovering \(what) after a crash failed: \(error)")
            failures.append(RecoveryFailure(what: what, error: error))
            return fallback
        }
    }
    let pool = try attempt("nr_hugepages", fallback: HugeTLBPoolRecovery.nothingToDo) { () throws(GuestMemoryError) in
        try recoverHugeTLBPool(root: root, stateFile: HugeTLBPoolStateFile(root: root), control: poolControl, logger: logger)
    }
    let overcommit = try attempt("nr_overcommit_hugepages", fallback: SysctlRecovery.nothingToDo) { () throws(GuestMemoryError) in
        try SysctlOverride.recoverAfterCrash(root: root, stateFile: SysctlStateFile(root: root, path: SysctlStateFile.hugeTLBOvercommitPath), logger: logger)
    }
    let compact = try attempt("compact_unevictable_allowed", fallback: SysctlRecovery.nothingToDo) { () throws(GuestMemoryError) in
        try SysctlOverride.recoverAfterCrash(root: root, stateFile: SysctlStateFile(root: root, path: SysctlStateFile.compactUnevictablePath), logger: logger)
    }
    let blocks = !offlineBlocks ? OfflineBlockRecovery.nothingToDo
        : try attempt("offline memory blocks", fallback: OfflineBlockRecovery.nothingToDo) { () throws(GuestMemoryError) in
            try recoverAllOfflineBlocks(root: root, control: nil, logger: logger)
        }
    var report = RecoveryReport(hugeTLBPool: pool, hugeTLBOvercommit: overcommit, compactUnevictable: compact, failures: failures)
    report.offlineBlocks = blocks
    if report.foundAnything { logger.notice("crash recovery: \(report)") }
    return report
}

/// Onlines the memory blocks a killed balloond's offline hint source left offline; for
/// `balloond run`, after its own device reset (see `recoverAfterCrash(offlineBlocks:)`).
/// Failures are logged; the state file then stays for the next start.
public func recoverOfflineBlocksAfterReset(root: SysRoot = .host, logger: Logger) {
    do {
        let outcome = try recoverAllOfflineBlocks(root: root, control: nil, logger: logger)
        if outcome != .nothingToDo { logger.notice("crash recovery after the device reset: \(outcome)") }
    } catch {
        logger.error("onlining memory blocks a killed balloond left offline failed: \(error); the offline hint source keeps them listed")
    }
}

/// What reading a state file during recovery gave.
package enum RecoveredStateFile<T> {
    case absent
    case contents(T)
    /// The file could not be trusted or parsed and was moved to `to`.
    case setAside(to: String, reason: StateFileError)
}

/// Reads a state file for recovery. A file that cannot be trusted or parsed is logged in one
/// line and moved aside (`StateFile.setAside`); nothing of it is returned. Problems with the
/// directory (or a failed rename) are thrown.
package func readStateFileOrSetAside<T>(_ file: StateFile, logger: Logger,
                                _ read: () throws(StateFileError) -> T?) throws(GuestMemoryError) -> RecoveredStateFile<T> {
    do {
        guard let value = try read() else { return .absent }
        return .contents(value)
    } catch where error.isAboutTheFile {
        let to: String
        do { to = try file.setAside() } catch { throw .stateFile(error) }
        logger.error("ignoring \(file.path) and moving it to \(to): \(error)")
        return .setAside(to: to, reason: error)
    } catch {
        throw .stateFile(error)
    }
}

/// Puts `nr_hugepages` back to what a balloond that was killed mid-round found, if it left a
/// state file and the pool is still where that balloond left it.
package func recoverHugeTLBPool(root: SysRoot, stateFile file: HugeTLBPoolStateFile, control: HugeTLBPoolControl?,
                        logger: Logger) throws(GuestMemoryError) -> HugeTLBPoolRecovery {
    let contents: HugeTLBPoolStateFile.Contents
    switch try readStateFileOrSetAside(file.file, logger: logger, { () throws(StateFileError) in try file.read() }) {
    case .absent: return .nothingToDo
    case .setAside(let to, let reason): return .setAside(path: file.path, to: to, reason: reason)
    case .contents(let c): contents = c
    }
    if file.writerIsAlive(contents) { return .otherInstanceRunning(pid: contents.pid) }
    let pool = control ?? LinuxHugeTLBPoolControl(root: root)
    let before: UInt64
    do { before = try pool.counters().total } catch { throw .cannotReadPoolSize(stateFile: file.path, error) }
    if before == contents.originalPoolSize {
        file.remove()
        return .alreadyOriginal(value: before)
    }
    guard contents.isBalloondsValue(before) else {
        // An admin (or another program) changed nr_hugepages after balloond died: theirs.
        file.remove()
        let outcome = HugeTLBPoolRecovery.changedByOthers(value: before, original: contents.originalPoolSize,
                                                                       balloondSet: contents.set)
        logger.warning("\(outcome)")
        return outcome
    }
    do {
        try pool.setPoolSize(contents.originalPoolSize)
        let after = try pool.counters().total
        file.remove()
        if after != contents.originalPoolSize {
            logger.warning("nr_hugepages is \(after) after restoring \(contents.originalPoolSize): pages in use stay until freed (they are surplus now)")
        }
        let outcome = HugeTLBPoolRecovery.restored(from: before, to: after)
        logger.notice("\(outcome)")
        return outcome
    } catch { throw .cannotRestorePoolSize(stateFile: file.path, error) }
}
