// balloond's vfio backend in a q35 guest with a virtual Intel IOMMU (intel-iommu with
// interrupt remapping, intel_iommu=on) and the balloon behind it with iommu_platform=on:
// QEMU 7.2 gives INTx, QEMU 10.0 MSI-X. `balloond run` with no arguments must pick vfio,
// negotiate ACCESS_PLATFORM, inflate and deflate, move the stats, survive SIGKILL, and give
// the device back on SIGTERM; a group shared with a device bound elsewhere is refused.

import Foundation
import Testing

/// The guest's interrupt counts whose name contains `name` (e.g. "vfio-msix"), from
/// /proc/interrupts: one entry per line, the first CPU column.
func interruptCounts(_ vm: GuestVM, matching name: String) throws -> [Int] {
    try vm.check("cat /proc/interrupts").split(separator: "\n").filter { $0.contains(name) }.compactMap { line in
        line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first.flatMap { Int($0) }
    }
}

/// `query-balloon`'s actual, in bytes.
func balloonActual(_ vm: GuestVM) throws -> UInt64 {
    let r = try vm.qmp.executeObject("query-balloon")
    return (r["actual"] as? NSNumber)?.uint64Value ?? 0
}

@Suite("balloond's vfio backend behind a virtual IOMMU", .serialized)
struct VFIOBackendTests {
    /// Every PCI function's driver link (functions without a driver print nothing).
    static let drivers = "for d in /sys/bus/pci/devices/*; do readlink $d/driver; done; true"

    /// The balloon modern-only behind its own root port (its own IOMMU group), the vIOMMU,
    /// and on 6.1 virtio_pci loaded at boot so the device has a driver to give back.
    static func options(_ name: String, iommuPlatform: Bool = true) -> GuestVM.Options {
        let modprobe = GuestPlatform.current.guestKernel == "6.1" ? ["balloond.modprobe=virtio_pci"] : []
        return .init(name: name, kernelArgs: modprobe, balloonProperties: ["free-page-reporting=on"], modernOnly: true, viommu: true,
                     iommuPlatform: iommuPlatform)
    }

    @Test("no arguments picks vfio; DRIVER_OK with ACCESS_PLATFORM; MSI-X on QEMU 10, INTx on 7.2; free pages reported through IOMMU mappings; 512 MiB inflated and given back; stats move; SIGKILL then restart; SIGTERM restores virtio-pci")
    func lifecycle() throws {
        try GuestVM.with(Self.options("vfio-lifecycle")) { vm in
            let list = try vm.check("balloond list")
            #expect(list.contains("group") && list.contains("vfio"), "\(list)")
            let b1 = try startBalloond(vm, name: "v1")
            let log1 = try vm.output(of: b1)
            #expect(log1.contains("backend: vfio"), "\(log1)")
            let v = try VirtioStatus(vm)
            #expect(v.driverOK && !v.needsReset && !v.broken, "\(v.statuses)")
            #expect(v.has("VIRTIO_F_IOMMU_PLATFORM") || v.has("VIRTIO_F_ACCESS_PLATFORM"), "\(v.guestFeatures)")
            #expect(try vm.check(Self.drivers).contains("vfio-pci"))
            let status = try vm.check("balloond status")
            #expect(status.contains("/dev/vfio/") && status.contains("previous driver: virtio-pci"), "\(status)")
            // Free page reporting under ACCESS_PLATFORM: each reported 2 MiB page is mapped in
            // the IOMMU, and QEMU (which translates the report's address) accepts it.
            #expect(v.has("VIRTIO_BALLOON_F_REPORTING"), "\(v.guestFeatures)")
            try eventually(60, "free pages reported") {
                let s = try vm.run("balloond status").output
                guard let r = s.range(of: "reports ") else { return false }
                return Int(s[r.upperBound...].prefix(while: { $0.isNumber })).map { $0 > 0 } ?? false
            }
            #expect(!(try VirtioStatus(vm).needsReset))

            // Inflate to 512 MiB and back: config interrupts and inflate/deflate queue
            // completions arrive through vfio (MSI-X vectors or the INTx eventfd).
            _ = try vm.qmp.execute("balloon", arguments: ["value": 512 << 20])
            try eventually(90, "actual reaches 512 MiB") { try balloonActual(vm) == 512 << 20 }
            _ = try vm.qmp.execute("balloon", arguments: ["value": 1 << 30])
            try eventually(60, "actual back at 1 GiB") { try balloonActual(vm) == 1 << 30 }

            if vm.platform.qemuVersion == "7.2" {
                let intx = try interruptCounts(vm, matching: "vfio-intx")
                #expect(intx.count == 1 && intx[0] > 0, "vfio-intx in /proc/interrupts: \(intx)")
            } else {
                let msix = try interruptCounts(vm, matching: "vfio-msix")
                #expect(msix.count >= 2 && msix.reduce(0, +) > 0 && msix.dropFirst().reduce(0, +) > 0, "vfio-msix vectors in /proc/interrupts: \(msix)")
                #expect(try interruptCounts(vm, matching: "vfio-intx").isEmpty)
            }

            // Stats: every tag QEMU knows is filled (10 on 7.2, 16 on 10.0).
            let stats = try guestStatsAfterTwoUpdates(vm)
            let filled = stats.values.compactMap { ($0 as? NSNumber)?.uint64Value }.filter { $0 != UInt64.max }
            #expect(filled.count == (vm.platform.qemuVersion == "7.2" ? 10 : 16), "\(stats)")

            // SIGKILL: vfio's release of the device clears Bus Master and the container's
            // mappings go; QEMU drops DRIVER_OK. A new balloond resets and re-initialises.
            try vm.signal(b1, "KILL")
            _ = try vm.waitForExit(b1, timeout: 30)
            try eventually(15, "DRIVER_OK dropped after SIGKILL") { !(try VirtioStatus(vm).driverOK) }
            let b2 = try startBalloond(vm, name: "v2")
            _ = try vm.qmp.execute("balloon", arguments: ["value": 768 << 20])
            try eventually(90, "the restarted balloond inflates to 768 MiB") { try balloonActual(vm) == 768 << 20 }

            // SIGTERM: device reset, IOMMU mappings and DMA memory released, virtio-pci back.
            try vm.signal(b2, "TERM")
            let rc = try vm.waitForExit(b2, timeout: 30)
            let log2 = try vm.output(of: b2)
            #expect(rc == 0, "\(log2)")
            #expect(try vm.check(Self.drivers).contains("virtio-pci"))
            #expect(!(try vm.check(Self.drivers).contains("vfio-pci")))
            let pool = try vm.check("cat /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(pool == "0", "nr_hugepages \(pool) after SIGTERM; balloond's log:\n\(tail(log2, lines: 25))")
            let console = vm.consoleLog()
            #expect(!console.contains("BUG") && !console.contains("Oops") && !console.contains("DMAR: DRHD: handling fault"), "\(tail(console, lines: 20))")
        }
    }

    @Test("a balloon sharing its IOMMU group with a device bound to virtio-pci is refused before anything changes, naming that device")
    func sharedGroupRefused() throws {
        // Behind a PCIe-to-PCI bridge every function shares the bridge's group; a virtio-rng
        // beside the balloon is bound to virtio-pci.
        let modprobe = GuestPlatform.current.guestKernel == "6.1" ? ["balloond.modprobe=virtio_pci"] : []
        let options = GuestVM.Options(name: "vfio-shared-group", kernelArgs: modprobe, balloon: false, viommu: true, extraQEMUArgs: [
            "-object", "iothread,id=io0",
            "-device", "pcie-pci-bridge,id=br0,bus=pcie.0",
            "-device", "virtio-balloon-pci,id=balloon0,iothread=io0,bus=br0,addr=1",
            "-device", "virtio-rng-pci,bus=br0,addr=2",
        ])
        try GuestVM.with(options) { vm in
            let before = try vm.check("for d in /sys/bus/pci/devices/*; do echo $d $(readlink $d/driver); done")
            let r = try vm.run("balloond run --backend vfio")
            #expect(r.rc != 0)
            #expect(r.output.contains("not viable") && r.output.contains("virtio-pci"), "\(r.output)")
            // Refused before binding: every driver is where it was.
            #expect(try vm.check("for d in /sys/bus/pci/devices/*; do echo $d $(readlink $d/driver); done") == before)
        }
    }
}
