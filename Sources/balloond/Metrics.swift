import Balloon
import CoreMetrics
import Prometheus

/// balloond's Prometheus metrics, built from one published state snapshot.
///
/// Names follow Prometheus conventions: base units (bytes, seconds), `_total` for counters,
/// `_timestamp_seconds`/`_time_seconds` for Unix times, and a `balloond_info` gauge whose
/// labels name the device and the memory sources. Values go through swift-metrics' handler
/// API (`MeterHandler` for gauges, `CounterHandler` for counters) into swift-prometheus
/// metrics made by a fresh `PrometheusCollectorRegistry` per call, whose exposition text needs
/// no escaping of ours. The registry's `make…(help:)` is used instead of `MetricsSystem` and
/// `PrometheusMetricsFactory` because only it carries HELP text.
enum BalloondMetrics {
    /// The virtio-balloon page: `num_pages`, `actual` and the inflate/deflate counters count
    /// 4 KiB pages whatever the guest's page size (VIRTIO_BALLOON_PFN_SHIFT).
    static let balloonPageBytes: UInt64 = 4096

    /// The exposition text for `state`. Pure: the same state gives the same metrics. Values
    /// from the state file are never trusted to be in range: negative counts read as 0 and
    /// nothing here can trap.
    static func render(_ state: DaemonState, version: String) -> String {
        let registry = PrometheusCollectorRegistry()
        let d = state.driver
        let c = d.counters

        func gauge(_ name: String, _ help: String, _ value: Double, labels: [(String, String)] = []) {
            let meter: any MeterHandler = registry.makeGauge(descriptor: descriptor(name, help), labels: labels)
            meter.set(value)
        }
        func counter(_ name: String, _ help: String, _ value: Int) {
            let c: any CounterHandler = registry.makeCounter(descriptor: descriptor(name, help))
            c.increment(by: Int64(max(0, value)))
        }
        func counter(_ name: String, _ help: String, _ value: UInt64) {
            let c: any CounterHandler = registry.makeCounter(descriptor: descriptor(name, help))
            c.increment(by: Int64(clamping: value))
        }
        /// Bytes from a count of 4 KiB balloon pages (saturating, never trapping).
        func pageBytes(_ pages: UInt64) -> UInt64 {
            let (bytes, overflow) = pages.multipliedReportingOverflow(by: balloonPageBytes)
            return overflow ? .max : bytes
        }

        // Identity and liveness.
        gauge("balloond_info", "balloond's version, device, PCI id, uio device and memory sources (value always 1).", 1, labels: [
            ("version", version), ("device", state.device), ("pci_id", state.pciID), ("uio_device", state.uioDevice),
            ("previous_driver", state.previousDriver ?? ""), ("hint_source", state.hintSource ?? ""),
            ("balloon_memory", d.balloonMemory ?? ""), ("device_status", d.deviceStatus),
        ])
        gauge("balloond_up", "1 while balloond drives the device (the metrics go away when it stops).", 1)
        gauge("balloond_start_time_seconds", "When this balloond started, in seconds since the Unix epoch.", state.startedAt)
        gauge("balloond_last_update_timestamp_seconds", "When balloond last published its state, in seconds since the Unix epoch.", state.updatedAt)
        counter("balloond_restarts_total", "Device errors after which balloond scheduled a reset and re-initialisation of the device.", state.restarts)

        // Balloon sizing.
        gauge("balloond_target_bytes", "The host's balloon target (num_pages, 4 KiB pages) in bytes.", Double(pageBytes(UInt64(d.numPages))))
        gauge("balloond_actual_bytes", "The balloon size balloond reports to the host (actual, 4 KiB pages) in bytes.", Double(pageBytes(UInt64(d.actual))))
        gauge("balloond_balloon_bytes", "Memory balloond holds for the balloon (inflated and in flight) and for free page reporting, in bytes.", Double(d.balloonBytes))
        gauge("balloond_shortfall", "1 when the balloon cannot reach the host's target, else 0.", d.shortfall == nil ? 0 : 1)
        counter("balloond_inflated_bytes_total", "Memory given to the host by inflating, in bytes.", pageBytes(c.pagesInflated))
        counter("balloond_deflated_bytes_total", "Memory taken back from the host by deflating, in bytes.", pageBytes(c.pagesDeflated))
        counter("balloond_inflate_buffers_total", "Inflate buffers sent to the device.", c.inflateBuffers)
        counter("balloond_deflate_buffers_total", "Deflate buffers sent to the device.", c.deflateBuffers)
        counter("balloond_inflate_shortfalls_total", "Inflate steps that fell short of the target because the guest could not spare the memory.", c.inflateShortfalls)
        counter("balloond_pressure_deflates_total", "Deflates caused by guest memory pressure (MemAvailable or PSI, with DEFLATE_ON_OOM).", c.pressureDeflates)
        counter("balloond_pressure_hint_releases_total", "Times guest memory pressure made the free page hint source give back memory it held until DONE.", c.pressureHintReleases)
        counter("balloond_inflate_hint_reserve_releases_total", "Times an inflate made the free page hint source's reserve (--hint-reserve-mib) give memory back.", c.inflateHintReserveReleases)
        counter("balloond_balloon_blocks_moved_total", "Balloon blocks given back before sending because their frames had moved.", c.balloonBlocksMoved)
        let take: any FloatingPointCounterHandler = registry.makeCounter(descriptor: descriptor(
            "balloond_take_memory_seconds_total", "Time spent taking balloon memory from the guest (zeroing pages), in seconds."))
        take.increment(by: Double(c.takeMicroseconds) / 1e6)
        if let ms = c.lastTargetMilliseconds {
            gauge("balloond_last_target_seconds", "Time from the last num_pages change to the balloon reaching it, in seconds.", Double(ms) / 1e3)
        }

        // Free page reporting.
        gauge("balloond_reported_bytes", "Free memory balloond holds reported to the host now, in bytes.", Double(d.reportedBytes))
        counter("balloond_reports_total", "Free page reports sent to the device.", c.reportsSent)
        counter("balloond_reported_bytes_total", "Memory reported free to the host, in bytes.", c.bytesReported)

        // Free page hinting.
        counter("balloond_hint_rounds_total", "Free page hint rounds started (the device's START command).", c.hintRounds)
        counter("balloond_hints_total", "Free page hint buffers posted.", c.hintsSent)
        counter("balloond_hinted_bytes_total", "Memory hinted free to the host, in bytes.", c.bytesHinted)
        counter("balloond_hint_rounds_timed_out_total", "Hint rounds ended because the device stopped consuming hints.", c.hintRoundsTimedOut)
        gauge("balloond_hint_held_bytes", "Memory the free page hint source holds now (owned sources, during a round), in bytes.", Double(d.hintHeldBytes))
        if let us = c.lastRoundFirstHintMicros {
            gauge("balloond_hint_first_hint_seconds", "Latest hint round: time from reading the command id to posting the first hint, in seconds.", Double(us) / 1e6)
        }
        if let us = c.lastRoundStopMicros {
            gauge("balloond_hint_round_seconds", "Latest hint round: time from reading the command id to STOP, in seconds.", Double(us) / 1e6)
        }
        if let us = c.lastRoundAppliedMicros {
            gauge("balloond_hint_applied_seconds", "Latest hint round: time from reading the command id to seeing its last hint used by the device, in seconds.", Double(us) / 1e6)
        }
        gauge("balloond_hint_last_round_bytes", "Latest hint round: memory hinted, in bytes.", Double(c.lastRoundBytes))

        // Device events.
        counter("balloond_interrupts_total", "Device interrupts handled.", c.interrupts)
        counter("balloond_config_changes_total", "Device configuration change interrupts (target or hint command changes).", c.configChanges)
        counter("balloond_stats_updates_total", "Memory statistics buffers sent to the device.", c.statsBuffersSent)
        counter("balloond_device_resets_total", "Re-initialisations of a device balloond had already brought up (each one resets it).", c.deviceResets)
        counter("balloond_errors_total", "Device errors seen while servicing it (DEVICE_NEEDS_RESET, bad used buffers).", c.errors)
        for q in d.queues {
            gauge("balloond_queue_in_flight_buffers", "Buffers posted to a virtqueue and not yet used by the device.", Double(q.inFlight),
                  labels: [("queue", "\(q.index)"), ("role", q.role)])
        }
        return registry.emitToString()
    }

    static let namespace = "balloond"
    /// Unit suffixes, longest first.
    static let units = ["bytes_total", "seconds_total", "total", "bytes", "seconds", "buffers"]

    /// `balloond_<name>_<unit>` split into swift-prometheus's namespace, name and unit.
    static func descriptor(_ fullName: String, _ help: String) -> MetricNameDescriptor {
        var rest = Substring(fullName)
        let prefix = namespace + "_"
        if rest.hasPrefix(prefix) { rest = rest.dropFirst(prefix.count) }
        var unit = ""
        if let u = units.first(where: { rest.hasSuffix("_" + $0) }) {
            unit = u
            rest = rest.dropLast(u.count + 1)
        }
        return MetricNameDescriptor(namespace: namespace, metricName: String(rest), unitName: unit, helpText: help)
    }
}
