#if canImport(Glibc)
import VirtioCore
import Glibc
#endif
import VirtioPCI

/// A PCI function's configuration space through `/sys/bus/pci/devices/BDF/config`.
///
/// Reads and writes are `pread`/`pwrite` of exactly the access width at the register's
/// offset; the kernel turns an aligned 2-byte write into `pci_user_write_config_word`
/// (`drivers/pci/pci-sysfs.c: pci_write_config`), which is what the Command register needs
/// (uio_pci_generic's INTx unmask, Bus Master). The file stays open for the object's
/// lifetime.
///
/// Non-root readers only see the first 64 bytes (the kernel truncates the read), so
/// capability walks need root; such a short read is reported as an error saying so.
public final class SysfsConfigSpace: PCIConfigSpace {
    public let address: PCIAddress
    public let path: String
    /// Size of the config file: 256 (conventional PCI) or 4096 (PCIe extended).
    public let size: Int
    private let file: OpenFile
    private let registers: ConfigRegisterFile

    /// Opens the config file read-write (read-only with `writable: false`).
    public init(address: PCIAddress, root: SysRoot = .host, writable: Bool = true) throws(PlatformError) {
        self.address = address
        path = address.sysfsDirectory(in: root) + "/config"
        do {
            file = try OpenFile(path: path, flags: writable ? O_RDWR : O_RDONLY)
            let st = try file.status()
            size = Int(st.st_size)
        } catch {
            if error.errno == .noSuchFileOrDirectory { throw .deviceNotFound(bdf: address.bdf) }
            throw .system(error)
        }
        let file = self.file
        registers = ConfigRegisterFile(address: address, path: path, size: size,
                                       readBytes: { (offset, count) throws(SystemCallError) in try file.pread(count: count, offset: offset) },
                                       writeBytes: { (bytes, offset) throws(SystemCallError) in try file.pwrite(bytes, offset: offset) })
    }

    public func read8(at offset: Int) throws(PCIError) -> UInt8 { try registers.read8(at: offset) }
    public func read16(at offset: Int) throws(PCIError) -> UInt16 { try registers.read16(at: offset) }
    public func read32(at offset: Int) throws(PCIError) -> UInt32 { try registers.read32(at: offset) }
    public func write16(_ value: UInt16, at offset: Int) throws(PCIError) { try registers.write16(value, at: offset) }
}

/// Config-space registers over a byte-addressed file (sysfs `config`, or vfio's config
/// region): the width, alignment and bounds checks, exact-width reads and writes, and the
/// little-endian assembly, for both.
struct ConfigRegisterFile {
    let address: PCIAddress
    /// Names the file in errors.
    let path: String
    let size: Int
    /// Reads `count` bytes at a config-space offset (fewer: a short read).
    let readBytes: (_ offset: Int, _ count: Int) throws(SystemCallError) -> [UInt8]
    /// Writes the bytes at a config-space offset; returns how many were written.
    let writeBytes: (_ bytes: [UInt8], _ offset: Int) throws(SystemCallError) -> Int

    private func read(_ offset: Int, _ width: Int) throws(PCIError) -> [UInt8] {
        guard offset >= 0, offset % width == 0, offset + width <= size else {
            throw .configAccess(offset: offset, reason: ConfigSpaceProblem.outOfRange(width: width, size: size, address: address))
        }
        let bytes: [UInt8]
        do { bytes = try readBytes(offset, width) } catch {
            throw .configAccess(offset: offset, reason: ConfigSpaceProblem.readFailed(error))
        }
        guard bytes.count == width else {
            throw .configAccess(offset: offset, reason: ConfigSpaceProblem.shortRead(path: path, got: bytes.count, width: width))
        }
        return bytes
    }

    func read8(at offset: Int) throws(PCIError) -> UInt8 { try read(offset, 1)[0] }

    func read16(at offset: Int) throws(PCIError) -> UInt16 {
        let b = try read(offset, 2)
        return UInt16(b[0]) | UInt16(b[1]) << 8
    }

    func read32(at offset: Int) throws(PCIError) -> UInt32 {
        let b = try read(offset, 4)
        return UInt32(b[0]) | UInt32(b[1]) << 8 | UInt32(b[2]) << 16 | UInt32(b[3]) << 24
    }

    func write16(_ value: UInt16, at offset: Int) throws(PCIError) {
        guard offset >= 0, offset % 2 == 0, offset + 2 <= size else {
            throw .configAccess(offset: offset, reason: ConfigSpaceProblem.outOfRange(width: 2, size: size, address: address, write: true))
        }
        let n: Int
        do { n = try writeBytes([UInt8(value & 0xff), UInt8(value >> 8)], offset) } catch {
            throw .configAccess(offset: offset, reason: ConfigSpaceProblem.writeFailed(error))
        }
        guard n == 2 else {
            throw .configAccess(offset: offset, reason: ConfigSpaceProblem.shortWrite(path: path, wrote: n))
        }
    }
}

/// Why a sysfs config space access failed (the reason inside `PCIError.configAccess`).
public enum ConfigSpaceProblem: Error, Hashable, Sendable, CustomStringConvertible {
    /// A `width`-byte access (a write if `write`) misaligned or outside the `size`-byte config
    /// space of `address`.
    case outOfRange(width: Int, size: Int, address: PCIAddress, write: Bool = false)
    /// `pread` of the config file failed.
    case readFailed(SystemCallError)
    /// `pwrite` of the config file failed (EBADF: it was opened read-only).
    case writeFailed(SystemCallError)
    /// `pread` returned `got` of `width` bytes: the kernel hides all but 64 bytes from non-root.
    case shortRead(path: String, got: Int, width: Int)
    /// `pwrite` wrote `wrote` of 2 bytes.
    case shortWrite(path: String, wrote: Int)

    public var description: String {
        switch self {
        case .outOfRange(let width, let size, let address, let write):
            return "\(width)-byte \(write ? "write" : "access") is misaligned or outside the \(size)-byte config space of \(address)"
        case .readFailed(let e):
            return e.description
        case .writeFailed(let e):
            return e.errno == .badFileDescriptor ? "\(e) (the config space was opened read-only)" : e.description
        case .shortRead(let path, let got, let width):
            return "read \(got) of \(width) bytes from \(path): the kernel only lets root read past the first 64 bytes; run balloond as root"
        case .shortWrite(let path, let wrote):
            return "wrote \(wrote) of 2 bytes to \(path)"
        }
    }
}
