#if canImport(Glibc)
import Glibc
#endif
import CZlib
import SystemPackage

/// The raw inputs for deciding page poisoning and init_on_free (`GuestMemoryDebugConfig.detect`
/// in Balloon): the command line, the kernel config and the kernel log's `mem auto-init`
/// line. Each is nil (or empty) when it cannot be read; the decision itself is a pure
/// function of these.
public struct KernelMemoryDebugSources: Hashable, Sendable {
    public var cmdline: String
    /// The `.config` text, from `/boot/config-<release>` or else `/proc/config.gz`.
    public var kernelConfig: String?
    /// Where `kernelConfig` came from (for the log).
    public var kernelConfigSource: String?
    /// The kernel log records that mention `mem auto-init` (from /dev/kmsg), nil when the
    /// log cannot be read.
    public var memAutoInitLog: String?

    public init(cmdline: String, kernelConfig: String? = nil, kernelConfigSource: String? = nil, memAutoInitLog: String? = nil) {
        self.cmdline = cmdline
        self.kernelConfig = kernelConfig
        self.kernelConfigSource = kernelConfigSource
        self.memAutoInitLog = memAutoInitLog
    }

    /// Reads everything under `root`.
    public static func read(root: SysRoot = .host, kernelRelease: String = Sys.kernelRelease()) -> KernelMemoryDebugSources {
        var s = KernelMemoryDebugSources(cmdline: (try? Sys.readTextFile(root.path("/proc/cmdline"))) ?? "")
        let boot = root.path("/boot/config-\(kernelRelease)")
        if !kernelRelease.isEmpty, !kernelRelease.contains("/"), let text = try? Sys.readTextFile(boot) {
            s.kernelConfig = text
            s.kernelConfigSource = boot
        } else if let gz = try? readBytes(root.path("/proc/config.gz"), limit: 16 << 20), let text = try? gunzip(gz, limit: 64 << 20) {
            s.kernelConfig = String(decoding: text, as: UTF8.self)
            s.kernelConfigSource = root.path("/proc/config.gz")
        }
        s.memAutoInitLog = readKernelLog(root.path("/dev/kmsg"), matching: "mem auto-init:")
        return s
    }

    static func readBytes(_ path: String, limit: Int) throws(SystemCallError) -> [UInt8] {
        let f = try OpenFile(path: path, flags: O_RDONLY)
        var all: [UInt8] = []
        while all.count <= limit {
            let chunk = try f.read(count: 65536)
            if chunk.isEmpty { return all }
            all += chunk
        }
        throw SystemCallError(call: "read (over \(limit) bytes)", path: path, errno: .fileTooLarge)
    }

    /// The records of the kernel log device (`/dev/kmsg`: one record per read, EAGAIN at the
    /// end with O_NONBLOCK, EPIPE when records were overwritten) whose text contains
    /// `needle`, one per line; nil when the device cannot be opened (or is a regular file
    /// in a fake tree that holds no match).
    static func readKernelLog(_ path: String, matching needle: String, maxRecords: Int = 1 << 20) -> String? {
        guard let f = try? OpenFile(path: path, flags: O_RDONLY | O_NONBLOCK) else { return nil }
        var out: [String] = []
        var records = 0
        while records < maxRecords {
            records += 1
            let record: [UInt8]
            do { record = try f.read(count: 8192) } catch {
                if error.errno == .brokenPipe { continue }   // overwritten records; the next read goes on
                break                                        // EAGAIN: the end
            }
            if record.isEmpty { break }
            // "prio,seq,usec,flags;text\n" (continuation lines start with a space), or plain
            // text lines in a fake tree.
            for line in String(decoding: record, as: UTF8.self).split(separator: "\n") where line.contains(needle) {
                let text = line.firstIndex(of: ";").map { line[line.index(after: $0)...] } ?? line
                out.append(String(text))
            }
        }
        return out.joined(separator: "\n")
    }
}

/// What went wrong decompressing gzip data.
public enum GzipError: Error, Hashable, Sendable, CustomStringConvertible {
    /// No input bytes.
    case emptyInput
    /// zlib's `inflateInit2` failed.
    case inflateInitFailed
    /// The output grew past the limit.
    case tooLarge(limit: Int)
    /// zlib stopped with `zlibStatus` before the end of the gzip stream.
    case corrupt(zlibStatus: Int32)

    public var description: String {
        switch self {
        case .emptyInput: return "empty input"
        case .inflateInitFailed: return "inflateInit2 failed"
        case .tooLarge(let limit): return "more than \(limit) bytes"
        case .corrupt(let status): return "corrupt or truncated gzip data (zlib \(status))"
        }
    }
}

/// Decompresses gzip data (`/proc/config.gz`) with the system's zlib; at most `limit` bytes
/// of output.
public func gunzip(_ input: [UInt8], limit: Int) throws(GzipError) -> [UInt8] {
    guard !input.isEmpty else { throw .emptyInput }
    // Unsafe: zlib's stream points into `source` and `chunk` only inside their closures below.
    var stream = unsafe z_stream()
    // 16 + MAX_WBITS: a gzip header and trailer.
    guard unsafe inflateInit2_(&stream, 16 + MAX_WBITS, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
        throw .inflateInitFailed
    }
    defer { _ = unsafe inflateEnd(&stream) }
    var output: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    var source = input
    let status: Int32 = unsafe source.withUnsafeMutableBufferPointer { inBuf -> Int32 in
        unsafe stream.next_in = inBuf.baseAddress
        unsafe stream.avail_in = uInt(inBuf.count)
        while true {
            let (r, produced) = unsafe chunk.withUnsafeMutableBufferPointer { outBuf -> (Int32, Int) in
                unsafe stream.next_out = outBuf.baseAddress
                unsafe stream.avail_out = uInt(outBuf.count)
                let r = unsafe inflate(&stream, Z_NO_FLUSH)
                return (r, outBuf.count - Int(unsafe stream.avail_out))
            }
            output += chunk[0..<produced]
            if output.count > limit { return Z_BUF_ERROR }
            if r == Z_STREAM_END { return r }
            if r != Z_OK { return r }
            if unsafe produced == 0 && stream.avail_in == 0 { return Z_DATA_ERROR }   // truncated
        }
    }
    guard status == Z_STREAM_END else {
        throw output.count > limit ? .tooLarge(limit: limit) : .corrupt(zlibStatus: status)
    }
    return output
}
