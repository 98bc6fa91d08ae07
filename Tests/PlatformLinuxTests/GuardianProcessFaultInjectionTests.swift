#if canImport(Glibc)
import Glibc
#endif
import TestSupport
import Testing
import PlatformLinux

/// The built `balloond` next to the test bundle (`swift build` puts both in the same directory).
private let balloondExecutable: String? = {
    guard let me = try? Sys.readlink("/proc/self/exe") else { return nil }
    let dir = me[..<(me.lastIndex(of: "/") ?? me.startIndex)]
    let candidates = [String(dir) + "/balloond", String(dir[..<(dir.lastIndex(of: "/") ?? dir.startIndex)]) + "/balloond"]
    return candidates.first { access($0, X_OK) == 0 }
}()

/// A fake virtio balloon under a SysRoot: config space with the three virtio capabilities
/// (Bus Master on), a 16 KiB BAR4 whose resource4 file is a regular file (device_status at
/// offset 20), and a hugetlb pool.
private func fakeDevice(_ tree: FakeTree, bdf: String = "0000:00:05.0", status: UInt8 = 0x0f) {
    var cfg = [UInt8](repeating: 0, count: 256)
    cfg[0] = 0xf4; cfg[1] = 0x1a; cfg[2] = 0x45; cfg[3] = 0x10
    cfg[4] = 0x07; cfg[5] = 0x01  // Command: I/O, memory, Bus Master; INTx disable
    cfg[6] = 0x10  // capability list
    cfg[0x34] = 0x40
    func cap(_ at: Int, next: UInt8, len: UInt8, type: UInt8, offset: UInt32, mult: UInt32? = nil) {
        cfg[at] = 0x09; cfg[at + 1] = next; cfg[at + 2] = len; cfg[at + 3] = type; cfg[at + 4] = 4
        for i in 0..<4 { cfg[at + 8 + i] = UInt8((offset >> (8 * UInt32(i))) & 0xff); cfg[at + 12 + i] = UInt8((0x1000 >> (8 * i)) & 0xff) }
        if let mult { for i in 0..<4 { cfg[at + 16 + i] = UInt8((mult >> (8 * UInt32(i))) & 0xff) } }
    }
    cap(0x40, next: 0x50, len: 16, type: 1, offset: 0)
    cap(0x50, next: 0x64, len: 20, type: 2, offset: 0x3000, mult: 4)
    cap(0x64, next: 0, len: 16, type: 3, offset: 0x1000)
    let zero = "0x0000000000000000 0x0000000000000000 0x0000000000000000"
    var resources = Array(repeating: zero, count: 13)
    resources[4] = "0x00000000fe000000 0x00000000fe003fff 0x000000000014220c"
    tree.pciDevice(bdf, vendor: 0x1af4, device: 0x1045, driver: "uio_pci_generic", resources: resources, config: cfg)
    var bar = [UInt8](repeating: 0, count: 0x4000)
    bar[20] = status
    tree.file("/sys/bus/pci/devices/\(bdf)/resource4", bytes: bar)
    tree.file("/proc/self/oom_score_adj", "0\n")
    tree.file("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "3\n")
    tree.file("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "3\n")
    tree.file("/sys/kernel/mm/hugepages/hugepages-2048kB/resv_hugepages", "0\n")
}

private func bytes(_ tree: FakeTree, _ relative: String, _ offset: Int, _ count: Int) throws -> [UInt8] {
    try OpenFile(path: tree.at(relative), flags: O_RDONLY).pread(count: count, offset: offset)
}

private func exited(_ status: Int32) -> Int32? { status & 0x7f == 0 ? (status >> 8) & 0xff : nil }

@Suite("The guardian process on this machine (fake device under a SysRoot; issue 9 H2)",
       .enabled(if: balloondExecutable != nil, "needs the built balloond executable next to the tests"))
struct GuardianProcessFaultInjectionTests {
    let dev = "/sys/bus/pci/devices/0000:00:05.0"

    @Test("a worker that dies without quiescing: the guardian holds the memfds, resets the device, clears Bus Master, gives back the ring's pool page, exits 0")
    func killedWorker() throws {
        let tree = FakeTree()
        fakeDevice(tree)
        let arena = try DeviceMemoryArena()
        let link = try GuardianLink.start(arena: arena, device: PCIAddress("0000:00:05.0")!, root: tree.root, executable: balloondExecutable!)
        let fds = try Sys.listDirectory("/proc/\(link.pid)/fd").compactMap { try? Sys.readlink("/proc/\(link.pid)/fd/\($0)") }
        #expect(fds.contains { $0.contains("memfd:balloond-device-memory") }, "the guardian holds the small memfd: \(fds)")
        // No inherited descriptors; only the device's config file, which the guardian opens
        // itself at start (for clearing Bus Master without opening anything later).
        #expect(!fds.contains { $0.contains("balloond-test") && !$0.hasSuffix(dev + "/config") }, "no other descriptors: \(fds)")
        #expect(tree.read("/proc/self/oom_score_adj") == "-1000\n")
        arena.poolChangeObserver?(true)  // the ring page grew nr_hugepages
        link.closeChannel()  // SIGKILL: the channel closes without "quiesced"
        #expect(exited(link.waitForExit()) == 0)
        #expect(try bytes(tree, dev + "/resource4", 20, 1) == [0], "device_status written 0")
        #expect(try bytes(tree, dev + "/config", 4, 1)[0] & 0x4 == 0, "Bus Master cleared")
        #expect(tree.read("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "2\n", "the ring page's pool growth undone")
    }

    @Test("the guardian resolves the device when it starts: after the worker's death it stops the device without opening a file (sysfs paths gone by then)")
    func deathPathOpensNothing() throws {
        let tree = FakeTree()
        fakeDevice(tree)
        let arena = try DeviceMemoryArena()
        let link = try GuardianLink.start(arena: arena, device: PCIAddress("0000:00:05.0")!, root: tree.root, executable: balloondExecutable!)
        // Ready means prepared. Move the files away: opening them by path now fails, the
        // mapping and descriptor the guardian took at start still reach them.
        #expect(rename(tree.at(dev + "/resource4"), tree.at(dev + "/resource4.moved")) == 0)
        #expect(rename(tree.at(dev + "/config"), tree.at(dev + "/config.moved")) == 0)
        link.closeChannel()
        #expect(exited(link.waitForExit()) == 0, "the guardian stopped the device and released the memory")
        #expect(try bytes(tree, dev + "/resource4.moved", 20, 1) == [0], "device_status written 0 through the mapping taken at start")
        #expect(try bytes(tree, dev + "/config.moved", 4, 1)[0] & 0x4 == 0, "Bus Master cleared through the descriptor opened at start")
    }

    @Test("a killed worker's hint-round pool growth is recovered by the guardian before it gives back the ring page (both undone)")
    func killedWorkerPoolGrowthRecovered() throws {
        let tree = FakeTree()
        fakeDevice(tree)
        // The ring page raised the pool 0 -> 1; a hint round then grew it 1 -> 371 and was
        // killed mid-round (its state file names a pid that is gone).
        tree.file("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "371\n")
        tree.stateFile("/run/balloond/hugetlb-pool",
                       "nr_hugepages_before=1\nnr_hugepages_set=371\nnr_hugepages_previous=1\npid=999999\ncomm=balloond\n")
        let arena = try DeviceMemoryArena()
        let link = try GuardianLink.start(arena: arena, device: PCIAddress("0000:00:05.0")!, root: tree.root, executable: balloondExecutable!)
        arena.poolChangeObserver?(true)  // the ring page grew nr_hugepages
        link.closeChannel()
        #expect(exited(link.waitForExit()) == 0)
        #expect(tree.read("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "0\n", "hint-round growth and ring page both undone")
    }

    @Test("a worker that quiesced the device: the guardian leaves the device alone and exits 0")
    func cleanExit() throws {
        let tree = FakeTree()
        fakeDevice(tree)
        let arena = try DeviceMemoryArena()
        let link = try GuardianLink.start(arena: arena, device: PCIAddress("0000:00:05.0")!, root: tree.root, executable: balloondExecutable!)
        link.markQuiesced()
        link.closeChannel()
        #expect(exited(link.waitForExit()) == 0)
        #expect(try bytes(tree, dev + "/resource4", 20, 1) == [0x0f], "not reset")
        #expect(try bytes(tree, dev + "/config", 4, 1)[0] & 0x4 != 0, "Bus Master untouched")
    }

    @Test("when the device can be neither reset nor have Bus Master cleared, the guardian stays alive holding the memory")
    func keepsMemory() throws {
        let tree = FakeTree()
        fakeDevice(tree)
        tree.remove(dev + "/config")
        tree.remove(dev + "/resource4")
        let arena = try DeviceMemoryArena()
        let link = try GuardianLink.start(arena: arena, device: PCIAddress("0000:00:05.0")!, root: tree.root, executable: balloondExecutable!)
        link.closeChannel()
        usleep(500_000)
        var status: Int32 = 0
        #expect(waitpid(link.pid, &status, WNOHANG) == 0, "still running")
        let fds = try Sys.listDirectory("/proc/\(link.pid)/fd").compactMap { try? Sys.readlink("/proc/\(link.pid)/fd/\($0)") }
        #expect(fds.contains { $0.contains("memfd:balloond-device-memory") }, "still holding the memory")
        kill(link.pid, SIGKILL)
        _ = link.waitForExit()
    }

    @Test("a guardian that never becomes ready makes start fail (no memory is handed to the device without it)")
    func notReady() throws {
        let arena = try DeviceMemoryArena()
        #expect { _ = try GuardianLink.start(arena: arena, device: PCIAddress("0000:00:05.0")!, executable: "/bin/true", readyTimeoutMilliseconds: 2000) } throws: { error in
            guard case GuardianStartError.notReady(_, milliseconds: 2000) = error else { return false }
            return "\(error)".contains("did not become ready within 2000 ms")
        }
    }
}
