import Testing
@testable import FreePagesLinux
import PlatformLinux

@Suite struct HintSourceSelectionTests {
    struct Row: CustomTestStringConvertible, Sendable {
        var requested: String
        var hv: Hypervisor
        var poison = false
        var initOnFree = false
        var unsafe = false
        var hugetlb = true
        var simulated = false
        /// The source chosen, or nil for a refusal.
        var expect: String?
        /// Words the reason (or error) must contain.
        var says: [String]
        var testDescription: String {
            "\(requested) on \(hv) poison=\(poison) iof=\(initOnFree) unsafe=\(unsafe) hugetlb=\(hugetlb) sim=\(simulated)"
        }
    }

    static let table: [Row] = [
        // auto
        Row(requested: "auto", hv: .tcg, expect: "kpageflags", says: ["TCG", "fastest"]),
        Row(requested: "auto", hv: .tcg, poison: true, expect: "hugetlb", says: ["page poisoning"]),
        Row(requested: "auto", hv: .tcg, initOnFree: true, expect: "hugetlb", says: ["init_on_free"]),
        Row(requested: "auto", hv: .tcg, poison: true, hugetlb: false, expect: "anonymous", says: ["no usable 2 MiB hugetlb pool"]),
        Row(requested: "auto", hv: .kvm, expect: "hugetlb", says: ["KVM", "owned"]),
        Row(requested: "auto", hv: .kvm, unsafe: true, expect: "hugetlb", says: ["explicit --hint-source kpageflags"]),
        Row(requested: "auto", hv: .kvm, hugetlb: false, expect: "anonymous", says: ["hugetlb pool"]),
        Row(requested: "auto", hv: .other("Microsoft Hv"), expect: "hugetlb", says: ["Microsoft Hv"]),
        Row(requested: "auto", hv: .none, hugetlb: false, expect: "anonymous", says: ["no hypervisor"]),
        Row(requested: "auto", hv: .kvm, simulated: true, expect: "simulated", says: ["simulated device"]),
        // kpageflags
        Row(requested: "kpageflags", hv: .tcg, expect: "kpageflags", says: ["TCGTCGTCGTCG", "dirty-logged"]),
        Row(requested: "kpageflags", hv: .kvm, expect: nil, says: ["refused", "KVM", "--unsafe-hints-on-kvm", "silently lost"]),
        Row(requested: "kpageflags", hv: .kvm, unsafe: true, expect: "kpageflags", says: ["UNSAFE", "lost"]),
        Row(requested: "kpageflags", hv: .tcg, poison: true, expect: nil, says: ["page_poison=1", "0xaa", "pagealloc: memory corruption", "hugetlb or anonymous"]),
        Row(requested: "kpageflags", hv: .kvm, poison: true, unsafe: true, expect: nil, says: ["0xaa"]),
        Row(requested: "kpageflags", hv: .tcg, initOnFree: true, expect: nil, says: ["init_on_free", "stale data"]),
        Row(requested: "kpageflags", hv: .none, expect: nil, says: ["no hypervisor"]),
        // owned
        Row(requested: "hugetlb", hv: .kvm, expect: "hugetlb", says: ["fall back to anonymous"]),
        Row(requested: "hugetlb", hv: .kvm, hugetlb: false, expect: nil, says: ["unavailable", "--hint-source anonymous"]),
        Row(requested: "hugetlb", hv: .tcg, poison: true, expect: "hugetlb", says: ["owned"]),
        Row(requested: "anonymous", hv: .kvm, poison: true, initOnFree: true, hugetlb: false, expect: "anonymous", says: ["owned"]),
        // simulated and nonsense
        Row(requested: "simulated", hv: .kvm, expect: nil, says: ["balloond simulate", "pages in use"]),
        Row(requested: "simulated", hv: .tcg, simulated: true, expect: "simulated", says: ["simulated"]),
        Row(requested: "Auto", hv: .tcg, expect: nil, says: ["unknown", "auto, hugetlb, anonymous, kpageflags, simulated"]),
        Row(requested: "", hv: .kvm, expect: nil, says: ["unknown"]),
    ]

    static func choose(_ r: Row) -> Result<(name: String, reason: String), HintSourceSelectionError> {
        chooseHintSource(requested: r.requested, hypervisor: r.hv, memoryDebug: (r.poison, r.initOnFree),
                         unsafeHintsOnKVM: r.unsafe, hugetlbAvailable: r.hugetlb, simulatedDevice: r.simulated)
    }

    @Test(arguments: table)
    func eachRow(_ row: Row) {
        let text: String
        switch Self.choose(row) {
        case .success(let c):
            #expect(c.name == row.expect, "chose \(c.name): \(c.reason)")
            text = c.reason
        case .failure(let e):
            #expect(row.expect == nil, "refused: \(e)")
            text = e.description
        }
        for w in row.says { #expect(text.contains(w), "\(text.debugDescription) should mention \(w.debugDescription)") }
    }

    /// Every combination of inputs: the safety rules hold and auto always finds a source.
    @Test func everyCombination() {
        let hvs: [Hypervisor] = [.tcg, .kvm, .other("VMwareVMware"), .none]
        var count = 0
        for requested in hintSourceNames + ["bogus"] {
            for hv in hvs {
                for poison in [false, true] {
                    for iof in [false, true] {
                        for unsafe in [false, true] {
                            for huge in [false, true] {
                                for sim in [false, true] {
                                    count += 1
                                    let row = Row(requested: requested, hv: hv, poison: poison, initOnFree: iof, unsafe: unsafe,
                                                  hugetlb: huge, simulated: sim, says: [])
                                    let result = Self.choose(row)
                                    let chosen: String? = (try? result.get())?.name
                                    let expected: String? = {
                                        switch requested {
                                        case "auto":
                                            if sim { return "simulated" }
                                            if hv == .tcg && !poison && !iof { return "kpageflags" }
                                            return huge ? "hugetlb" : "anonymous"
                                        case "kpageflags":
                                            return !poison && !iof && (hv == .tcg || unsafe) ? "kpageflags" : nil
                                        case "hugetlb": return huge ? "hugetlb" : nil
                                        case "anonymous": return "anonymous"
                                        case "simulated": return sim ? "simulated" : nil
                                        default: return nil
                                        }
                                    }()
                                    #expect(chosen == expected, "\(row.testDescription)")
                                    // The rules, stated independently of the oracle above.
                                    if chosen == "kpageflags" {
                                        #expect(!poison && !iof)
                                        #expect(hv == .tcg || (unsafe && requested == "kpageflags"))
                                    }
                                    if chosen == "simulated" { #expect(sim) }
                                    if chosen == "hugetlb" { #expect(huge) }
                                    if requested == "auto" { #expect(chosen != nil) }
                                    switch result {
                                    case .success(let c): #expect(!c.reason.isEmpty)
                                    case .failure(let e): #expect(e.description.count > 40, "actionable: \(e)")
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        #expect(count == 6 * 4 * 32)
    }
}
