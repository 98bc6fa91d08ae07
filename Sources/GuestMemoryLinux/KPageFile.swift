import PlatformLinux

/// `/proc/kpageflags` or `/proc/kpagecount` (root only): one little-endian u64 per PFN, at
/// file offset PFN × 8. Reads go straight into one reused buffer (no allocation per chunk).
/// A read past `max_pfn` returns 0 bytes.
package final class KPageFile {
    package let path: String
    private let file: OpenFile
    /// Bound to UInt64 at allocation; read into through its raw view.
    private let buffer: UnsafeMutableBufferPointer<UInt64>

    /// - Parameter chunkEntries: the most entries one `read(startPFN:count:)` returns.
    package init(path: String, chunkEntries: Int) throws(GuestMemoryError) {
        self.path = path
        do { file = try OpenFile(path: path, flags: Sys.openReadOnly) } catch {
            throw .system("cannot open \(path): \(error). It needs root (CAP_SYS_ADMIN) and a kernel with CONFIG_PROC_PAGE_MONITOR")
        }
        buffer = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: max(1, chunkEntries))
    }

    deinit { buffer.deallocate() }

    package var chunkEntries: Int { buffer.count }

    /// Reads up to `min(count, chunkEntries)` entries from `startPFN` and calls `body` with
    /// them (valid only inside `body`). Returns how many were read (0 at the end of the file).
    @discardableResult
    package func read<R>(startPFN: UInt64, count: Int, _ body: (UnsafeBufferPointer<UInt64>) -> R) throws(GuestMemoryError) -> (Int, R) {
        let want = min(count, chunkEntries) * 8
        var got = 0
        // /proc files may return short reads; fill the chunk unless the file ends.
        while got < want {
            let slice = UnsafeMutableRawBufferPointer(rebasing: UnsafeMutableRawBufferPointer(buffer)[got..<want])
            let n: Int
            do { n = try file.pread(into: slice, offset: Int(startPFN) * 8 + got) } catch {
                throw .system("reading \(path) at PFN 0x\(String(startPFN, radix: 16)) failed: \(error)")
            }
            if n == 0 { break }
            got += n
        }
        let entries = got / 8
        let typed = UnsafeBufferPointer(rebasing: buffer[0..<entries])
        // x86-64 and arm64 are little-endian, as the file is.
        return (entries, body(typed))
    }

    /// One entry, or nil past the end of the file.
    package func entry(pfn: UInt64) throws(GuestMemoryError) -> UInt64? {
        let (n, v) = try read(startPFN: pfn, count: 1) { $0.first ?? 0 }
        return n == 1 ? UInt64(littleEndian: v) : nil
    }
}
