import Testing
@testable import Balloon
import VirtioCore

@Suite("One clock, durations converted at the edges")
struct MonotonicClockTests {
    @Test("whole units round toward zero, as integer nanoseconds divided by the unit did; rounded up when asked")
    func wholeUnits() {
        #expect(Duration.nanoseconds(1_999_999).whole(.milliseconds(1)) == 1)
        #expect(Duration.seconds(2).whole(.milliseconds(1)) == 2000)
        #expect(Duration.nanoseconds(1999).whole(.microseconds(1)) == 1)
        #expect(Duration.microseconds(1500).roundedUp(to: .milliseconds(1)) == 2)
        #expect(Duration.milliseconds(2).roundedUp(to: .milliseconds(1)) == 2)
    }

    @Test("the system clock never goes back")
    func systemClockIsMonotonic() {
        let a = MonotonicClock.system.now()
        let b = MonotonicClock.system.now()
        #expect(a >= .zero)
        #expect(b >= a)
    }
}
