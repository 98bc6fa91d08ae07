// Starts host helper processes (run-guest.sh, build-guest.sh) with posix_spawn.
//
// Why not Foundation.Process: tests run on libdispatch worker threads, which block almost
// every signal, and Process passes that signal mask on to the child. run-guest.sh then
// never sees the SIGTERM meant to stop it (and QEMU inherits the mask too). Here the child
// gets an empty signal mask and default dispositions (POSIX_SPAWN_SETSIGMASK/SETSIGDEF).

import Foundation
#if canImport(Glibc)
import Glibc
#endif

final class ChildProcess {
    let pid: pid_t
    let executable: String
    private var status: Int32?

    /// Spawns `executable` with `arguments` and exactly `environment`; stdin is /dev/null,
    /// stdout and stderr are appended to `outputPath`.
    init(executable: String, arguments: [String], environment: [String: String], outputPath: String) throws {
        self.executable = executable
        var actions = posix_spawn_file_actions_t()
        var attr = posix_spawnattr_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawnattr_init(&attr)
        defer {
            posix_spawn_file_actions_destroy(&actions)
            posix_spawnattr_destroy(&attr)
        }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)

        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        var allSignals = sigset_t()
        sigfillset(&allSignals)
        posix_spawnattr_setsigmask(&attr, &noSignals)
        posix_spawnattr_setsigdefault(&attr, &allSignals)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var child: pid_t = 0
        let rc = posix_spawn(&child, executable, &actions, &attr, argv, envp)
        guard rc == 0 else {
            throw HarnessError(.setup, "cannot start \(executable): \(errnoString(rc))")
        }
        pid = child
    }

    deinit {
        // Never leave a zombie or a running helper behind.
        if isRunning {
            kill(pid, SIGKILL)
            _ = wait(timeout: 5)
        }
    }

    /// Shell-style exit status (128+N if killed by signal N) once it has exited.
    var exitStatus: Int32? {
        reap(block: false)
        return status
    }

    var isRunning: Bool { exitStatus == nil }

    func signal(_ sig: Int32) {
        if isRunning { kill(pid, sig) }
    }

    /// Waits up to `timeout` seconds for the process to exit; true if it has.
    func wait(timeout: TimeInterval) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while isRunning {
            if Date() >= deadline { return false }
            usleep(20_000)
        }
        return true
    }

    private func reap(block: Bool) {
        guard status == nil else { return }
        var raw: Int32 = 0
        let r = waitpid(pid, &raw, block ? 0 : WNOHANG)
        if r == pid {
            // WIFEXITED / WEXITSTATUS / WTERMSIG by hand: the macros are not imported.
            let sig = raw & 0x7f
            status = sig == 0 ? (raw >> 8) & 0xff : 128 + sig
        } else if r < 0 && errno == ECHILD {
            status = -1  // already reaped elsewhere; treat as exited
        }
    }
}
