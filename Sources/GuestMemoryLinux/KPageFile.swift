import PlatformLinux

/// `/proc/kpageflags` or `/proc/kpagecount` (root only): one little-endian u64 per PFN, at
/// file offset PFN × 8. Reads go straight into one reused buffer (no allocation per chunk).
/// A read past `max_pfn` returns 0 bytes. The only unsafe memory here is that buffer; callers
/// see a `Span` over the entries just read.
@safe package final class KPageFile {
    package let path: String
    private let file: OpenFile
    /// Bound to UInt64 at allocation; read into through its raw view.
    private let buffer: UnsafeMutableBufferPointer<UInt64>

    /// - Parameter chunkEntries: the most entries one `read(startPFN:count:)` returns.
    package init(path: String, chunkEntries: Int) throws(GuestMemoryError) {
        self.path = path
        do { file = try OpenFile(path: path, flags: Sys.openReadOnly) } catch {
            throw .cannotOpenPageFile(path: path, error)
        }
        unsafe buffer = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: max(1, chunkEntries))
    }

    deinit { unsafe buffer.deallocate() }

    package var chunkEntries: Int { unsafe buffer.count }

    /// Reads up to `min(count, chunkEntries)` entries from `startPFN` and calls `body` with
    /// them (the span lives only inside `body`). Returns how many were read (0 at the end of
    /// the file).
    @discardableResult
    package func read<R>(startPFN: UInt64, count: Int, _ body: (Span<UInt64>) -> R) throws(GuestMemoryError) -> (Int, R) {
        let want = min(count, chunkEntries) * 8
        var got = 0
        // /proc files may return short reads; fill the chunk unless the file ends.
        while got < want {
            // Unsafe: bytes got..<want of the buffer this object owns; pread writes at most those.
            let slice = unsafe UnsafeMutableRawBufferPointer(rebasing: UnsafeMutableRawBufferPointer(buffer)[got..<want])
            let n: Int
            do { n = try unsafe file.pread(into: slice, offset: Int(startPFN) * 8 + got) } catch {
                throw .cannotReadPageFile(path: path, pfn: startPFN, error)
            }
            if n == 0 { break }
            got += n
        }
        let entries = got / 8
        // x86-64 and arm64 are little-endian, as the file is.
        // Unsafe: the first `entries` elements were just read; the span does not outlive `body`.
        return (entries, body(unsafe UnsafeBufferPointer(rebasing: buffer[0..<entries]).span))
    }

    /// One entry, or nil past the end of the file.
    package func entry(pfn: UInt64) throws(GuestMemoryError) -> UInt64? {
        let (n, v) = try read(startPFN: pfn, count: 1) { $0.isEmpty ? 0 : $0[0] }
        return n == 1 ? UInt64(littleEndian: v) : nil
    }
}
