import Testing
@testable import balloond

/// `balloond run`'s options are all checked by ArgumentParser's `validate()`, which runs before
/// `run()` loads a module, unbinds a driver or takes memory (issue 9 M5).
@Suite("run: every option is validated before anything changes")
struct RunOptionValidationTests {
    @Test("the defaults are valid")
    func defaults() throws {
        _ = try RunCommand.parse([])
    }

    @Test("bad values are refused with a message naming the option", arguments: [
        (["--pressure-hold-seconds", "-1"], "--pressure-hold-seconds"),
        (["--pressure-hold-seconds", "nan"], "--pressure-hold-seconds"),
        (["--pressure-hold-seconds", "1e30"], "--pressure-hold-seconds"),
        (["--psi-window-ms", "100"], "--psi-window-ms"),
        (["--psi-window-ms", "99999999999"], "psi-window-ms"),
        (["--psi-stall-ms", "0"], "--psi-stall-ms"),
        (["--psi-early-stall-ms", "501"], "--psi-early-stall-ms"),
        (["--psi-early-stall-ms", "-1"], "--psi-early-stall-ms"),
        (["--psi-stall-ms", "2000", "--psi-window-ms", "1000"], "--psi-stall-ms"),
        (["--deflate-step-mib", "0"], "--deflate-step-mib"),
        (["--deflate-below-mib", "99999999999999"], "--deflate-below-mib"),
        (["--report-keep-free-mib", "64", "--report-release-below-mib", "128"], "--report-release-below-mib"),
        (["--reinflate-above-mib", "10", "--deflate-below-mib", "96"], "--reinflate-above-mib"),
        (["--hint-source", "bogus"], "hint-source"),
        (["--hint-source", "simulated"], "simulated"),
        (["--unsafe-hints-on-kvm"], "--unsafe-hints-on-kvm"),
        (["--log-level", "chatty"], "log level"),
    ])
    func refused(arguments: [String], mentions: String) {
        do {
            _ = try RunCommand.parse(arguments)
            Issue.record("\(arguments) was accepted")
        } catch {
            let message = RunCommand.message(for: error)
            #expect(message.contains(mentions), "message for \(arguments): \(message)")
        }
    }

    @Test("--hint-source takes the named sources")
    func hintSources() throws {
        #expect(try RunCommand.parse(["--hint-source", "kpageflags"]).hintSource == .kpageflags)
        #expect(try RunCommand.parse(["--hint-source", "hugetlb"]).hintSource == .hugetlb)
        #expect(try RunCommand.parse(["--hint-source", "kpageflags", "--unsafe-hints-on-kvm"]).unsafeHintsOnKVM)
    }

    @Test("option values become the driver's policies without overflow")
    func policies() throws {
        let run = try RunCommand.parse(["--pressure-hold-seconds", "1.5", "--deflate-below-mib", "1048576", "--reinflate-above-mib", "1048576"])
        let options = run.driverOptions(poisonPolicy: .none)
        #expect(options.pressure.hold == .milliseconds(1500))
        #expect(options.pressure.deflateBelowAvailableBytes == 1 << 40)
    }
}
