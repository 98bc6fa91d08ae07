// Host side of the guest command channel (ttyS1 <-> unix socket agent.sock).
//
// Protocol (the guest side is scripts/guest/balloond-agent):
//   host -> guest:  "<id> <timeout-seconds> <base64 of the command>\n"
//   guest -> host:  "<<<BEGIN <id> len=<N>>>>\n" + N bytes of output + "\n<<<END <id> rc=<rc>>>>\n"
// The guest runs the command with `sh` (stdin /dev/null, stdout+stderr together) and
// SIGKILLs it after <timeout-seconds> (rc 137). Frames with other ids (late answers to
// commands the host gave up on) and any bytes outside frames are skipped.

import Foundation

final class GuestAgent {
    let socketPath: String
    private let socket: UnixSocket
    private var buffer = Data()
    private var nextID = 1

    init(socketPath: String, timeout: TimeInterval = 15) throws {
        self.socketPath = socketPath
        socket = try UnixSocket(connectingTo: socketPath, timeout: timeout)
    }

    func close() { socket.close() }

    /// The raw result of one command.
    struct Result {
        let output: Data
        let rc: Int32
        let seconds: Double
        var text: String { String(decoding: output, as: UTF8.self) }
    }

    /// Runs `command` in the guest. The guest kills it after `timeout` seconds (rounded up,
    /// at least 1); that is reported as a `.timeout` error with the output so far. The host
    /// waits `timeout` plus a grace period for the answer, longer while output is still
    /// streaming in (the serial line moves roughly 80 KiB/s under TCG).
    func run(_ command: String, timeout: TimeInterval) throws -> Result {
        let id = "c\(nextID)"
        nextID += 1
        let guestTimeout = max(1, Int(timeout.rounded(.up)))
        let request = "\(id) \(guestTimeout) \(Data(command.utf8).base64EncodedString())\n"
        let started = Date()
        try socket.write(Data(request.utf8), timeout: 30)

        let grace: TimeInterval = 20
        var deadline = started.addingTimeInterval(Double(guestTimeout) + grace)
        while true {
            if let frame = try parseFrame() {
                if frame.id != id { continue }  // a late answer to an abandoned command
                let seconds = Date().timeIntervalSince(started)
                let result = Result(output: frame.output, rc: frame.rc, seconds: seconds)
                if frame.rc == 137 && seconds >= Double(guestTimeout) - 0.5 {
                    throw HarnessError(.timeout, """
                        guest command timed out after \(guestTimeout) s and was killed: \(command)
                        output so far:
                        \(tail(result.text))
                        """)
                }
                return result
            }
            let chunk: Data?
            do {
                chunk = try socket.read(deadline: deadline)
            } catch let error as HarnessError where error.kind == .timeout {
                throw HarnessError(.timeout, """
                    the guest agent did not answer within \(Int(Date().timeIntervalSince(started))) s \
                    (command timeout \(guestTimeout) s): \(command)
                    (the guest may have crashed or hung: see the console log)
                    """)
            }
            guard let chunk else {
                throw HarnessError(.closed, "the guest command channel \(socketPath) closed (QEMU exited?) while running: \(command)")
            }
            buffer.append(chunk)
            // Output is streaming: allow at least another 10 s of silence.
            deadline = max(deadline, Date().addingTimeInterval(10))
        }
    }

    private struct Frame {
        let id: String
        let output: Data
        let rc: Int32
    }

    private static let beginMarker = Data("<<<BEGIN ".utf8)

    /// Extracts the next complete frame from the buffer, or returns nil if more bytes are
    /// needed. Throws if a frame is malformed (the channel is then unusable).
    private func parseFrame() throws -> Frame? {
        guard let begin = buffer.range(of: Self.beginMarker) else {
            // Keep only a tail that could be the start of a marker.
            if buffer.count > Self.beginMarker.count {
                buffer.removeSubrange(buffer.startIndex..<(buffer.endIndex - Self.beginMarker.count))
            }
            return nil
        }
        guard let headerEnd = buffer[begin.upperBound...].firstIndex(of: UInt8(ascii: "\n")) else {
            return nil
        }
        // "<id> len=<N>>>>"
        let header = String(decoding: buffer[begin.upperBound..<headerEnd], as: UTF8.self)
        let parts = header.split(separator: " ")
        guard parts.count == 2, parts[1].hasPrefix("len="), parts[1].hasSuffix(">>>"),
              let length = Int(parts[1].dropFirst(4).dropLast(3)), length >= 0 else {
            throw HarnessError(.protocolViolation, "guest agent: malformed frame header: \(header.prefix(200))")
        }
        let id = String(parts[0])
        let bodyStart = headerEnd + 1
        guard buffer.endIndex - bodyStart >= length + 1 else { return nil }
        let bodyEnd = bodyStart + length
        guard let trailerEnd = buffer[bodyEnd...].firstIndex(of: UInt8(ascii: "\n"), after: 1) else {
            return nil
        }
        // "\n<<<END <id> rc=<rc>>>>"
        let trailer = String(decoding: buffer[bodyEnd..<trailerEnd], as: UTF8.self)
        let prefix = "\n<<<END \(id) rc="
        guard trailer.hasPrefix(prefix), trailer.hasSuffix(">>>"),
              let rc = Int32(trailer.dropFirst(prefix.count).dropLast(3)) else {
            throw HarnessError(.protocolViolation, "guest agent: malformed frame trailer for \(id): \(trailer.prefix(200))")
        }
        let output = Data(buffer[bodyStart..<bodyEnd])
        buffer.removeSubrange(buffer.startIndex...trailerEnd)
        return Frame(id: id, output: output, rc: rc)
    }
}

private extension Data {
    /// The index of the first `byte` at or after `startIndex + offset`.
    func firstIndex(of byte: UInt8, after offset: Int) -> Index? {
        let from = startIndex + offset
        guard from <= endIndex else { return nil }
        return self[from...].firstIndex(of: byte)
    }
}

/// The last `lines` lines of `text`, for error messages.
func tail(_ text: String, lines: Int = 30) -> String {
    // isNewline, not "\n": console logs use CRLF, which is one Character in Swift.
    let all = text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline)
    return all.suffix(lines).joined(separator: "\n")
}
