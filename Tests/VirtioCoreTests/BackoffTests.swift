import Testing
@testable import VirtioCore

@Suite("Backoff: a doubling wait up to a cap")
struct BackoffTests {
    @Test("the first failure waits the first wait; nothing is current before it")
    func firstWait() {
        var b = Backoff(first: .seconds(1), cap: .seconds(60))
        #expect(b.current == nil)
        #expect(b.upcoming == .seconds(1))
        #expect(b.next() == .seconds(1))
        #expect(b.current == .seconds(1))
    }

    @Test("each further failure waits twice as long as the last")
    func doubling() {
        var b = Backoff(first: .milliseconds(250), cap: .seconds(60))
        let waits = (0..<5).map { _ in b.next() }
        #expect(waits == [.milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2), .seconds(4)])
    }

    @Test("the wait stops at the cap, also when doubling would overshoot it")
    func cap() {
        var b = Backoff(first: .seconds(1), cap: .seconds(5))
        let waits = (0..<6).map { _ in b.next() }
        #expect(waits == [.seconds(1), .seconds(2), .seconds(4), .seconds(5), .seconds(5), .seconds(5)])
        #expect(b.upcoming == .seconds(5))
    }

    @Test("a cap below the first wait means the first wait, every time")
    func capBelowFirst() {
        var b = Backoff(first: .seconds(60), cap: .seconds(10))
        #expect(b.cap == .seconds(60))
        let waits = (0..<3).map { _ in b.next() }
        #expect(waits == [.seconds(60), .seconds(60), .seconds(60)])
    }

    @Test("a first wait of zero stays zero")
    func zeroFirst() {
        var b = Backoff(first: .zero, cap: .seconds(10))
        #expect([b.next(), b.next()] == [.zero, .zero])
    }

    @Test("reset starts over at the first wait")
    func reset() {
        var b = Backoff(first: .seconds(2), cap: .seconds(30))
        _ = (b.next(), b.next(), b.next())
        #expect(b.current == .seconds(8))
        b.reset()
        #expect(b.current == nil)
        #expect(b == Backoff(first: .seconds(2), cap: .seconds(30)))
        #expect(b.next() == .seconds(2))
        #expect(b.next() == .seconds(4))
    }

    @Test("restart(from:) doubles from the wait it sets, at most the cap, even from above it")
    func restartFrom() {
        var b = Backoff(first: .milliseconds(250), cap: .seconds(15))
        b.restart(from: .milliseconds(500))
        #expect(b.current == .milliseconds(500))
        #expect(b.next() == .seconds(1))
        b.restart(from: .seconds(20))
        #expect(b.next() == .seconds(15))
    }
}
