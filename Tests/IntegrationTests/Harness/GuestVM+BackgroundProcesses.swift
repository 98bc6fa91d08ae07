// Background processes in the guest: started with `bg-run` under /run/bg/<name>, signalled,
// waited for, and their output read.

import Foundation

extension GuestVM {
    /// A program started with `spawn`. Its files live in `directory` in the guest.
    struct GuestProcess: CustomStringConvertible {
        let name: String
        let pid: Int32
        let directory: String
        var logPath: String { directory + "/log" }
        var description: String { "\(name) (pid \(pid))" }
    }

    /// Starts `argv` in the background in the guest (new session, stdin /dev/null, output to
    /// /run/bg/<name>/log, default signal dispositions) and returns its pid, which is the
    /// program's own. Use `["sh", "-c", script]` for a pipeline.
    func spawn(_ argv: [String], name: String) throws -> GuestProcess {
        guard !argv.isEmpty else { throw HarnessError(.commandFailed, "spawn: empty argv") }
        guard !name.isEmpty, name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }) else {
            throw HarnessError(.commandFailed, "spawn: name must be [A-Za-z0-9._-]+, got '\(name)'")
        }
        let directory = "/run/bg/\(name)"
        let out = try check("bg-run \(directory) " + argv.map(shellQuote).joined(separator: " "), timeout: 30)
        guard let pid = Int32(out.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw annotate(HarnessError(.protocolViolation, "spawn \(name): bg-run printed no pid: \(out)"))
        }
        return GuestProcess(name: name, pid: pid, directory: directory)
    }

    /// Sends a signal ("TERM", "KILL", "INT", "USR1", ...) to a process in the guest.
    func signal(_ process: GuestProcess, _ signal: String = "TERM") throws {
        try check("kill -\(shellQuote(signal)) \(process.pid)", timeout: 10)
    }

    /// The exit status of a spawned process (128+N if killed by signal N), or nil while it
    /// is still running.
    func exitStatus(of process: GuestProcess) throws -> Int32? {
        let (out, rc) = try run("cat \(process.directory)/rc 2>/dev/null", timeout: 10)
        guard rc == 0 else { return nil }
        return Int32(out.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Waits (in the guest, one round trip) until a spawned process exits; returns its exit
    /// status. Throws `.timeout` if it is still running after `timeout` seconds.
    @discardableResult
    func waitForExit(_ process: GuestProcess, timeout: TimeInterval) throws -> Int32 {
        let ticks = max(1, Int(timeout * 10))
        let script = "i=0; while [ ! -e \(process.directory)/rc ]; do i=$((i+1)); [ $i -gt \(ticks) ] && exit 124; usleep 100000; done; cat \(process.directory)/rc"
        let (out, rc) = try run(script, timeout: timeout + 10)
        if rc == 124 {
            throw annotate(HarnessError(.timeout, "\(process) still running after \(Int(timeout)) s; its log:\n\(tail((try? self.output(of: process)) ?? "?"))"))
        }
        guard rc == 0, let status = Int32(out.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw annotate(HarnessError(.protocolViolation, "waitForExit \(process): unexpected answer rc=\(rc): \(out)"))
        }
        return status
    }

    /// The output (stdout+stderr) a spawned process has written so far.
    func output(of process: GuestProcess) throws -> String {
        try check("cat \(process.logPath)", timeout: 30)
    }
}
