#if canImport(Glibc)
import Glibc
#endif

extension Sys {
    /// Replaces `path` atomically with `bytes`: a temporary file in the same directory
    /// (`temporary`, created exclusively, never through a symlink), `mode` whatever the umask,
    /// fsynced when `durable`, then renamed over `path`. The temporary file is removed on
    /// failure. Readers see the old contents or the new, never a part.
    public static func replaceFile(_ path: String, with bytes: [UInt8], mode: mode_t, temporary: String,
                                   durable: Bool) throws(SystemCallError) {
        do {
            try removeFile(temporary)
            let f = try OpenFile(path: temporary, flags: O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode: mode)
            let fd = f.descriptor
            _ = try call("fchmod", path: temporary) { fchmod(fd, mode) }
            var left = bytes[...]
            while !left.isEmpty {
                let n = try f.write(Array(left))
                left = left.dropFirst(n)
            }
            if durable { _ = try call("fsync", path: temporary) { fsync(fd) } }
            f.close()
            _ = try call("rename", path: path) { unsafe rename(temporary, path) }
        } catch {
            try? removeFile(temporary)
            throw error
        }
    }
}
