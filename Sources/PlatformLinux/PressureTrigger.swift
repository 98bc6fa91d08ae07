#if canImport(Glibc)
import Glibc
#endif

/// A PSI trigger on /proc/pressure/memory (Documentation/accounting/psi.rst): the kernel
/// wakes a `poll` for POLLPRI when tasks stalled on memory for `stallMicroseconds` within a
/// `windowMicroseconds` window ("some" stalls: at least one task waiting). The descriptor goes
/// into the event loop's poll set next to the uio descriptor.
public final class PressureTrigger {
    public let file: OpenFile
    public let stallMicroseconds: Int
    public let windowMicroseconds: Int

    /// Arms the trigger. Fails when PSI is off (CONFIG_PSI=n, `psi=0`) or the window is out
    /// of the kernel's 500 ms–10 s range.
    public init(stallMicroseconds: Int, windowMicroseconds: Int, root: SysRoot = .host) throws(PlatformError) {
        self.stallMicroseconds = stallMicroseconds
        self.windowMicroseconds = windowMicroseconds
        let path = root.path("/proc/pressure/memory")
        do {
            file = try OpenFile(path: path, flags: O_RDWR | O_NONBLOCK)
        } catch {
            throw .system(error)
        }
        // The kernel parses the string including its terminating NUL.
        let spec = "some \(stallMicroseconds) \(windowMicroseconds)"
        var bytes = Array(spec.utf8)
        bytes.append(0)
        let written: Int
        do { written = try file.write(bytes) } catch { throw .system(error) }
        if written != bytes.count { throw .malformedFile(path: path, reason: .shortTriggerWrite(written: written, of: bytes.count)) }
    }

    /// The descriptor to poll for POLLPRI.
    public var pollDescriptor: Int32 { file.descriptor }
}
