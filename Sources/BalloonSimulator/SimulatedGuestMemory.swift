import VirtioCore
import VirtioQueue

/// The simulated guest's physical memory, as the simulated device sees it.
///
/// Two kinds of memory exist: DMA regions the driver allocated from `HeapDMAAllocator`
/// (identity-mapped: their "physical" address is their virtual address, so the device can
/// read rings and buffers), and a range of plain simulated RAM (`ram`) with no backing, which
/// stands for the guest's free memory: hints and PFNs may point there, and the device only
/// records them. A descriptor anywhere else is "bogus" (QEMU: "virtio: bogus descriptor or
/// out of resources") and breaks the device.
public final class SimulatedGuestMemory {
    /// Simulated RAM without backing (default: 1 GiB at guest-physical 0).
    public let ram: GuestPhysicalRange
    private var regions: [DMARegion] = []

    public init(ram: GuestPhysicalRange = GuestPhysicalRange(start: 0, length: 1 << 30)) {
        self.ram = ram
    }

    func register(_ region: DMARegion) { regions.append(region) }

    /// The DMA region and offset holding `[address, address+length)`, if the range is backed.
    public func region(containing address: PhysicalAddress, length: UInt64) -> (DMARegion, Int)? {
        for r in regions where r.contains(address, length: length) {
            return (r, r.offset(of: address)!)
        }
        return nil
    }

    /// Whether a device could map `[address, address+length)`: backed DMA memory or RAM.
    public func isMappable(_ address: PhysicalAddress, length: UInt64) -> Bool {
        if region(containing: address, length: length) != nil { return true }
        return address.value >= ram.start.value && address.value <= ram.end && length <= ram.end - address.value
    }

    /// Reads bytes from backed memory; nil if the range is not backed.
    public func read(_ address: PhysicalAddress, count: Int) -> [UInt8]? {
        guard let (r, off) = region(containing: address, length: UInt64(count)) else { return nil }
        return r.read(at: off, count: count)
    }
}

/// DMA memory for tests and the simulator: aligned heap blocks whose physical address is
/// their virtual address, registered with a `SimulatedGuestMemory` so the device can reach them.
public final class HeapDMAAllocator: DMAAllocator {
    public let memory: SimulatedGuestMemory
    /// Bytes handed out so far.
    public private(set) var allocatedBytes = 0

    public init(memory: SimulatedGuestMemory) { self.memory = memory }

    /// Heap blocks of any size.
    public var largestAllocation: Int { Int.max }

    public func allocate(byteCount: Int, alignment: Int) throws(DMAError) -> DMARegion {
        // The standard library's aligned allocation (it traps when the heap is exhausted, which
        // for the simulator's few small rings and buffers is a test failure, not a condition).
        let base = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 1), alignment: max(alignment, 16))
        let address = PhysicalAddress(UInt64(UInt(bitPattern: base)))
        // Unsafe: `base` is a fresh heap block of byteCount bytes, freed exactly once in release.
        let region = unsafe DMARegion(unsafeBase: base, physicalAddress: address, size: byteCount, release: { unsafe base.deallocate() })
        region.zero()
        memory.register(region)
        allocatedBytes += byteCount
        return region
    }
}
