import PlatformLinux

/// Failures reading or changing the guest's memory state (kernel files, sysctls, the hugetlb
/// pool, memory blocks, state files). The hint sources report them to the driver inside a
/// `FreePageSourceError`, the balloon backends inside a `BalloonMemoryError`.
///
/// Each case carries what failed (the path, the value) and the underlying typed error (with
/// its `Errno`); `description` renders the one-line message for the operator.
public enum GuestMemoryError: Error, Hashable, Sendable, CustomStringConvertible {
    /// A kernel file did not have the expected format.
    case malformedFile(path: String, reason: String)
    /// A state file under /run/balloond could not be written or trusted.
    case stateFile(StateFileError)
    /// A platform operation failed (reading /proc/meminfo, the hugetlb pool's counters,
    /// /proc/self/pagemap); its error says what and why.
    case platform(PlatformError)
    /// A kernel file could not be read.
    case cannotRead(path: String, SystemCallError)
    /// A kernel directory could not be listed.
    case cannotList(path: String, SystemCallError)
    /// /proc/kpageflags or /proc/kpagecount could not be opened (root only, and only with
    /// CONFIG_PROC_PAGE_MONITOR).
    case cannotOpenPageFile(path: String, SystemCallError)
    /// Reading /proc/kpageflags or /proc/kpagecount at `pfn` failed.
    case cannotReadPageFile(path: String, pfn: UInt64, SystemCallError)
    /// A setting (a number in a /proc/sys or sysfs file) could not be written.
    case cannotSet(path: String, value: UInt64, SystemCallError)
    /// `nr_hugepages` could not be written.
    case cannotSetPoolSize(path: String, pages: UInt64, PlatformError)
    /// A setting could not be put back to the original a killed balloond's state file names.
    case cannotRestore(path: String, value: UInt64, stateFile: String, SystemCallError)
    /// Another running balloond has changed `sysctl` (its state file names it).
    case otherInstanceChanged(sysctl: String, pid: Int32, stateFile: String)
    /// Hugetlb pages were to be reserved without a device memory arena to map them from.
    case noArena
    /// Reserving `pages` free hugetlb pool pages with one unfaulted mapping failed.
    case cannotReserve(pages: Int, SystemCallError)
    /// One step of mapping `bytes` of anonymous memory failed.
    case cannotMap(bytes: Int, step: MappingStep, SystemCallError)
    /// /sys/devices/system/memory/block_size_bytes cannot be read: no memory hotplug.
    case noMemoryHotplug(path: String, SystemCallError)
    /// A memory block could not be onlined.
    case cannotOnline(block: Int, path: String, SystemCallError)
    /// Page `page` of a populated, locked chunk has no PFN in /proc/self/pagemap.
    case noPFN(page: Int, entry: PagemapEntry)
    /// Setting `path` to `value` failed while holding it there (`CompactionHold`).
    indirect case cannotHold(path: String, value: UInt64, GuestMemoryError)
    /// Mapping owned memory in the IOMMU for the device (vfio) failed.
    case deviceMappingFailed(VFIOError)
    /// The anonymous hint source cannot keep compaction off its locked pages.
    indirect case compactionNotPrevented(GuestMemoryError)
    /// Crash recovery could not read the hugetlb pool size for `stateFile`.
    indirect case cannotReadPoolSize(stateFile: String, GuestMemoryError)
    /// Crash recovery could not put `nr_hugepages` back from `stateFile`.
    indirect case cannotRestorePoolSize(stateFile: String, GuestMemoryError)
    /// Several steps failed (e.g. onlining several memory blocks), in order.
    indirect case several([GuestMemoryError])

    public var description: String {
        switch self {
        case .malformedFile(let path, let reason): return "unexpected contents in \(path): \(reason)"
        case .stateFile(let e): return e.description
        case .platform(let e): return e.description
        case .cannotRead(let path, let e): return "cannot read \(path): \(e)"
        case .cannotList(let path, let e): return "cannot list \(path): \(e)"
        case .cannotOpenPageFile(let path, let e):
            return "cannot open \(path): \(e). It needs root (CAP_SYS_ADMIN) and a kernel with CONFIG_PROC_PAGE_MONITOR"
        case .cannotReadPageFile(let path, let pfn, let e):
            return "reading \(path) at PFN 0x\(String(pfn, radix: 16)) failed: \(e)"
        case .cannotSet(let path, let value, let e): return "cannot set \(path) to \(value): \(e); balloond must run as root"
        case .cannotSetPoolSize(let path, let pages, let e): return "setting \(path) to \(pages) failed: \(e)"
        case .cannotRestore(let path, let value, let stateFile, let e):
            return "restoring \(path) to \(value) from \(stateFile) failed: \(e)"
        case .otherInstanceChanged(let sysctl, let pid, let stateFile):
            return "another balloond (pid \(pid)) has changed \(sysctl) (see \(stateFile)); stop it first"
        case .noArena: return "no device memory arena to reserve hugetlb pages from"
        case .cannotReserve(let pages, let e):
            return "reserving \(pages) hugetlb pages with an unfaulted shared hugetlbfs mapping failed: \(e) (ENOMEM: fewer free unreserved pool pages than that)"
        case .cannotMap(let bytes, let step, let e):
            let what = "\(bytes >> 20) MiB of anonymous memory"
            let failed = "\(step.describe(what)) failed: \(e)"
            return step == .lock ? failed + "; run balloond as root (CAP_IPC_LOCK) or raise RLIMIT_MEMLOCK" : failed
        case .noMemoryHotplug(let path, let e):
            return "cannot read \(path) (\(e)): the kernel has no memory hotplug (CONFIG_MEMORY_HOTPLUG and CONFIG_MEMORY_HOTREMOVE)"
        case .cannotOnline(let block, let path, let e): return "cannot online memory block \(block) (\(path)): \(e)"
        case .noPFN(let page, let entry):
            return "page \(page) of a populated, locked chunk has no PFN in /proc/self/pagemap (\(entry)); balloond needs CAP_SYS_ADMIN for PFNs"
        case .cannotHold(let path, let value, let e): return "cannot set \(path) to \(value): \(e)"
        case .deviceMappingFailed(let e):
            return "cannot map owned memory for the device: \(e)"
        case .compactionNotPrevented(let e):
            return "not taking anonymous memory: \(e); without vm.compact_unevictable_allowed=0 compaction could move a hinted page"
        case .cannotReadPoolSize(let stateFile, let e): return "reading the hugetlb pool size for \(stateFile) failed: \(e)"
        case .cannotRestorePoolSize(let stateFile, let e): return "restoring nr_hugepages from \(stateFile) failed: \(e)"
        case .several(let errors): return errors.map(\.description).joined(separator: "; ")
        }
    }
}

/// The steps of mapping owned memory (anonymous 4 KiB pages or hugetlb pages), each a call
/// that can fail on its own.
public enum MappingStep: Hashable, Sendable {
    /// `mmap` of the memory (from the device memory arena).
    case mmap
    /// `MADV_NOHUGEPAGE` (no THP).
    case noHugePage
    /// `MADV_UNMERGEABLE` (no KSM).
    case unmergeable
    /// `MADV_DONTFORK` (no copy-on-write after a fork).
    case dontFork
    /// Populating for write (`MADV_POPULATE_WRITE`, else one write per page).
    case populate
    /// `mlock`.
    case lock

    /// The step done on `what`, for a message ("mmap of 2 MiB of anonymous memory").
    public func describe(_ what: String) -> String {
        switch self {
        case .mmap: return "mmap of \(what)"
        case .noHugePage: return "MADV_NOHUGEPAGE on \(what)"
        case .unmergeable: return "MADV_UNMERGEABLE on \(what)"
        case .dontFork: return "MADV_DONTFORK on \(what)"
        case .populate: return "populating \(what)"
        case .lock: return "mlock of \(what)"
        }
    }
}
