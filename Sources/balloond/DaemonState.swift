import Balloon
import FoundationEssentials
import PlatformLinux
/// What a running `balloond run` publishes for `balloond status`: a JSON state file in the
/// root-only state directory, written through `StateFile` (a temporary file, fsync, rename)
/// whenever the driver's state changes and at least every few seconds while it runs. Read
/// back only if it is a regular root-owned file that others cannot write, has no keys but
/// these, and holds sane values.
struct DaemonState: Codable, Equatable {
    var pid: Int32
    var device: String
    var pciID: String
    var previousDriver: String?
    var uioDevice: String
    var dmaMemory: String
    var hintSource: String?
    var startedAt: Double
    var updatedAt: Double
    var restarts: Int
    var driver: BalloonDriverStatus

    static let defaultPath = "/run/balloond/status.json"
    static let keys: Set<String> = ["pid", "device", "pciID", "previousDriver", "uioDevice", "dmaMemory", "hintSource",
                                    "startedAt", "updatedAt", "restarts", "driver"]

    /// - Parameters:
    ///   - path: the file (absolute, on the guest); its directory is the state directory.
    ///   - root: where "/" is (tests use a fake tree).
    func write(to path: String, root: SysRoot = .host) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let data = try encoder.encode(self)
        try StateFile(root: root, path: path).write(String(decoding: data, as: UTF8.self))
    }

    /// The state, or a `Failure` that says why it cannot be used.
    static func read(from path: String, root: SysRoot = .host) throws -> DaemonState {
        let file = StateFile(root: root, path: path)
        let text: String?
        do { text = try file.read() } catch { throw Failure.stateFile(error) }
        guard let text else {
            throw Failure.noState(path: file.path)
        }
        return try decode(text, path: file.path)
    }

    /// Parses the JSON strictly: unknown top-level keys, a pid that is not a process id and
    /// times that are not finite, non-negative numbers are refused.
    static func decode(_ text: String, path: String) throws -> DaemonState {
        let data = Data(text.utf8)
        let state: DaemonState
        do {
            let found = try JSONDecoder().decode(TopLevelKeys.self, from: data).keys
            if let unknown = found.subtracting(keys).sorted().first {
                throw Failure.notAStateFile(path: path, .unknownKey(unknown))
            }
            state = try JSONDecoder().decode(DaemonState.self, from: data)
        } catch let failure as Failure { throw failure } catch {
            throw Failure.notAStateFile(path: path, .undecodable(error))
        }
        guard state.pid > 0 else { throw Failure.notAStateFile(path: path, .badPID(state.pid)) }
        for (name, t) in [("startedAt", state.startedAt), ("updatedAt", state.updatedAt)] where !(t.isFinite && t >= 0) {
            throw Failure.notAStateFile(path: path, .badTime(key: name, t))
        }
        guard state.restarts >= 0 else { throw Failure.notAStateFile(path: path, .badRestarts(state.restarts)) }
        return state
    }

    static func remove(at path: String, root: SysRoot = .host) { try? StateFile(root: root, path: path).remove() }

    /// Whole seconds from `start` to `now` for display, "?" when either is not a usable time
    /// (never traps, whatever the file held).
    static func elapsedSeconds(from start: Double, to now: Double) -> String {
        let d = now - start
        guard d.isFinite, d > -1e15, d < 1e15 else { return "?" }
        return "\(Int(d.rounded(.towardZero)))"
    }
}

/// The set of keys of a JSON object.
private struct TopLevelKeys: Decodable {
    let keys: Set<String>
    struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }
    init(from decoder: Decoder) throws {
        keys = Set(try decoder.container(keyedBy: AnyKey.self).allKeys.map(\.stringValue))
    }
}

/// Seconds since the epoch.
func wallClockSeconds() -> Double { Sys.wallClockSeconds() }

/// Whether a process with this pid exists (only positive pids).
func processExists(_ pid: Int32) -> Bool { Sys.processExists(pid) }
