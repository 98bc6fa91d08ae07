#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// `mmap`, `munmap` and `mlock` for PlatformLinux (only `OwnedAnonymousMapping.unmapSlot`
/// unmaps part of a mapping itself). A mapping's base pointer goes straight into the one
/// type that owns it: `MMIOWindow` for a BAR, `OwnedAnonymousMapping` for memfd-backed DMA and
/// balloon memory, or the preflight probe that unmaps it at once; each unmaps it with the
/// `unmapper` closure built here or its own `unmapAll`.
enum MappedMemory {
    /// `mmap`, EINTR retried (it is not restartable on its own for some file types).
    static func map(length: Int, protection: Int32, flags: Int32, descriptor: Int32 = -1, offset: Int = 0,
                    path: String? = nil) throws(SystemCallError) -> UnsafeMutableRawPointer {
        while true {
            let p = unsafe mmap(nil, length, protection, flags, descriptor, off_t(offset))
            if let p = unsafe p, unsafe p != MAP_FAILED { return unsafe p }
            let e = Glibc.errno
            if e == EINTR { continue }
            throw SystemCallError(call: "mmap", path: path, errno: Errno(rawValue: e))
        }
    }

    /// A closure that unmaps `length` bytes at `base` (call it once).
    static func unmapper(_ base: UnsafeMutableRawPointer, length: Int) -> () -> Void {
        let address = UInt(bitPattern: base)
        return {
            _ = unsafe munmap(UnsafeMutableRawPointer(bitPattern: address), length)
        }
    }

    /// `mlock`s a mapping so it stays resident (pagemap then reports its PFNs).
    static func lock(_ base: UnsafeMutableRawPointer, length: Int) throws(SystemCallError) {
        _ = try Sys.call("mlock") { unsafe mlock(base, length) }
    }

    /// Writes one byte in every `stride` bytes so every page is faulted in (and owned by us,
    /// not the shared zero page).
    static func touch(_ base: UnsafeMutableRawPointer, length: Int, stride: Int) {
        var offset = 0
        while offset < length {
            unsafe (base + offset).storeBytes(of: 0, as: UInt8.self)
            offset += stride
        }
    }

    /// The integer value of a pointer (for pagemap lookups).
    static func address(of base: UnsafeMutableRawPointer) -> UInt { UInt(bitPattern: base) }
}

/// Rounds `n` up to a multiple of `to` (a power of two).
func roundUp(_ n: Int, to: Int) -> Int { (n + to - 1) & ~(to - 1) }
