import FreePages
import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import VirtioCore

/// A scripted source.
final class ScriptedSource: FreePageSource {
    let name: String
    let ownership: FreePageOwnership
    var heldBytes: UInt64 = 0
    var refuseBegin: String?
    var failNextBatchAfter: Int?
    var batches: [[GuestPhysicalRange]]
    private(set) var calls: [String] = []
    private(set) var applied: [GuestPhysicalRange] = []

    init(_ name: String, ownership: FreePageOwnership = .owned, batches: [[GuestPhysicalRange]]) {
        self.name = name
        self.ownership = ownership
        self.batches = batches
    }

    func beginRound(id: UInt32) throws(FreePageSourceError) {
        calls.append("begin \(id)")
        if let r = refuseBegin { throw .failed(ScriptedRefusal(r)) }
    }

    func nextBatch(maxRanges: Int, maxRangeBytes: UInt64) throws(FreePageSourceError) -> [GuestPhysicalRange] {
        calls.append("next")
        if let n = failNextBatchAfter {
            if n == 0 { throw .failed(ScriptedRefusal("\(name) broke")) }
            failNextBatchAfter = n - 1
        }
        return batches.isEmpty ? [] : batches.removeFirst()
    }

    func hintsApplied(_ ranges: [GuestPhysicalRange]) { applied += ranges }
    func endRound() { calls.append("end") }
    func releaseAll() { calls.append("release") }
}

@Suite struct RoundFallbackSourceTests {
    let a = GuestPhysicalRange(start: 0x20_0000, length: 0x20_0000)
    let b = GuestPhysicalRange(start: 0x80_0000, length: 0x1000)

    @Test func usesThePrimaryWhenItAccepts() throws {
        let p = ScriptedSource("hugetlb", batches: [[a]])
        let f = ScriptedSource("anonymous", batches: [[b]])
        let s = RoundFallbackSource(primary: p, fallback: f)
        #expect(s.name == "hugetlb" && s.ownership == .owned)
        try s.beginRound(id: 3)
        #expect(try s.nextBatch(maxRanges: 8, maxRangeBytes: 4 << 20) == [a])
        #expect(try s.nextBatch(maxRanges: 8, maxRangeBytes: 4 << 20) == [])
        #expect(f.calls.isEmpty)
        #expect(s.lastFallbackReason == nil)
    }

    @Test func fallsBackForTheRoundWhenThePrimaryRefuses() throws {
        let p = ScriptedSource("hugetlb", batches: [[a]])
        p.refuseBegin = "another process has 1 hugetlb page(s) reserved"
        let f = ScriptedSource("anonymous", batches: [[b]])
        let s = RoundFallbackSource(primary: p, fallback: f)
        try s.beginRound(id: 3)
        #expect(s.activeName == "anonymous")
        #expect(s.lastFallbackReason?.reason(as: ScriptedRefusal.self) == ScriptedRefusal("another process has 1 hugetlb page(s) reserved"))
        #expect(try s.nextBatch(maxRanges: 8, maxRangeBytes: 4 << 20) == [b])
        s.endRound()
        // The next round tries the primary again.
        p.refuseBegin = nil
        try s.beginRound(id: 4)
        #expect(s.activeName == "hugetlb")
        #expect(try s.nextBatch(maxRanges: 8, maxRangeBytes: 4 << 20) == [a])
    }

    @Test func switchesMidRoundAndTheyKeepTheirOwnPages() throws {
        let p = ScriptedSource("hugetlb", batches: [[a], [a]])
        p.failNextBatchAfter = 1
        let f = ScriptedSource("anonymous", batches: [[b]])
        let s = RoundFallbackSource(primary: p, fallback: f)
        try s.beginRound(id: 3)
        #expect(try s.nextBatch(maxRanges: 8, maxRangeBytes: 4 << 20) == [a])
        #expect(try s.nextBatch(maxRanges: 8, maxRangeBytes: 4 << 20) == [b], "the rest of the round from the fallback")
        #expect(p.calls.suffix(2) == ["next", "end"], "the primary's round is ended (its pages stay until their hints are used)")
        #expect(f.calls.first == "begin 3")
        s.hintsApplied([a, b])
        #expect(p.applied == [a, b] && f.applied == [a, b], "each source ignores what it did not hand out")
        s.releaseAll()
        #expect(p.calls.last == "release" && f.calls.last == "release")
    }

    @Test func bothFailingIsOneError() {
        let p = ScriptedSource("hugetlb", batches: [])
        p.refuseBegin = "pool busy"
        let f = ScriptedSource("anonymous", batches: [])
        f.refuseBegin = "no pagemap"
        let s = RoundFallbackSource(primary: p, fallback: f)
        #expect {
            try s.beginRound(id: 1)
        } throws: { e in
            guard case .fallbackFailed(let primary, let refusal, let fallback, let failure)? = e as? FreePageSourceError else { return false }
            let t = "\(e)"
            return primary == "hugetlb" && refusal.reason(as: ScriptedRefusal.self) == ScriptedRefusal("pool busy")
                && fallback == "anonymous" && failure.reason(as: ScriptedRefusal.self) == ScriptedRefusal("no pagemap")
                && t.contains("pool busy") && t.contains("no pagemap")
        }
        #expect((try? s.nextBatch(maxRanges: 8, maxRangeBytes: 4 << 20)) == [])
    }

    @Test func reportsTheWeakerOwnership() {
        let s = RoundFallbackSource(primary: ScriptedSource("a", batches: []), fallback: ScriptedSource("b", ownership: .observed, batches: []))
        #expect(s.ownership == .observed)
    }
}
