import PlatformLinux

/// Reads a whole text file, or nil (through the platform funnel).
func readTextFile(_ path: String) -> String? { Sys.readTextFileIfPresent(path) }
