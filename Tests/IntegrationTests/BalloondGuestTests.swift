// balloond against the real virtio-balloon of Debian's QEMU 7.2 inside a Debian 6.1 guest,
// or (BALLOOND_QEMU_VERSION=10.0 BALLOOND_GUEST_KERNEL=6.12) QEMU 10.0 with a 6.12 guest: bind, bring-up, status, config interrupts, stats, SIGTERM, SIGKILL and restart, for
// transitional and modern-only devices, and the error paths a user can hit.

import Foundation
import Testing

/// The QMP view of the balloon's virtio state.
struct VirtioStatus {
    let statuses: [String]
    let guestFeatures: [String]
    let broken: Bool

    init(_ vm: GuestVM) throws {
        let s = try vm.qmp.executeObject("x-query-virtio-status", arguments: ["path": "/machine/peripheral/balloon0/virtio-backend"])
        statuses = ((s["status"] as? [String: Any])?["statuses"] as? [String]) ?? []
        let g = s["guest-features"] as? [String: Any]
        guestFeatures = ((g?["dev-features"] as? [String]) ?? []) + ((g?["transports"] as? [String]) ?? [])
        broken = s["broken"] as? Bool ?? true
    }

    var driverOK: Bool { statuses.contains { $0.hasPrefix("VIRTIO_CONFIG_S_DRIVER_OK") } }
    var needsReset: Bool { statuses.contains { $0.hasPrefix("VIRTIO_CONFIG_S_NEEDS_RESET") } }
    var isReset: Bool { statuses.isEmpty }
    func has(_ feature: String) -> Bool { guestFeatures.contains { $0.hasPrefix(feature) } }
}

/// Polls `condition` (one guest round trip each) until it holds or `timeout` passes.
func eventually(_ timeout: TimeInterval = 30, _ what: String, _ condition: () throws -> Bool) throws {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if try condition() { return }
        Thread.sleep(forTimeInterval: 0.5)
    }
    Issue.record("timed out after \(Int(timeout)) s waiting for: \(what)")
}

/// Sets QEMU's stats polling to 1 s, waits for two guest-stats updates (QEMU returned the
/// buffer and balloond refilled it, twice), and returns the stats.
func guestStatsAfterTwoUpdates(_ vm: GuestVM) throws -> [String: Any] {
    _ = try vm.qmp.execute("qom-set", arguments: ["path": "/machine/peripheral/balloon0", "property": "guest-stats-polling-interval", "value": 1])
    var updates: [Int] = []
    try eventually(30, "two guest-stats updates") {
        let gs = try vm.qmp.executeObject("qom-get", arguments: ["path": "/machine/peripheral/balloon0", "property": "guest-stats"])
        let last = (gs["last-update"] as? NSNumber)?.intValue ?? 0
        if last != 0 && updates.last != last { updates.append(last) }
        return updates.count >= 2
    }
    let gs = try vm.qmp.executeObject("qom-get", arguments: ["path": "/machine/peripheral/balloon0", "property": "guest-stats"])
    return try #require(gs["stats"] as? [String: Any])
}

/// Starts `balloond run` in the guest and waits until it has published DRIVER_OK.
func startBalloond(_ vm: GuestVM, name: String, arguments: [String] = []) throws -> GuestVM.GuestProcess {
    let p = try vm.spawn(["balloond", "run", "--log-level", "debug"] + arguments, name: name)
    try eventually(60, "balloond \(name) reaches DRIVER_OK") {
        if let rc = try vm.exitStatus(of: p) {
            Issue.record("balloond exited with \(rc):\n\(try vm.output(of: p))")
            return true
        }
        return try vm.run("balloond status").output.contains("DRIVER_OK")
    }
    return p
}

@Suite("balloond in a QEMU guest", .serialized)
struct BalloondGuestTests {
    @Test("transitional device: bind from virtio-pci, DRIVER_OK with the expected features, status, config interrupt, stats, SIGTERM restores virtio-pci, SIGKILL then restart")
    func transitionalLifecycle() throws {
        // virtio_pci loaded at boot owns the function, as on a normal guest.
        try GuestVM.with(.init(name: "balloond-transitional", kernelArgs: ["balloond.modprobe=virtio_pci"])) { vm in
            let list = try vm.check("balloond list")
            #expect(list.contains("1af4:1002") && list.contains("transitional") && list.contains("virtio-pci") && list.contains("yes"), "\(list)")

            if vm.platform.qemuVersion != "7.2" {
                // QEMU 10's virtio-balloon-pci has an MSI-X table in BAR1 (7.2's has none);
                // balloond must still parse the capabilities and come up on INTx + ISR.
                let balloon = try #require(try vm.pciDevices().first { $0.vendor == 0x1af4 && $0.device == 0x1002 })
                let resources = try vm.check("cat /sys/bus/pci/devices/\(balloon.address)/resource").split(separator: "\n")
                try #require(resources.count > 1)
                #expect(!resources[1].hasPrefix("0x0000000000000000 0x0000000000000000"), "QEMU \(vm.platform.qemuVersion): no BAR1 (MSI-X table): \(resources[1])")
                // The capability list (config space from 0x34) holds MSI-X (id 0x11).
                let hex = try vm.check("od -An -v -tx1 -N256 /sys/bus/pci/devices/\(balloon.address)/config")
                let config = hex.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { UInt8($0, radix: 16) }
                var capabilityIDs: [UInt8] = []
                var next = config.count > 0x34 ? Int(config[0x34]) : 0
                while next >= 0x40, next + 1 < config.count, capabilityIDs.count < 48 {
                    capabilityIDs.append(config[next])
                    next = Int(config[next + 1])
                }
                #expect(capabilityIDs.contains(0x11), "QEMU \(vm.platform.qemuVersion): no MSI-X capability; capability ids \(capabilityIDs)")
            }
            let first = try startBalloond(vm, name: "b1")
            let v = try VirtioStatus(vm)
            #expect(v.driverOK && !v.needsReset && !v.broken)
            #expect(v.has("VIRTIO_BALLOON_F_STATS_VQ"))
            #expect(v.has("VIRTIO_F_VERSION_1"))
            #expect(!v.has("VIRTIO_F_IOMMU_PLATFORM") && !v.has("VIRTIO_F_ACCESS_PLATFORM"))
            #expect(try vm.check("readlink /sys/bus/pci/devices/*/driver | grep -c uio_pci_generic").contains("1"))

            let status = try vm.check("balloond status")
            #expect(status.contains("1af4:1002") && status.contains("/dev/uio") && status.contains("previous driver: virtio-pci"), "\(status)")
            #expect(status.contains("STATS_VQ|VERSION_1") || status.contains("STATS_VQ|"), "\(status)")
            #expect(status.contains("stats            size 128 enabled true"), "\(status)")

            // A new target arrives by config interrupt (INTx through uio).
            _ = try vm.qmp.execute("balloon", arguments: ["value": 768 << 20])
            try eventually(20, "num_pages 65536 in balloond status") { try vm.run("balloond status").output.contains("num_pages 65536") }

            // Stats: with a polling interval QEMU returns the buffer and balloond refills it.
            let stats = try guestStatsAfterTwoUpdates(vm)
            for key in ["stat-swap-in", "stat-swap-out", "stat-major-faults", "stat-minor-faults", "stat-free-memory",
                        "stat-total-memory", "stat-available-memory", "stat-disk-caches", "stat-htlb-pgalloc", "stat-htlb-pgfail"] {
                let v = (stats[key] as? NSNumber)?.uint64Value
                #expect(v != nil && v != UInt64.max, "\(key) = \(String(describing: v))")
            }
            let total = (stats["stat-total-memory"] as? NSNumber)?.uint64Value ?? 0
            #expect(total > 900 << 20 && total <= 1 << 30)

            // A second balloond on the same device is refused with the holder's pid.
            let second = try vm.run("balloond run")
            #expect(second.rc != 0)
            #expect(second.output.contains("\(first.pid)"), "\(second.output)")

            // SIGTERM: device reset, DMA freed, virtio-pci back.
            try vm.signal(first, "TERM")
            let firstRC = try vm.waitForExit(first, timeout: 30)
            let firstLog = try vm.output(of: first)
            #expect(firstRC == 0, "\(firstLog)")
            #expect(firstLog.contains("resetting the device"))
            // virtio-pci has re-probed it: only ACKNOWLEDGE (no virtio_balloon driver loaded).
            let afterTerm = try VirtioStatus(vm)
            #expect(!afterTerm.driverOK && !afterTerm.needsReset, "\(afterTerm.statuses)")
            #expect(try vm.check("readlink /sys/bus/pci/devices/*/driver | grep -c virtio-pci").contains("1"))
            #expect(try vm.check("cat /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").trimmingCharacters(in: .whitespacesAndNewlines) == "0")
            #expect(try vm.run("balloond status").rc != 0)

            // SIGKILL: uio's release clears bus mastering, QEMU drops DRIVER_OK; a new
            // balloond resets and re-initialises the device.
            let killed = try startBalloond(vm, name: "b2")
            try vm.signal(killed, "KILL")
            _ = try vm.waitForExit(killed, timeout: 30)
            try eventually(10, "DRIVER_OK dropped after SIGKILL") { !(try VirtioStatus(vm).driverOK) }
            let restarted = try startBalloond(vm, name: "b3")
            let v3 = try VirtioStatus(vm)
            #expect(v3.driverOK && !v3.needsReset)
            _ = try vm.qmp.execute("balloon", arguments: ["value": 512 << 20])
            try eventually(20, "the restarted balloond sees the new target") { try vm.run("balloond status").output.contains("num_pages 131072") }
            try vm.signal(restarted, "TERM")
            #expect(try vm.waitForExit(restarted, timeout: 30) == 0)
            // The previous driver survives the SIGKILL through the state file.
            #expect(try vm.check("readlink /sys/bus/pci/devices/*/driver | grep -c virtio-pci").contains("1"))
            let console = vm.consoleLog()
            #expect(!console.contains("BUG") && !console.contains("Oops"))
        }
    }

    @Test("modern-only device (1af4:1045): bring-up, --keep-bound, then balloond unbind")
    func modernOnly() throws {
        try GuestVM.with(.init(name: "balloond-modern", modernOnly: true)) { vm in
            #expect(try vm.check("balloond list").contains("1af4:1045"))
            let p = try startBalloond(vm, name: "m1", arguments: ["--keep-bound"])
            let v = try VirtioStatus(vm)
            #expect(v.driverOK && !v.needsReset && v.has("VIRTIO_F_VERSION_1"))
            #expect(try vm.check("balloond status").contains("1af4:1045"))
            try vm.signal(p, "INT")
            #expect(try vm.waitForExit(p, timeout: 30) == 0)
            #expect(try VirtioStatus(vm).isReset)
            let drivers = "for d in /sys/bus/pci/devices/*; do readlink $d/driver; done; true"
            #expect(try vm.check(drivers).contains("uio_pci_generic"))
            let unbind = try vm.check("balloond unbind")
            #expect(unbind.contains("now bound to"), "\(unbind)")
            #expect(!(try vm.check(drivers).contains("uio_pci_generic")))
        }
    }

    @Test("bad input: no balloon device, a non-balloon --device, a malformed address, an unknown log level")
    func badInput() throws {
        try GuestVM.with(.init(name: "balloond-nodevice", balloon: false)) { vm in
            let none = try vm.run("balloond run")
            #expect(none.rc != 0)
            #expect(none.output.contains("no virtio-balloon PCI device found"), "\(none.output)")
            let host = try vm.check("basename $(ls -d /sys/bus/pci/devices/* | head -1)").trimmingCharacters(in: .whitespacesAndNewlines)
            let other = try vm.run("balloond run --device \(host)")
            #expect(other.rc != 0)
            #expect(other.output.contains("not a virtio balloon"), "\(other.output)")
            let malformed = try vm.run("balloond run --device nonsense")
            #expect(malformed.rc != 0 && malformed.output.contains("not a PCI address"))
            let level = try vm.run("balloond run --log-level loud")
            #expect(level.rc != 0 && level.output.contains("unknown log level"))
            #expect(try vm.run("balloond status").rc != 0)
        }
    }
}
