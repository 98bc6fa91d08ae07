// A connected AF_UNIX stream socket with deadline-based blocking I/O, shared by the QMP
// client and the guest command channel. Plain Glibc (socket/connect/poll/read/send): the
// harness is synchronous on purpose, so every wait is an explicit poll() with a timeout.

import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Every error the harness throws. `message` says what happened and what to do.
struct HarnessError: Error, CustomStringConvertible {
    enum Kind: Sendable {
        /// A wait ran out of time.
        case timeout
        /// The peer closed the connection (QEMU exited or dropped the client).
        case closed
        /// A system call failed.
        case io
        /// The peer sent something the harness could not parse.
        case protocolViolation
        /// QMP answered with an error.
        case qmp
        /// A command in the guest failed (non-zero status where success was required).
        case commandFailed
        /// Prerequisites missing or the guest did not come up.
        case setup
    }

    let kind: Kind
    let message: String

    init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    var description: String { message }

    /// The same error with context appended (e.g. where the run directory is).
    func adding(_ context: String) -> HarnessError {
        HarnessError(kind, message + "\n" + context)
    }
}

func errnoString(_ code: Int32 = errno) -> String {
    String(cString: strerror(code)) + " (errno \(code))"
}

final class UnixSocket {
    let path: String
    private var fd: Int32

    /// Connects to the socket at `path`. QEMU creates its listening sockets shortly after it
    /// starts, so ENOENT/ECONNREFUSED are retried until `timeout` seconds have passed.
    init(connectingTo path: String, timeout: TimeInterval) throws {
        self.path = path
        var addr = sockaddr_un()
        let pathBytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard pathBytes.count < capacity else {
            throw HarnessError(.io, "unix socket path is \(pathBytes.count) bytes, the limit is \(capacity - 1): \(path) (use a shorter run directory)")
        }
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { buffer in
            buffer.copyBytes(from: pathBytes)
            buffer[pathBytes.count] = 0
        }

        let deadline = Date().addingTimeInterval(timeout)
        var lastError: Int32 = 0
        while true {
            // CLOEXEC: QEMU processes started later (other tests) must not inherit it.
            let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard s >= 0 else { throw HarnessError(.io, "socket(AF_UNIX): \(errnoString())") }
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
            if rc == 0 {
                fd = s
                return
            }
            lastError = errno
            _ = Glibc.close(s)
            guard lastError == ENOENT || lastError == ECONNREFUSED || lastError == EINTR || lastError == EAGAIN else {
                throw HarnessError(.io, "connect(\(path)): \(errnoString(lastError))")
            }
            if Date() >= deadline {
                throw HarnessError(.timeout, "could not connect to \(path) within \(Int(timeout)) s: \(errnoString(lastError))")
            }
            usleep(50_000)
        }
    }

    deinit { close() }

    var isOpen: Bool { fd >= 0 }

    func close() {
        if fd >= 0 {
            _ = Glibc.close(fd)
            fd = -1
        }
    }

    /// Writes all of `data` or throws. MSG_NOSIGNAL: a peer that went away must produce an
    /// error here, not a SIGPIPE that kills the test process.
    func write(_ data: Data, timeout: TimeInterval) throws {
        guard fd >= 0 else { throw HarnessError(.closed, "socket \(path) is closed") }
        let deadline = Date().addingTimeInterval(timeout)
        var offset = 0
        try data.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
            guard let base = raw.baseAddress else { return }
            while offset < raw.count {
                let n = send(fd, base + offset, raw.count - offset, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
                if n > 0 {
                    offset += n
                    continue
                }
                let e = errno
                if n < 0 && e == EINTR { continue }
                if n < 0 && (e == EAGAIN || e == EWOULDBLOCK) {
                    try waitFor(Int16(POLLOUT), deadline: deadline, what: "writing to \(path)")
                    continue
                }
                if e == EPIPE || e == ECONNRESET {
                    throw HarnessError(.closed, "\(path): peer closed the connection")
                }
                throw HarnessError(.io, "send(\(path)): \(errnoString(e))")
            }
        }
    }

    /// Reads whatever is available (at most 64 KiB), waiting until `deadline`.
    /// Returns nil at end of stream; throws `.timeout` if nothing arrived in time.
    func read(deadline: Date) throws -> Data? {
        guard fd >= 0 else { throw HarnessError(.closed, "socket \(path) is closed") }
        try waitFor(Int16(POLLIN), deadline: deadline, what: "reading from \(path)")
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n > 0 { return Data(buffer[0..<n]) }
            if n == 0 { return nil }
            let e = errno
            if e == EINTR { continue }
            if e == ECONNRESET { return nil }
            throw HarnessError(.io, "read(\(path)): \(errnoString(e))")
        }
    }

    private func waitFor(_ events: Int16, deadline: Date, what: String) throws {
        while true {
            let remaining = deadline.timeIntervalSinceNow
            if remaining <= 0 { throw HarnessError(.timeout, "timed out \(what)") }
            var p = pollfd(fd: fd, events: events, revents: 0)
            let ms = Int32(min(remaining * 1000, 1_000_000).rounded(.up))
            let rc = poll(&p, 1, ms)
            if rc > 0 { return }  // readable, writable, or HUP/ERR: the read/send reports which
            if rc < 0 && errno != EINTR { throw HarnessError(.io, "poll(\(path)): \(errnoString())") }
        }
    }
}
