// A small synchronous QMP client (QEMU Machine Protocol) over a unix socket.
//
// QMP is line-delimited JSON: a greeting, then `qmp_capabilities`, then commands
// {"execute", "arguments", "id"} answered by {"return", "id"} or {"error", "id"}.
// Asynchronous events ({"event", "data", "timestamp"}) can arrive at any time, interleaved
// with answers; they are collected in `pendingEvents` for tests to wait on (BALLOON_CHANGE,
// SHUTDOWN, ...).

import Foundation

/// An asynchronous QMP event.
struct QMPEvent: CustomStringConvertible {
    let name: String
    let data: [String: Any]
    /// Seconds since the epoch, from QEMU's timestamp.
    let timestamp: Double

    var description: String { "\(name) \(data)" }
}

final class QMPClient {
    let socketPath: String
    /// The server's greeting ({"QMP": {"version": ..., "capabilities": ...}}).
    private(set) var greeting: [String: Any] = [:]
    /// Events received and not yet taken by `waitForEvent` / `takeEvents`, oldest first.
    private(set) var pendingEvents: [QMPEvent] = []
    /// Timeout for `execute` when none is given.
    var defaultTimeout: TimeInterval = 30

    private let socket: UnixSocket
    private var buffer = Data()
    private var nextID = 1

    /// Connects, reads the greeting and negotiates capabilities (leaves negotiation mode).
    init(socketPath: String, timeout: TimeInterval = 15) throws {
        self.socketPath = socketPath
        socket = try UnixSocket(connectingTo: socketPath, timeout: timeout)
        let deadline = Date().addingTimeInterval(timeout)
        let first = try readMessage(deadline: deadline, waitingFor: "the QMP greeting")
        guard first["QMP"] != nil else {
            throw HarnessError(.protocolViolation, "QMP \(socketPath): expected a greeting, got \(first)")
        }
        greeting = first
        _ = try execute("qmp_capabilities", timeout: timeout)
    }

    func close() { socket.close() }

    /// Runs a QMP command and returns its "return" value (often an empty dictionary).
    /// Throws `.qmp` with QEMU's error class and description if QEMU answered with an error,
    /// `.timeout` if no answer came within `timeout`, `.closed` if QEMU went away.
    @discardableResult
    func execute(_ command: String, arguments: [String: Any]? = nil, timeout: TimeInterval? = nil) throws -> Any {
        let id = "h\(nextID)"
        nextID += 1
        var message: [String: Any] = ["execute": command, "id": id]
        if let arguments { message["arguments"] = arguments }
        guard JSONSerialization.isValidJSONObject(message) else {
            throw HarnessError(.protocolViolation, "QMP \(command): arguments are not JSON-serialisable: \(arguments ?? [:])")
        }
        var line = try JSONSerialization.data(withJSONObject: message)
        line.append(UInt8(ascii: "\n"))
        let wait = timeout ?? defaultTimeout
        try socket.write(line, timeout: wait)
        let deadline = Date().addingTimeInterval(wait)
        while true {
            let reply = try readMessage(deadline: deadline, waitingFor: "the answer to \(command)")
            // Answers to earlier commands that timed out carry other ids: drop them.
            guard reply["id"] as? String == id else { continue }
            if let error = reply["error"] as? [String: Any] {
                let cls = error["class"] as? String ?? "?"
                let desc = error["desc"] as? String ?? "\(error)"
                throw HarnessError(.qmp, "QMP \(command) failed: \(cls): \(desc)")
            }
            guard let value = reply["return"] else {
                throw HarnessError(.protocolViolation, "QMP \(command): answer has neither return nor error: \(reply)")
            }
            return value
        }
    }

    /// `execute`, for commands whose answer is a JSON object.
    func executeObject(_ command: String, arguments: [String: Any]? = nil, timeout: TimeInterval? = nil) throws -> [String: Any] {
        let value = try execute(command, arguments: arguments, timeout: timeout)
        guard let object = value as? [String: Any] else {
            throw HarnessError(.protocolViolation, "QMP \(command): expected an object, got \(value)")
        }
        return object
    }

    /// Waits for an event named `name` (optionally also matching `predicate`), taking it out
    /// of `pendingEvents`. Events that arrived before the call count: nothing is lost
    /// between a command and the wait for its event.
    @discardableResult
    func waitForEvent(_ name: String, timeout: TimeInterval, where predicate: (QMPEvent) -> Bool = { _ in true }) throws -> QMPEvent {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if let index = pendingEvents.firstIndex(where: { $0.name == name && predicate($0) }) {
                return pendingEvents.remove(at: index)
            }
            do {
                _ = try readMessage(deadline: deadline, waitingFor: "event \(name)", returnAfterEvent: true)
            } catch let error as HarnessError where error.kind == .timeout {
                let seen = pendingEvents.map(\.name).joined(separator: ", ")
                throw HarnessError(.timeout, "QMP: no \(name) event within \(Int(timeout)) s (pending events: \(seen.isEmpty ? "none" : seen))")
            }
        }
    }

    /// Reads events that are already available (waiting at most `timeout`), then returns and
    /// clears the pending ones, optionally only those named `name`.
    func takeEvents(named name: String? = nil, waiting timeout: TimeInterval = 0) throws -> [QMPEvent] {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            do {
                _ = try readMessage(deadline: deadline, waitingFor: "events", returnAfterEvent: true)
            } catch let error as HarnessError where error.kind == .timeout {
                break
            }
        }
        let taken = pendingEvents.filter { name == nil || $0.name == name }
        pendingEvents.removeAll { name == nil || $0.name == name }
        return taken
    }

    // MARK: - Framing

    /// Returns the next non-event message; events are appended to `pendingEvents` on the
    /// way. With `returnAfterEvent`, returns (an empty dictionary) as soon as one event was
    /// read, so event waits can re-check their condition.
    private func readMessage(deadline: Date, waitingFor what: String, returnAfterEvent: Bool = false) throws -> [String: Any] {
        while true {
            while let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let lineData = buffer[buffer.startIndex..<newline]
                buffer.removeSubrange(buffer.startIndex...newline)
                let trimmed = lineData.filter { $0 != UInt8(ascii: "\r") }
                if trimmed.allSatisfy({ $0 == UInt8(ascii: " ") }) { continue }
                let parsed: Any
                do {
                    parsed = try JSONSerialization.jsonObject(with: Data(trimmed))
                } catch {
                    let text = String(decoding: trimmed, as: UTF8.self)
                    throw HarnessError(.protocolViolation, "QMP \(socketPath): not JSON: \(text.prefix(500))")
                }
                guard let object = parsed as? [String: Any] else {
                    throw HarnessError(.protocolViolation, "QMP \(socketPath): not a JSON object: \(parsed)")
                }
                if let name = object["event"] as? String {
                    let ts = object["timestamp"] as? [String: Any]
                    let seconds = (ts?["seconds"] as? NSNumber)?.doubleValue ?? 0
                    let micros = (ts?["microseconds"] as? NSNumber)?.doubleValue ?? 0
                    pendingEvents.append(QMPEvent(name: name, data: object["data"] as? [String: Any] ?? [:],
                                                  timestamp: seconds + micros / 1e6))
                    if returnAfterEvent { return [:] }
                    continue
                }
                return object
            }
            let chunk: Data?
            do {
                chunk = try socket.read(deadline: deadline)
            } catch let error as HarnessError where error.kind == .timeout {
                throw HarnessError(.timeout, "QMP \(socketPath): timed out waiting for \(what)")
            }
            guard let chunk else {
                throw HarnessError(.closed, "QMP \(socketPath): QEMU closed the connection while waiting for \(what)")
            }
            buffer.append(chunk)
        }
    }
}
