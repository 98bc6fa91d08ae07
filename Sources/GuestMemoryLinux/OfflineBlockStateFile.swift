import Logging
import PlatformLinux

/// `/run/balloond/offline-blocks`: the memory blocks the `offline` hint source took offline
/// and has not onlined yet (`balloon-offline-blocks`: the same for the balloon's memory). A block is added *before* balloond writes `offline` to it and
/// removed after it is online again (`OfflineBlockLedger` keeps that order for both owners),
/// so a balloond killed with SIGKILL leaves every block it may have offlined listed; the next
/// start's `recoverAfterCrash` onlines the listed blocks that are still offline (a block an
/// admin offlined is never listed, so never touched).
///
/// A killed balloond loses no data this way: an offline block is used by nobody, so the
/// device acting on a late hint for it is harmless. The guest only lacks that memory until
/// the guardian (after its device reset) or the next start (after its device reset) onlines it.
///
/// Format (strict, see `StateRecord`): `blocks=N,N,...` (ascending, may be empty), `pid=P`,
/// `comm=NAME`.
public struct OfflineBlockStateFile: Hashable, Sendable {
    public static let defaultPath = "/run/balloond/offline-blocks"
    /// The balloon's offline memory blocks (`OfflineBalloonMemory`): the same format and the
    /// same recovery, a file of its own so that neither owner rewrites the other's list.
    public static let balloonPath = "/run/balloond/balloon-offline-blocks"
    /// Every file crash recovery onlines blocks from.
    public static let allPaths = [defaultPath, balloonPath]
    public let file: StateFile
    public let root: SysRoot
    public var path: String { file.path }

    public init(root: SysRoot = .host, path: String = OfflineBlockStateFile.defaultPath) {
        self.root = root
        self.file = StateFile(root: root, path: path)
    }

    public struct Contents: Hashable, Sendable {
        public var blocks: [Int]
        public var pid: Int32
        public var comm: String?
        public init(blocks: [Int], pid: Int32 = Sys.processID, comm: String? = nil) {
            self.blocks = blocks
            self.pid = pid
            self.comm = comm
        }
    }

    package static let keys = ["blocks", "pid", "comm"]

    /// Records `blocks` (the file is removed when it is empty).
    public func write(blocks: [Int]) throws(GuestMemoryError) {
        if blocks.isEmpty {
            do { try file.remove() } catch { throw .stateFile(error) }
            return
        }
        let record = StateRecord(["blocks": blocks.sorted().map(String.init).joined(separator: ","), "pid": "\(Sys.processID)",
                                  "comm": processComm(root: root)])
        do { try file.write(try record.render(order: Self.keys)) } catch { throw .stateFile(error) }
    }

    /// The contents, nil when there is no file; a file that is not balloond's or does not
    /// parse is an error.
    public func read() throws(StateFileError) -> Contents? {
        guard let r = try file.readRecord(keys: Set(Self.keys), required: ["blocks", "pid"]) else { return nil }
        do throws(StateRecordProblem) {
            let blocks = try r.decimalList("blocks", max: UInt64(Int32.max))!.map { Int($0) }
            return Contents(blocks: blocks, pid: try r.pid("pid")!, comm: r["comm"].flatMap { $0.isEmpty ? nil : $0 })
        } catch { throw .malformed(path: path, problem: error) }
    }
}

/// What recovering the offline hint source's blocks did.
public enum OfflineBlockRecovery: Hashable, Sendable, CustomStringConvertible {
    case nothingToDo
    /// Blocks brought back online (those listed and still offline).
    case onlined([Int])
    case otherInstanceRunning(pid: Int32)
    case setAside(path: String, to: String, reason: StateFileError)
    public var description: String {
        switch self {
        case .nothingToDo: return "no offline memory blocks left behind"
        case .onlined(let b): return "onlined memory blocks \(b.map(String.init).joined(separator: ",")), left offline by a balloond that did not exit cleanly"
        case .otherInstanceRunning(let pid): return "the offline-blocks state file belongs to a running balloond (pid \(pid)); left alone"
        case .setAside(let path, let to, let reason): return "set \(path) aside as \(to) without acting on it: \(reason)"
        }
    }
}

/// Onlines the blocks a killed balloond's offline source left offline (listed in its state file).
/// `recoverOfflineBlocks` for every state file (the hint source's and the balloon's): all are
/// tried; the blocks onlined are reported together, and the first failure is thrown after.
package func recoverAllOfflineBlocks(root: SysRoot, control: MemoryBlockControl?, logger: Logger,
                                     paths: [String] = OfflineBlockStateFile.allPaths) throws(GuestMemoryError) -> OfflineBlockRecovery {
    var onlined: [Int] = []
    var other: OfflineBlockRecovery = .nothingToDo
    var failure: GuestMemoryError?
    for path in paths {
        do {
            switch try recoverOfflineBlocks(root: root, stateFile: OfflineBlockStateFile(root: root, path: path), control: control, logger: logger) {
            case .onlined(let b): onlined += b
            case .nothingToDo: break
            case let outcome: if other == .nothingToDo { other = outcome }
            }
        } catch { failure = failure ?? error }
    }
    if let failure { throw failure }
    return onlined.isEmpty ? other : .onlined(onlined.sorted())
}

package func recoverOfflineBlocks(root: SysRoot, stateFile file: OfflineBlockStateFile, control: MemoryBlockControl?,
                          logger: Logger) throws(GuestMemoryError) -> OfflineBlockRecovery {
    let contents: OfflineBlockStateFile.Contents
    switch try readStateFileOrSetAside(file.file, logger: logger, { () throws(StateFileError) in try file.read() }) {
    case .absent: return .nothingToDo
    case .setAside(let to, let reason): return .setAside(path: file.path, to: to, reason: reason)
    case .contents(let c): contents = c
    }
    if stateWriterIsAlive(root: root, pid: contents.pid, comm: contents.comm) { return .otherInstanceRunning(pid: contents.pid) }
    let blocks: MemoryBlockControl
    if let control { blocks = control } else { blocks = try LinuxMemoryBlocks(root: root) }
    var onlined: [Int] = []
    var failures: [GuestMemoryError] = []
    for b in contents.blocks where blocks.isOffline(b) == true {
        do {
            try blocks.online(b)
            onlined.append(b)
        } catch { failures.append(error) }
    }
    if !failures.isEmpty {
        // Keep the file: the next start tries the remaining blocks again.
        throw .several(failures)
    }
    // Remove it only if it is still the dead process's list (a newer balloond may have
    // written its own since).
    if let now = try? file.read(), now.pid == contents.pid {
        do { try file.file.remove() } catch { throw .stateFile(error) }
    }
    let outcome: OfflineBlockRecovery = onlined.isEmpty ? .nothingToDo : .onlined(onlined)
    if !onlined.isEmpty { logger.notice("\(outcome)") }
    return outcome
}
