import Testing
import FreePages
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux

@Suite struct HintSourceSelectionTests {
    struct Row: CustomTestStringConvertible, Sendable {
        var requested: HintSource
        var hv: Hypervisor
        var poison = false
        var initOnFree = false
        var unsafe = false
        var hugetlb = true
        var offline = true
        var simulated = false
        /// The source chosen ("off": hinting turned off), or nil for a refusal.
        var expect: String?
        /// Words the reason (or error) must contain.
        var says: [String]
        var testDescription: String {
            "\(requested) on \(hv) poison=\(poison) iof=\(initOnFree) unsafe=\(unsafe) hugetlb=\(hugetlb) offline=\(offline) sim=\(simulated)"
        }
    }

    static let table: [Row] = [
        // auto
        Row(requested: .auto, hv: .tcg, expect: "kpageflags", says: ["TCG", "fastest"]),
        // Under TCG, auto does not fall back to hugetlb or anonymous: offline, else hinting off.
        Row(requested: .auto, hv: .tcg, poison: true, expect: "offline", says: ["page poisoning", "auto: offline", "without writing a page", "safe on any host"]),
        Row(requested: .auto, hv: .tcg, initOnFree: true, hugetlb: false, expect: "offline", says: ["init_on_free", "auto: offline"]),
        Row(requested: .auto, hv: .tcg, poison: true, offline: false, expect: "off", says: ["page poisoning", "free page hinting disabled", "auto chose hugetlb", "corrupts the destination", "CONFIG_MEMORY_HOTREMOVE", "--hint-source hugetlb"]),
        Row(requested: .auto, hv: .tcg, initOnFree: true, offline: false, expect: "off", says: ["init_on_free", "auto chose hugetlb"]),
        Row(requested: .auto, hv: .tcg, poison: true, hugetlb: false, offline: false, expect: "off", says: ["no usable 2 MiB hugetlb pool", "auto chose anonymous"]),
        // Elsewhere: offline where memory blocks can be offlined (nothing zeroed), else hugetlb, else anonymous.
        Row(requested: .auto, hv: .kvm, expect: "offline", says: ["KVM", "owned", "without writing a page"]),
        Row(requested: .auto, hv: .kvm, hugetlb: false, expect: "offline", says: ["KVM"]),
        Row(requested: .auto, hv: .kvm, offline: false, expect: "hugetlb", says: ["KVM", "owned", "cannot be taken offline"]),
        Row(requested: .auto, hv: .kvm, unsafe: true, offline: false, expect: "hugetlb", says: ["explicit --hint-source kpageflags"]),
        Row(requested: .auto, hv: .kvm, hugetlb: false, offline: false, expect: "anonymous", says: ["hugetlb pool"]),
        Row(requested: .auto, hv: .other("Microsoft Hv"), expect: "offline", says: ["Microsoft Hv"]),
        Row(requested: .auto, hv: .other("Microsoft Hv"), offline: false, expect: "hugetlb", says: ["Microsoft Hv"]),
        Row(requested: .auto, hv: .none, hugetlb: false, offline: false, expect: "anonymous", says: ["no hypervisor"]),
        Row(requested: .auto, hv: .kvm, simulated: true, expect: "simulated", says: ["simulated device"]),
        // kpageflags
        Row(requested: .kpageflags, hv: .tcg, expect: "kpageflags", says: ["TCGTCGTCGTCG", "dirty-logged"]),
        Row(requested: .kpageflags, hv: .kvm, expect: nil, says: ["refused", "KVM", "--unsafe-hints-on-kvm", "silently lost"]),
        Row(requested: .kpageflags, hv: .kvm, unsafe: true, expect: "kpageflags", says: ["UNSAFE", "lost"]),
        Row(requested: .kpageflags, hv: .tcg, poison: true, expect: nil, says: ["page_poison=1", "0xaa", "pagealloc: memory corruption", "hugetlb or anonymous"]),
        Row(requested: .kpageflags, hv: .kvm, poison: true, unsafe: true, expect: nil, says: ["0xaa"]),
        Row(requested: .kpageflags, hv: .tcg, initOnFree: true, expect: nil, says: ["init_on_free", "stale data"]),
        Row(requested: .kpageflags, hv: .none, expect: nil, says: ["no hypervisor"]),
        // owned
        Row(requested: .hugetlb, hv: .kvm, expect: "hugetlb", says: ["fall back to anonymous"]),
        Row(requested: .hugetlb, hv: .kvm, hugetlb: false, expect: nil, says: ["unavailable", "--hint-source anonymous"]),
        Row(requested: .hugetlb, hv: .tcg, poison: true, expect: "hugetlb", says: ["owned"]),
        Row(requested: .anonymous, hv: .kvm, poison: true, initOnFree: true, hugetlb: false, expect: "anonymous", says: ["owned"]),
        Row(requested: .offline, hv: .kvm, poison: true, expect: "offline", says: ["owned", "any host"]),
        Row(requested: .offline, hv: .kvm, offline: false, expect: nil, says: ["unavailable", "CONFIG_MEMORY_HOTREMOVE", "--hint-source hugetlb"]),
        // simulated
        Row(requested: .simulated, hv: .kvm, expect: nil, says: ["balloond simulate", "pages in use"]),
        Row(requested: .simulated, hv: .tcg, simulated: true, expect: "simulated", says: ["simulated"]),
    ]

    static func choose(_ r: Row) -> Result<HintSourceChoice, HintSourceSelectionError> {
        chooseHintSource(requested: r.requested, hypervisor: r.hv, memoryDebug: GuestMemoryDebugConfig(pagePoisoning: r.poison, initOnFree: r.initOnFree),
                         unsafeHintsOnKVM: r.unsafe, hugetlbAvailable: r.hugetlb, offlineAvailable: r.offline,
                         simulatedDevice: r.simulated)
    }

    @Test("each refusal is its own case: kpageflags with poisoning (carrying the reason) or outside TCG, hugetlb or offline unavailable, simulated on a real device")
    func refusalsAreCases() {
        func refusal(_ r: Row) -> HintSourceSelectionError? {
            if case .failure(let e) = Self.choose(r) { return e }
            return nil
        }
        let poisoned = GuestMemoryDebugConfig(pagePoisoning: true).observedHintsProblem
        #expect(poisoned != nil)
        #expect(refusal(Row(requested: .kpageflags, hv: .tcg, poison: true, expect: nil, says: [])) == poisoned.map { .kpageflagsWithPoisoning($0) })
        #expect(refusal(Row(requested: .kpageflags, hv: .kvm, expect: nil, says: [])) == .kpageflagsNotTCG(.kvm))
        #expect(refusal(Row(requested: .hugetlb, hv: .kvm, hugetlb: false, expect: nil, says: [])) == .hugetlbUnavailable)
        #expect(refusal(Row(requested: .offline, hv: .kvm, offline: false, expect: nil, says: [])) == .offlineUnavailable)
        #expect(refusal(Row(requested: .simulated, hv: .kvm, expect: nil, says: [])) == .simulatedOnRealDevice)
    }

    @Test(arguments: table)
    func eachRow(_ row: Row) {
        let text: String
        switch Self.choose(row) {
        case .success(let c):
            #expect((c.source?.rawValue ?? "off") == row.expect, "chose \(c.source?.rawValue ?? "off"): \(c.reason)")
            text = c.reason + (c.warning.map { " " + $0 } ?? "")
        case .failure(let e):
            #expect(row.expect == nil, "refused: \(e)")
            text = e.description
        }
        for w in row.says { #expect(text.contains(w), "\(text.debugDescription) should mention \(w.debugDescription)") }
    }

    /// The choice expected for every combination of inputs (memory blocks offlinable; the
    /// table above covers the other case), written out case by case: per
    /// requested source and hypervisor, 32 outcomes in four groups of eight. The groups are
    /// (page_poison, init_on_free) = (off, off), (off, on), (on, off), (on, on). Inside a group
    /// (unsafe-hints-on-kvm, hugetlb pool usable, simulated device) count up in binary, the
    /// simulated device fastest: unsafe is on in the last four, hugetlb in the 3rd, 4th, 7th and
    /// 8th, simulated in every second. K kpageflags, H hugetlb, A anonymous, S simulated,
    /// O offline, 0 hinting off, - refused.
    static let expectedChoices: [(requested: HintSource, byHypervisor: [(Hypervisor, String)])] = [
        (.auto, [(.tcg, "KSKSKSKS OSOSOSOS OSOSOSOS OSOSOSOS"),
                  (.kvm, "OSOSOSOS OSOSOSOS OSOSOSOS OSOSOSOS"),
                  (.other("VMwareVMware"), "OSOSOSOS OSOSOSOS OSOSOSOS OSOSOSOS"),
                  (.none, "OSOSOSOS OSOSOSOS OSOSOSOS OSOSOSOS")]),
        (.hugetlb, [(.tcg, "--HH--HH --HH--HH --HH--HH --HH--HH"),
                     (.kvm, "--HH--HH --HH--HH --HH--HH --HH--HH"),
                     (.other("VMwareVMware"), "--HH--HH --HH--HH --HH--HH --HH--HH"),
                     (.none, "--HH--HH --HH--HH --HH--HH --HH--HH")]),
        (.anonymous, [(.tcg, "AAAAAAAA AAAAAAAA AAAAAAAA AAAAAAAA"),
                       (.kvm, "AAAAAAAA AAAAAAAA AAAAAAAA AAAAAAAA"),
                       (.other("VMwareVMware"), "AAAAAAAA AAAAAAAA AAAAAAAA AAAAAAAA"),
                       (.none, "AAAAAAAA AAAAAAAA AAAAAAAA AAAAAAAA")]),
        (.offline, [(.tcg, "OOOOOOOO OOOOOOOO OOOOOOOO OOOOOOOO"),
                     (.kvm, "OOOOOOOO OOOOOOOO OOOOOOOO OOOOOOOO"),
                     (.other("VMwareVMware"), "OOOOOOOO OOOOOOOO OOOOOOOO OOOOOOOO"),
                     (.none, "OOOOOOOO OOOOOOOO OOOOOOOO OOOOOOOO")]),
        (.kpageflags, [(.tcg, "KKKKKKKK -------- -------- --------"),
                        (.kvm, "----KKKK -------- -------- --------"),
                        (.other("VMwareVMware"), "----KKKK -------- -------- --------"),
                        (.none, "----KKKK -------- -------- --------")]),
        (.simulated, [(.tcg, "-S-S-S-S -S-S-S-S -S-S-S-S -S-S-S-S"),
                       (.kvm, "-S-S-S-S -S-S-S-S -S-S-S-S -S-S-S-S"),
                       (.other("VMwareVMware"), "-S-S-S-S -S-S-S-S -S-S-S-S -S-S-S-S"),
                       (.none, "-S-S-S-S -S-S-S-S -S-S-S-S -S-S-S-S")]),
    ]

    /// Every combination of inputs chooses what `expectedChoices` says, the safety rules hold,
    /// and every refusal says what to do.
    @Test func everyCombination() {
        let letters: [HintSource: Character] = [.kpageflags: "K", .hugetlb: "H", .anonymous: "A", .offline: "O", .simulated: "S"]
        #expect(Set(Self.expectedChoices.map(\.requested)) == Set(HintSource.allCases))
        var count = 0
        for (requested, byHypervisor) in Self.expectedChoices {
            for (hv, grid) in byHypervisor {
                let expected = Array(grid.filter { $0 != " " })
                #expect(expected.count == 32, "\(requested) on \(hv): 32 outcomes")
                for (i, want) in expected.enumerated() {
                    count += 1
                    let poison = i & 16 != 0, iof = i & 8 != 0, unsafe = i & 4 != 0, huge = i & 2 != 0, sim = i & 1 != 0
                    let row = Row(requested: requested, hv: hv, poison: poison, initOnFree: iof, unsafe: unsafe,
                                  hugetlb: huge, simulated: sim, says: [])
                    let result = Self.choose(row)
                    let choice = try? result.get()
                    let chosen = choice?.source
                    let letter: Character = choice.map { c in c.source.map { letters[$0] ?? "?" } ?? "0" } ?? "-"
                    #expect(letter == want, "\(row.testDescription)")
                    // The safety rules, stated on their own.
                    if chosen == .kpageflags {
                        #expect(!poison && !iof)
                        #expect(hv == .tcg || (unsafe && requested == .kpageflags))
                    }
                    if chosen == .simulated { #expect(sim) }
                    if chosen == .hugetlb { #expect(huge) }
                    if requested == .auto { #expect(choice != nil, "auto is never refused") }
                    if hv == .tcg, chosen == .hugetlb || chosen == .anonymous {
                        #expect(requested == chosen && choice?.warning != nil, "an owned source under TCG only when asked for, with a warning")
                    }
                    switch result {
                    case .success(let c): #expect(!c.reason.isEmpty)
                    case .failure(let e): #expect(e.description.count > 40, "actionable: \(e)")
                    }
                }
            }
        }
        #expect(count == 6 * 4 * 32)
    }
}
