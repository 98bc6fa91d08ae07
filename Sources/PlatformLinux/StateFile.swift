#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// Why a state file under `/run/balloond` cannot be trusted or used. Each description says
/// what to do about it.
public enum StateFileError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The state directory is a symbolic link.
    case directoryIsSymlink(path: String)
    /// The state directory exists but is not a directory.
    case directoryNotADirectory(path: String)
    /// The state directory is owned by someone other than root.
    case directoryWrongOwner(path: String, owner: UInt32, expected: UInt32)
    /// The state directory can be read, entered or written by group or others.
    case directoryTooOpen(path: String, mode: UInt32)
    /// The state file is a symbolic link (refused by `O_NOFOLLOW`).
    case fileIsSymlink(path: String)
    /// The state file is a FIFO, device, directory or socket.
    case fileNotRegular(path: String)
    /// The state file is owned by someone other than root.
    case fileWrongOwner(path: String, owner: UInt32, expected: UInt32)
    /// The state file can be written by group or others.
    case fileWritableByOthers(path: String, mode: UInt32)
    /// The state file is larger than any file balloond writes.
    case fileTooLarge(path: String, limit: Int)
    /// The contents do not parse.
    case malformed(path: String, problem: StateRecordProblem)
    /// A value balloond was asked to write cannot be represented in the file (e.g. a newline).
    case unwritableValue(key: String)
    /// A system call failed.
    case system(SystemCallError)

    /// Whether the problem is with one file (which can be set aside so the next start
    /// proceeds) rather than with the directory or the system.
    public var isAboutTheFile: Bool {
        switch self {
        case .fileIsSymlink, .fileNotRegular, .fileWrongOwner, .fileWritableByOthers, .fileTooLarge, .malformed: return true
        case .directoryIsSymlink, .directoryNotADirectory, .directoryWrongOwner, .directoryTooOpen, .unwritableValue, .system: return false
        }
    }

    public var description: String {
        switch self {
        case .directoryIsSymlink(let p):
            return "the state directory \(p) is a symbolic link; balloond keeps root-only state there and refuses to follow it. Remove it (rm \(p)) and start balloond again, which creates it with mode 0700"
        case .directoryNotADirectory(let p):
            return "the state directory \(p) is not a directory. Remove it (rm \(p)) and start balloond again, which creates it with mode 0700"
        case .directoryWrongOwner(let p, let owner, let expected):
            return "the state directory \(p) is owned by uid \(owner), not \(expected == 0 ? "root" : "uid \(expected)"); anyone who owns it could plant state files. Fix it with chown \(expected == 0 ? "root:root" : "\(expected)") \(p) && chmod 0700 \(p), or remove it"
        case .directoryTooOpen(let p, let mode):
            return "the state directory \(p) has mode 0\(String(mode & 0o7777, radix: 8)); it must be 0700 (only root may read or write balloond's state). Fix it with chmod 0700 \(p)"
        case .fileIsSymlink(let p):
            return "the state file \(p) is a symbolic link; balloond does not follow links in its state directory. Remove it (rm \(p))"
        case .fileNotRegular(let p):
            return "the state file \(p) is not a regular file. Remove it (rm \(p))"
        case .fileWrongOwner(let p, let owner, let expected):
            return "the state file \(p) is owned by uid \(owner), not \(expected == 0 ? "root" : "uid \(expected)"); balloond only trusts files it wrote. Remove it (rm \(p))"
        case .fileWritableByOthers(let p, let mode):
            return "the state file \(p) has mode 0\(String(mode & 0o7777, radix: 8)) and can be written by others; balloond only trusts files it wrote. Remove it (rm \(p))"
        case .fileTooLarge(let p, let limit):
            return "the state file \(p) is larger than \(limit) bytes, which balloond never writes. Remove it (rm \(p))"
        case .malformed(let p, let problem):
            return "the state file \(p) is malformed (\(problem)); balloond does not act on it. Check the setting it names by hand and remove the file (rm \(p))"
        case .unwritableValue(let key):
            return "the value for '\(key)' contains a newline or NUL and cannot be written to a state file"
        case .system(let e):
            var s = e.description
            if e.errno == .permissionDenied || e.errno == .notPermitted { s += ". Run balloond as root." }
            return s
        }
    }
}

/// What is wrong with a state file's contents.
public enum StateRecordProblem: Error, Hashable, Sendable, CustomStringConvertible {
    /// Line `line` (1-based) is not `key=value`.
    case notKeyValue(line: Int)
    case unknownKey(String)
    case duplicateKey(String)
    case missingKey(String)
    /// Not a plain decimal number in range (no sign, spaces or other characters).
    case badNumber(key: String, value: String)
    /// A value the file's reader does not accept.
    case badValue(key: String, value: String, expected: String)
    /// Not UTF-8 text.
    case notUTF8
    /// Not exactly one line (`text`, the start of the file), where one line with `expected` was.
    case notOneLine(text: String, expected: String)

    public var description: String {
        switch self {
        case .notKeyValue(let line): return "line \(line) is not key=value"
        case .unknownKey(let k): return "unknown key '\(k.prefix(64))'"
        case .duplicateKey(let k): return "key '\(k)' appears twice"
        case .missingKey(let k): return "key '\(k)' is missing"
        case .badNumber(let k, let v): return "'\(k)' is \(String(v.prefix(64)).debugDescription), not a number"
        case .badValue(let k, let v, let expected): return "'\(k)' is \(String(v.prefix(128)).debugDescription); expected \(expected)"
        case .notUTF8: return "not UTF-8 text"
        case .notOneLine(let text, let expected): return "expected one line with \(expected), got \(String(text.prefix(128)).debugDescription)"
        }
    }
}

/// A strict `key=value` record, one pair per line: every key known, none twice, every
/// required one present, numbers plain decimal.
public struct StateRecord: Hashable, Sendable {
    public private(set) var values: [String: String]

    public init(_ values: [String: String] = [:]) { self.values = values }

    /// Parses `text`. A final newline is expected; blank lines, lines without `=`, keys not in
    /// `keys`, repeated keys and missing `required` keys are errors.
    public static func parse(_ text: String, keys: Set<String>, required: Set<String>) throws(StateRecordProblem) -> StateRecord {
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        if lines.last == "" { lines.removeLast() }
        var values: [String: String] = [:]
        for (i, line) in lines.enumerated() {
            guard let eq = line.firstIndex(of: "="), eq != line.startIndex else { throw .notKeyValue(line: i + 1) }
            let key = String(line[..<eq]), value = String(line[line.index(after: eq)...])
            guard keys.contains(key) else { throw .unknownKey(key) }
            guard values[key] == nil else { throw .duplicateKey(key) }
            values[key] = value
        }
        for key in required.sorted() where values[key] == nil { throw .missingKey(key) }
        return StateRecord(values)
    }

    public subscript(key: String) -> String? {
        get { values[key] }
        set { values[key] = newValue }
    }

    /// A plain decimal number (digits only, no sign or spaces, in range), nil when absent.
    public func uint64(_ key: String) throws(StateRecordProblem) -> UInt64? {
        guard let v = values[key] else { return nil }
        guard let n = Self.decimal(v) else { throw .badNumber(key: key, value: v) }
        return n
    }

    /// A process id (1...Int32.max), nil when absent.
    public func pid(_ key: String) throws(StateRecordProblem) -> Int32? {
        guard let v = values[key] else { return nil }
        guard let n = Self.decimal(v), n >= 1, n <= UInt64(Int32.max) else { throw .badNumber(key: key, value: v) }
        return Int32(n)
    }

    /// Plain decimal numbers separated by commas (none when the value is empty), each at most
    /// `max`; nil when absent.
    public func decimalList(_ key: String, max: UInt64 = .max) throws(StateRecordProblem) -> [UInt64]? {
        guard let v = values[key] else { return nil }
        if v.isEmpty { return [] }
        var out: [UInt64] = []
        for part in v.split(separator: ",", omittingEmptySubsequences: false) {
            guard let n = Self.decimal(String(part)), n <= max else {
                throw .badValue(key: key, value: v, expected: "decimal numbers up to \(max) separated by commas")
            }
            out.append(n)
        }
        return out
    }

    static func decimal(_ s: String) -> UInt64? {
        guard !s.isEmpty, s.utf8.count <= 20, s.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
        return UInt64(s)
    }

    /// The text: one `key=value` line per pair, in `order` (keys not listed follow, sorted).
    public func render(order: [String] = []) throws(StateFileError) -> String {
        var out = ""
        let rest = values.keys.filter { !order.contains($0) }.sorted()
        for key in order + rest {
            guard let v = values[key] else { continue }
            if v.contains("\n") || v.contains("\0") || key.contains("=") || key.contains("\n") { throw .unwritableValue(key: key) }
            out += "\(key)=\(v)\n"
        }
        return out
    }
}

/// balloond's state directory (`/run/balloond` under a `SysRoot`): owned by root, mode
/// 0700, never a symbolic link. Created so if missing; anything else is refused with a
/// message that names the fix.
public struct StateDirectory: Hashable, Sendable {
    public static let defaultPath = "/run/balloond"
    /// The directory (root prefix applied).
    public let path: String
    /// The uid that must own the directory and its files (`SysRoot.stateOwner`: root on the
    /// host).
    public let owner: UInt32

    /// `path` (absolute, on the guest) under `root`.
    public init(root: SysRoot = .host, path: String = StateDirectory.defaultPath) {
        self.path = root.path(path)
        self.owner = root.stateOwner
    }

    /// An explicit directory (root prefix already applied).
    public init(fullPath: String, owner: UInt32) {
        var p = fullPath
        while p.count > 1 && p.hasSuffix("/") { p.removeLast() }
        self.path = p
        self.owner = owner
    }

    /// Checks the directory; false when it does not exist.
    public func check() throws(StateFileError) -> Bool {
        let st: stat?
        do { st = try Sys.lstatIfExists(path) } catch { throw .system(error) }
        guard let st else { return false }
        let type = st.st_mode & S_IFMT
        if type == S_IFLNK { throw .directoryIsSymlink(path: path) }
        guard type == S_IFDIR else { throw .directoryNotADirectory(path: path) }
        guard st.st_uid == owner else { throw .directoryWrongOwner(path: path, owner: st.st_uid, expected: owner) }
        guard st.st_mode & 0o077 == 0 else { throw .directoryTooOpen(path: path, mode: UInt32(st.st_mode)) }
        return true
    }

    /// Checks the directory, creating it (mode 0700) if it does not exist.
    public func prepare() throws(StateFileError) {
        if try check() { return }
        let parent = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        do { if !parent.isEmpty { try Sys.makeDirectories(parent, mode: 0o755) } } catch { throw .system(error) }
        let p = path
        if unsafe mkdir(p, 0o700) != 0 {
            let e = Glibc.errno
            if e != EEXIST { throw .system(SystemCallError(call: "mkdir", path: p, errno: Errno(rawValue: e))) }
        }
        guard try check() else { throw .system(SystemCallError(call: "mkdir", path: path, errno: .noSuchFileOrDirectory)) }
    }

    /// The file `name` (no `/`) in this directory.
    public func file(_ name: String) -> StateFile { StateFile(directory: self, name: name) }
}

/// One file in a `StateDirectory`, written atomically (a temporary file in the same
/// directory, fsync, rename) with mode 0600, and read only if it is a regular file (opened
/// with `O_NOFOLLOW`) owned by the directory's owner and not writable by group or others.
public struct StateFile: Hashable, Sendable {
    public let directory: StateDirectory
    public let name: String
    /// The largest file `read` accepts.
    public static let maxBytes = 1 << 20

    public init(directory: StateDirectory, name: String) {
        self.directory = directory
        self.name = name
    }

    /// The file at `path` (absolute, on the guest) under `root`: its directory is the
    /// state directory.
    public init(root: SysRoot = .host, path: String) {
        let slash = path.lastIndex(of: "/") ?? path.startIndex
        let dir = String(path[..<slash])
        self.init(directory: StateDirectory(root: root, path: dir.isEmpty ? "/" : dir),
                  name: String(path[path.index(after: slash)...]))
    }

    /// The file (root prefix applied).
    public var path: String { directory.path + "/" + name }
    /// Where `setAside` moves it.
    public var setAsidePath: String { path + ".bad" }

    /// Whether something exists at the path (without following a link).
    public var exists: Bool { Sys.exists(path) }

    /// Replaces the contents atomically (creates the directory if missing).
    public func write(_ text: String) throws(StateFileError) {
        try directory.prepare()
        do { try Sys.replaceFile(path, with: Array(text.utf8), mode: 0o600, temporary: path + ".tmp", durable: true) } catch {
            throw .system(error)
        }
        // The rename is durable once the directory is synced (best effort: /run is tmpfs).
        if let d = try? OpenFile(path: directory.path, flags: O_RDONLY | O_DIRECTORY) {
            let fd = d.descriptor
            _ = try? Sys.call("fsync", path: directory.path) { fsync(fd) }
        }
    }

    /// The contents, nil when neither the file nor the directory exists. The directory and
    /// the file are checked first (see the type).
    public func read() throws(StateFileError) -> String? {
        guard try directory.check() else { return nil }
        let f: OpenFile
        do { f = try OpenFile(path: path, flags: O_RDONLY | O_NOFOLLOW | O_NONBLOCK) } catch {
            if error.errno == .noSuchFileOrDirectory { return nil }
            if error.errno == .tooManySymbolicLinkLevels { throw .fileIsSymlink(path: path) }
            throw .system(error)
        }
        let st: stat
        do { st = try f.status() } catch { throw .system(error) }
        guard st.st_mode & S_IFMT == S_IFREG else { throw .fileNotRegular(path: path) }
        guard st.st_uid == directory.owner else { throw .fileWrongOwner(path: path, owner: st.st_uid, expected: directory.owner) }
        guard st.st_mode & 0o022 == 0 else { throw .fileWritableByOthers(path: path, mode: UInt32(st.st_mode)) }
        var bytes: [UInt8] = []
        while true {
            let chunk: [UInt8]
            do { chunk = try f.read(count: 65536) } catch { throw .system(error) }
            if chunk.isEmpty { break }
            bytes += chunk
            if bytes.count > Self.maxBytes { throw .fileTooLarge(path: path, limit: Self.maxBytes) }
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw .malformed(path: path, problem: .notUTF8)
        }
        return text
    }

    /// The contents as a strict `StateRecord` (see `StateRecord.parse`), nil when absent.
    public func readRecord(keys: Set<String>, required: Set<String>) throws(StateFileError) -> StateRecord? {
        guard let text = try read() else { return nil }
        do { return try StateRecord.parse(text, keys: keys, required: required) } catch {
            throw .malformed(path: path, problem: error)
        }
    }

    /// Removes the file; a missing file is not an error.
    public func remove() throws(StateFileError) {
        do { try Sys.removeFile(path) } catch { throw .system(error) }
    }

    /// Moves the file to `<name>.bad` (replacing an older one), so the next start proceeds
    /// without acting on it and an admin can still look at it. Works on links too (rename
    /// does not follow them). Returns the new path.
    @discardableResult
    public func setAside() throws(StateFileError) -> String {
        let from = path, to = setAsidePath
        do { _ = try Sys.call("rename", path: from) { unsafe rename(from, to) } } catch { throw .system(error) }
        return to
    }
}
