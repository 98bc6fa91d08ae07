// Boots the test guest under QEMU and checks the ground the integration tests stand on:
// the balloon PCI function is there with the expected identity and unbound (6.1; a 6.12
// guest builds virtio_pci in, so there it starts bound to virtio-pci), uio_pci_generic
// loads, QMP answers, and the command channel behaves (framing, timeouts, background
// processes). Needs scripts/setup.sh to have run; without the kernel these tests fail.

import Foundation
import Testing

@Suite("Guest boot", .serialized)
struct GuestBootTests {
    @Test("transitional balloon (1af4:1002) is unbound (6.1) or bound to the built-in virtio-pci (6.12), uio_pci_generic loads, QMP answers")
    func transitionalDevice() throws {
        try GuestVM.with(.init(name: "boot-transitional")) { vm in
            print("\(vm.platform): guest \(vm.kernelVersion) ready in \(String(format: "%.1f", vm.bootSeconds)) s; run directory \(vm.runDirectory.path)")
            let devices = try vm.pciDevices()
            let balloon = try #require(devices.first { $0.vendor == 0x1af4 && $0.device == 0x1002 },
                                       "no 1af4:1002 device in the guest: \(devices)")
            #expect(balloon.revision == 0x00)
            #expect(balloon.classCode == 0x00ff00)
            #expect(vm.kernelVersion.hasPrefix(vm.platform.guestKernel + "."), "booted \(vm.kernelVersion) for \(vm.platform)")
            if vm.platform.virtioPCIBuiltIn {
                // 6.12: virtio_pci is built in and binds the balloon at boot; balloond run
                // unbinds it (BalloondGuestTests).
                #expect(balloon.driver == "virtio-pci", "the balloon is bound to \(balloon.driver ?? "nothing") at boot")
            } else {
                // 6.1: virtio_pci is a module and nothing loads it: balloond finds the device unbound.
                #expect(balloon.driver == nil, "the balloon is bound to \(balloon.driver ?? "-") at boot")
            }

            try vm.check("modprobe uio_pci_generic")
            let modules = try vm.check("cat /proc/modules")
            #expect(modules.contains("uio_pci_generic"))
            #expect(modules.contains("uio "))
            #expect(!modules.contains("virtio_balloon"), "virtio_balloon must not be loaded by default")

            let status = try vm.qmp.executeObject("x-query-virtio-status",
                                                  arguments: ["path": "/machine/peripheral/balloon0/virtio-backend"])
            #expect(status["name"] as? String == "virtio-balloon")
            #expect((status["device-id"] as? NSNumber)?.intValue == 5)
            #expect(status["broken"] as? Bool == false)
            let hostFeatures = try #require(status["host-features"] as? [String: Any])
            let devFeatures = (hostFeatures["dev-features"] as? [String]) ?? []
            #expect(devFeatures.contains { $0.hasPrefix("VIRTIO_BALLOON_F_FREE_PAGE_HINT") },
                    "free-page-hint=on should be offered by default: \(devFeatures)")
            // The QEMU binary is the platform's (QEMU 10 is the one setup.sh unpacked).
            let version = try vm.qmp.executeObject("query-version")
            let qemu = (version["qemu"] as? [String: Any]) ?? [:]
            let majorMinor = "\((qemu["major"] as? NSNumber)?.intValue ?? -1).\((qemu["minor"] as? NSNumber)?.intValue ?? -1)"
            #expect(majorMinor == vm.platform.qemuVersion, "QEMU \(majorMinor) runs, \(vm.platform) asked for")

            let balloonInfo = try vm.qmp.executeObject("query-balloon")
            #expect((balloonInfo["actual"] as? NSNumber)?.int64Value == 1 << 30)
        }
    }

    @Test("MODERN_ONLY puts a modern-only balloon (1af4:1045, rev 1) behind a root port")
    func modernOnlyDevice() throws {
        try GuestVM.with(.init(name: "boot-modern-only", modernOnly: true)) { vm in
            let devices = try vm.pciDevices()
            let balloon = try #require(devices.first { $0.vendor == 0x1af4 && $0.device == 0x1045 },
                                       "no 1af4:1045 device in the guest: \(devices)")
            #expect(balloon.revision == 0x01)
            #expect(!balloon.address.hasPrefix("0000:00:"), "expected the device behind the root port, got \(balloon.address)")
            #expect(!devices.contains { $0.vendor == 0x1af4 && $0.device == 0x1002 })
            // No legacy I/O BAR: resource0 is all zero; BAR4 is the 16 KiB modern region.
            let resources = try vm.check("cat /sys/bus/pci/devices/\(balloon.address)/resource")
            let lines = resources.split(separator: "\n")
            try #require(lines.count > 4)
            #expect(lines[0].hasPrefix("0x0000000000000000 0x0000000000000000"))
            let bar4 = lines[4].split(separator: " ").compactMap { UInt64($0.dropFirst(2), radix: 16) }
            #expect(bar4.count == 3 && bar4[1] - bar4[0] + 1 == 0x4000, "BAR4: \(lines[4])")

            let status = try vm.qmp.executeObject("x-query-virtio-status",
                                                  arguments: ["path": "/machine/peripheral/balloon0/virtio-backend"])
            #expect(status["name"] as? String == "virtio-balloon")
        }
    }

    @Test("command channel: exact framing, guest-side timeouts, background processes and signals")
    func commandChannel() throws {
        try GuestVM.with(.init(name: "agent-channel", balloon: false)) { vm in
            // Output is returned byte for byte: no trailing newline added, marker look-alikes
            // and binary bytes pass through, exit codes survive.
            let noNewline = try vm.runRaw("printf 'a\\nb'")
            #expect(noNewline.output == Data("a\nb".utf8))
            let tricky = try vm.run("echo '<<<END c1 rc=0>>>'; printf '\\001\\377'; exit 7")
            #expect(tricky.rc == 7)
            let raw = try vm.runRaw("printf '\\001\\377\\015\\012'")
            #expect(raw.output == Data([0x01, 0xff, 0x0d, 0x0a]), "tty must be raw (no CR/LF mangling)")
            let quoting = try vm.check("printf '%s|' \"it's\" 'multi\nline' $((6*7))")
            #expect(quoting == "it's|multi\nline|42|")
            #expect(try vm.run("false").rc == 1)
            #expect(try vm.run("exit 300").rc == 44)  // the shell reports exit status modulo 256

            // A command that outlives its timeout is killed in the guest and reported as a
            // timeout; the channel stays usable afterwards.
            do {
                _ = try vm.run("sleep 30", timeout: 2)
                Issue.record("sleep 30 with a 2 s timeout returned instead of throwing")
            } catch let error as HarnessError {
                #expect(error.kind == .timeout, "\(error)")
            }
            #expect(try vm.check("echo still-alive") == "still-alive\n")

            // Background processes: own pid, default signal dispositions (SIGINT not ignored,
            // unlike a plain `cmd &`), exit status recorded, log readable.
            let sleeper = try vm.spawn(["sh", "-c", "echo started; exec sleep 300"], name: "sleeper")
            #expect(try vm.check("cat /proc/\(sleeper.pid)/comm") == "sleep\n")
            let sigIgn = try vm.check("grep SigIgn /proc/\(sleeper.pid)/status")
            #expect(sigIgn.contains("0000000000000000"), "spawned process ignores signals: \(sigIgn)")
            #expect(try vm.exitStatus(of: sleeper) == nil)
            try vm.signal(sleeper, "INT")
            #expect(try vm.waitForExit(sleeper, timeout: 10) == 130)
            #expect(try vm.output(of: sleeper) == "started\n")

            let exiter = try vm.spawn(["sh", "-c", "sleep 1; echo done; exit 3"], name: "exiter")
            #expect(try vm.waitForExit(exiter, timeout: 20) == 3)
            let killed = try vm.spawn(["sleep", "300"], name: "killed")
            try vm.signal(killed, "KILL")
            #expect(try vm.waitForExit(killed, timeout: 10) == 137)
            // Nothing is left behind as a zombie (PID 1 reaps orphans).
            let zombies = try vm.check("grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l")
            #expect(zombies.trimmingCharacters(in: .whitespacesAndNewlines) == "0")

            // The guest has what the driver tests rely on.
            try vm.check("test -d /dev/hugepages && grep -q hugetlbfs /proc/mounts")
            try vm.check("modprobe virtio_balloon && grep -q '^virtio_balloon ' /proc/modules")

            // If build-guest.sh found a balloond binary, it must start in the guest (its
            // shared libraries are in the image): any exit except "cannot load" is fine here.
            if try vm.run("test -x /usr/bin/balloond").rc == 0 {
                let (out, rc) = try vm.run("/usr/bin/balloond --help", timeout: 30)
                #expect(rc != 127 && !out.contains("error while loading shared libraries"),
                        "balloond cannot start in the guest (rc \(rc)): \(out)")
            }

            // QMP still answers when there is no balloon device.
            let status = try vm.qmp.executeObject("query-status")
            #expect(status["status"] as? String == "running")
        }
    }
}
