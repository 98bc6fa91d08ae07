import Logging

/// A log handler that hands every message to `onLog` as it is logged (tests look at what was
/// logged, or at what some state was at that moment).
public struct CallbackLogHandler: LogHandler, @unchecked Sendable {
    let onLog: (Logger.Level, String) -> Void
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .trace

    public init(_ onLog: @escaping (Logger.Level, String) -> Void) { self.onLog = onLog }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) { onLog(event.level, event.message.description) }
}
