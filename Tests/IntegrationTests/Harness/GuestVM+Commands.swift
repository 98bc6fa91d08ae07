// Commands in the guest over the command agent (`run`, `runRaw`, `check`), and facts read
// that way (`pciDevices`) or from the run directory (`consoleLog`).

import Foundation

extension GuestVM {
    /// Runs `command` in the guest with `sh` and returns its output (stdout and stderr
    /// together) and exit status. The guest kills it after `timeout` seconds, which throws.
    /// Output travels over an emulated serial line (~80 KiB/s): keep it small, or write big
    /// things to a file in the guest and grep there.
    func run(_ command: String, timeout: TimeInterval = 60) throws -> (output: String, rc: Int32) {
        let result = try runRaw(command, timeout: timeout)
        return (result.text, result.rc)
    }

    /// `run`, returning the output as bytes, with the elapsed time.
    func runRaw(_ command: String, timeout: TimeInterval = 60) throws -> GuestAgent.Result {
        do {
            return try agent.run(command, timeout: timeout)
        } catch let error as HarnessError {
            throw annotate(error)
        }
    }

    /// Runs `command` and returns its output; throws `.commandFailed` (with the output) if
    /// its exit status is not 0.
    @discardableResult
    func check(_ command: String, timeout: TimeInterval = 60) throws -> String {
        let (output, rc) = try run(command, timeout: timeout)
        guard rc == 0 else {
            throw annotate(HarnessError(.commandFailed, "guest command failed with rc=\(rc): \(command)\n\(tail(output))"))
        }
        return output
    }


    struct PCIDevice: CustomStringConvertible {
        /// e.g. "0000:00:01.0"
        let address: String
        let vendor: UInt16
        let device: UInt16
        let classCode: UInt32
        let revision: UInt8
        /// Bound driver, nil if none.
        let driver: String?
        var description: String {
            String(format: "%@ %04x:%04x rev %02x class %06x driver %@", address, vendor, device, revision, classCode, driver ?? "-")
        }
    }

    /// The guest's PCI functions, from sysfs.
    func pciDevices() throws -> [PCIDevice] {
        let out = try check("""
            for d in /sys/bus/pci/devices/*; do
              drv=-; [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
              echo "${d##*/} $(cat "$d/vendor") $(cat "$d/device") $(cat "$d/class") $(cat "$d/revision") $drv"
            done
            """, timeout: 30)
        func hex<T: FixedWidthInteger>(_ s: Substring) -> T? { T(s.hasPrefix("0x") ? s.dropFirst(2) : s, radix: 16) }
        return try out.split(separator: "\n").map { line in
            let f = line.split(separator: " ")
            guard f.count == 6, let vendor: UInt16 = hex(f[1]), let device: UInt16 = hex(f[2]),
                  let cls: UInt32 = hex(f[3]), let rev: UInt8 = hex(f[4]) else {
                throw annotate(HarnessError(.protocolViolation, "cannot parse PCI device line: \(line)"))
            }
            return PCIDevice(address: String(f[0]), vendor: vendor, device: device, classCode: cls,
                             revision: rev, driver: f[5] == "-" ? nil : String(f[5]))
        }
    }

    /// The console log (ttyS0) so far.
    func consoleLog() -> String {
        (try? String(contentsOf: URL(fileURLWithPath: consoleLogPath), encoding: .utf8)) ?? ""
    }
}
