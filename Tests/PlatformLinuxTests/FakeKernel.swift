#if canImport(Glibc)
import Glibc
#endif
import TestSupport
import PlatformLinux

/// A stand-in kernel for binding tests: records every sysfs write, command and mknod, writes
/// the value into the fake tree, and simulates what Linux does for the PCI driver core
/// attributes (unbind removes the `driver` link; drivers_probe and bind create it, and
/// uio_pci_generic adds `uio/uio0/dev`).
final class FakeKernel: KernelControl {
    struct Write: Equatable, CustomStringConvertible {
        var path: String
        var value: String
        var description: String { "\(path) <- \(value.debugDescription)" }
    }

    let tree: FakeTree
    /// Writes with the tree prefix removed.
    private(set) var writes: [Write] = []
    private(set) var commands: [[String]] = []
    private(set) var nodes: [(path: String, major: UInt32, minor: UInt32)] = []
    /// Modules `modprobe` can load.
    var modprobeable: Set<String> = ["uio", "uio_pci_generic"]
    /// Whether insmod of an existing file works.
    var insmodWorks = true
    /// Whether uio_pci_generic accepts devices (false: probe fails as without INTx masking).
    var uioAcceptsDevices = true
    /// Whether devtmpfs creates /dev/uioN.
    var devtmpfs = true

    init(tree: FakeTree) { self.tree = tree }

    private func relative(_ p: String) -> String {
        p.hasPrefix(tree.path) ? String(p.dropFirst(tree.path.count)) : p
    }

    func writeAttribute(_ path: String, _ value: String) throws(PlatformError) {
        let rel = relative(path)
        writes.append(Write(path: rel, value: value))
        guard tree.exists(rel) else {
            throw .system(SystemCallError(call: "open", path: path, errno: .noSuchFileOrDirectory))
        }
        try! Sys.writeFile(path, value)
        let parts = rel.split(separator: "/").map(String.init)
        // /sys/bus/pci/drivers/NAME/{bind,unbind}
        if parts.count == 6, parts[0...3] == ["sys", "bus", "pci", "drivers"] {
            let driver = parts[4], bdf = value
            switch parts[5] {
            case "unbind":
                tree.remove("/sys/bus/pci/devices/\(bdf)/driver")
                if driver == "uio_pci_generic" { removeTree(tree.at("/sys/bus/pci/devices/\(bdf)/uio")) }
            case "bind":
                attach(bdf, driver)
            default: break
            }
        }
        if rel == "/sys/bus/pci/drivers_probe" {
            let bdf = value
            let override = tree.read("/sys/bus/pci/devices/\(bdf)/driver_override").map { $0.trimmingNewline } ?? ""
            if override == "uio_pci_generic" {
                guard uioAcceptsDevices else {
                    throw .system(SystemCallError(call: "write", path: path, errno: .operationNotSupportedByDevice))
                }
                attach(bdf, "uio_pci_generic")
            } else if override.isEmpty || override == "(null)" {
                attach(bdf, "virtio-pci")
            }
        }
        if parts.last == "driver_override" {
            // The kernel shows "(null)" for a cleared override.
            if value == "\n" { try! Sys.writeFile(path, "(null)\n") }
        }
    }

    private func attach(_ bdf: String, _ driver: String) {
        tree.bindLink(bdf, driver)
        if driver == "uio_pci_generic" {
            tree.file("/sys/bus/pci/devices/\(bdf)/uio/uio0/dev", "243:0\n")
            if devtmpfs { tree.file("/dev/uio0", "") }
        }
    }

    func runCommand(_ program: String, _ arguments: [String]) -> CommandResult {
        commands.append([program] + arguments)
        switch program {
        case "modprobe":
            let name = arguments.first ?? ""
            guard modprobeable.contains(name) else {
                return CommandResult(status: 1, output: "modprobe: FATAL: Module \(name) not found in directory /lib/modules/6.1.0-test")
            }
            load(name)
            return CommandResult(status: 0, output: "")
        case "insmod":
            guard insmodWorks, let path = arguments.first, Sys.exists(path) else {
                return CommandResult(status: 1, output: "insmod: ERROR: could not insert module")
            }
            let file = path.split(separator: "/").last.map(String.init) ?? ""
            // The kernel names a module with '_' where its file name has '-' (vfio-pci.ko
            // is /sys/module/vfio_pci).
            load(String(file.prefix(while: { $0 != "." }).map { $0 == "-" ? "_" : $0 }))
            return CommandResult(status: 0, output: "")
        default:
            return CommandResult(status: 127, output: "\(program) not found")
        }
    }

    private func load(_ name: String) {
        tree.directory("/sys/module/\(name)")
        if name == "uio_pci_generic" { tree.pciDriver("uio_pci_generic") }
    }

    func makeCharacterDevice(_ path: String, major: UInt32, minor: UInt32) throws(PlatformError) {
        nodes.append((relative(path), major, minor))
        try! Sys.writeFile(path, "")
    }
}

extension String {
    var trimmingNewline: String {
        var s = self
        while s.hasSuffix("\n") { s.removeLast() }
        return s
    }
}

/// A modern virtio balloon at `bdf` bound to `driver` (nil: unbound) in a fake tree, with
/// virtio-pci's driver directory, and a binder over a fake kernel that does not wait for
/// device nodes.
func fakeBalloonBinder(_ bdf: PCIAddress, driver: String?) -> (FakeTree, FakeKernel, DriverBinder) {
        let t = FakeTree()
        t.pciDevice(bdf.bdf, vendor: 0x1af4, device: 0x1045, driver: driver, resources: balloonResources)
        t.pciDriver("virtio-pci")
        t.file("/sys/bus/pci/drivers_probe", "")
        t.directory("/dev")
        let k = FakeKernel(tree: t)
        let b = DriverBinder(root: t.root, kernel: k, kernelRelease: "6.1.0-test")
        b.deviceNodeWait = (0, 0)
        return (t, k, b)
}
